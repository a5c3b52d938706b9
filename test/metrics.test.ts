/**
 * Statistics and metrics against real I/O: a known number of reads and
 * writes through NBD (qemu-io), then `GET /metrics` read with a Prometheus
 * text-format parser (parse-prometheus-text-format) and `ukai stats
 * --json`, which must both count exactly that I/O; on a two-node cluster
 * (mutual TLS) reads of a block range held only by the other node count
 * as remote, and a sync's progress shows in `ukai sync --json`, on a
 * terminal, and in the ukai_sync_* gauges.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import parsePrometheus, { type Family } from 'parse-prometheus-text-format'
import { Cluster } from './helpers/cluster.js'
import { CLI, TestNode, run, type RunResult } from './helpers/node-process.js'

const MiB = 1024 * 1024

async function hasTool (tool: string): Promise<boolean> {
  return await run('sh', ['-c', `command -v ${tool}`]).then((r) => r.code === 0, () => false)
}

async function qemuIo (node: TestNode, image: string, commands: string[]): Promise<void> {
  const r = await run('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), `nbd+unix:///${image}?socket=${node.nbdSocket!}`])
  assert.equal(r.code, 0, r.stderr + r.stdout)
  assert.doesNotMatch(r.stdout + r.stderr, /error|fail/i)
}

/**
 * A scrape, parsed. parse-prometheus-text-format 1.1.1 folds a histogram
 * with labels besides `le` into one sample without them, so the histogram
 * family is handed to it untyped: its _bucket, _sum and _count samples
 * then come back as families of their own with every label.
 */
async function scrape (node: TestNode): Promise<Map<string, Family>> {
  const r = await node.apiText('GET', '/metrics')
  assert.equal(r.status, 200, r.text)
  assert.match(String(r.headers['content-type']), /^text\/plain; version=0\.0\.4/)
  const families = parsePrometheus(r.text.replace(/^# TYPE (\S+) histogram$/gm, '# TYPE $1 untyped'))
  // Each label set's _bucket, _sum and _count lines come as a run of their own: same names, merged.
  const byName = new Map<string, Family>()
  for (const f of families) {
    const seen = byName.get(f.name)
    if (seen === undefined) byName.set(f.name, { ...f, metrics: [...f.metrics] })
    else seen.metrics.push(...f.metrics)
  }
  return byName
}

/** The value of the one sample of `name` whose labels include `labels`; undefined when there is none. */
function value (m: Map<string, Family>, name: string, labels: Record<string, string>): number | undefined {
  const f = m.get(name)
  const hits = (f?.metrics ?? []).filter((s) => Object.entries(labels).every(([k, v]) => s.labels?.[k] === v))
  assert.ok(hits.length <= 1, `${name} ${JSON.stringify(labels)}: ${hits.length} samples`)
  return hits[0] === undefined ? undefined : Number(hits[0].value)
}

interface Stats {
  image: string
  reads: number
  writes: number
  bytesRead: number
  bytesWritten: number
  reads_local: number
  reads_remote: number
  read_bytes_local: number
  read_bytes_remote: number
  out_of_sync_blocks: number
  locations: Record<string, { local: boolean, blocks: number, out_of_sync_blocks: number, reads: number, read_bytes: number, read_seconds: number, writes: number, written_bytes: number, write_seconds: number }>
  sync: { running: boolean, blocks: number, done: number, bytes: number, failed: number } | null
}

async function statsJson (node: TestNode, image: string): Promise<Stats> {
  return JSON.parse(await node.cliOk('stats', image, '--json')) as Stats
}

describe('metrics and stats, one node', { timeout: 120_000 }, () => {
  let node: TestNode
  let skip: string | false = false

  before(async () => {
    if (!await hasTool('qemu-io')) { skip = 'qemu-io is not installed (qemu-utils)'; return }
    node = await TestNode.start({ nbd: true })
    await node.cliOk('image', 'create', 'm', '-s', '8M', '-b', '1M')
  })
  after(async () => { await node?.destroy() })

  test('counters match the I/O done through NBD', async (t) => {
    if (skip !== false) return t.skip(skip)
    // 4 writes (3 of 4 KiB, 1 of 64 KiB) and 6 reads, one of them across a block boundary.
    await qemuIo(node, 'm', [
      'write -P 0x11 0 4k', `write -P 0x22 ${MiB} 4k`, `write -P 0x33 ${2 * MiB} 4k`, `write -P 0x44 ${3 * MiB} 64k`,
      'read -P 0x11 0 4k', `read -P 0x22 ${MiB} 4k`, `read -P 0x33 ${2 * MiB} 4k`, `read -P 0x44 ${3 * MiB} 64k`, `read -P 0x44 ${3 * MiB} 4k`,
      `read ${MiB - 2048} 4k`
    ])
    const m = await scrape(node)
    const image = { image: 'm' }
    const here = { image: 'm', location: node.id }
    assert.equal(value(m, 'ukai_image_hypervisor_reads_total', image), 6)
    assert.equal(value(m, 'ukai_image_hypervisor_writes_total', image), 4)
    assert.equal(value(m, 'ukai_image_hypervisor_read_bytes_total', image), 5 * 4096 + 65536)
    assert.equal(value(m, 'ukai_image_hypervisor_written_bytes_total', image), 3 * 4096 + 65536)
    // The read across blocks 0 and 1 is two replica reads.
    assert.equal(value(m, 'ukai_image_reads_total', here), 7)
    assert.equal(value(m, 'ukai_image_read_bytes_total', here), 5 * 4096 + 65536)
    assert.equal(value(m, 'ukai_image_writes_total', here), 4)
    assert.equal(value(m, 'ukai_image_written_bytes_total', here), 3 * 4096 + 65536)
    assert.equal(value(m, 'ukai_image_reads_local_total', image), 7)
    assert.equal(value(m, 'ukai_image_reads_remote_total', image), 0)
    assert.equal(value(m, 'ukai_image_blocks', here), 8)
    assert.equal(value(m, 'ukai_image_out_of_sync_blocks', here), 0)
    assert.equal(value(m, 'ukai_replica_request_seconds_count', { ...here, op: 'read' }), 7)
    assert.equal(value(m, 'ukai_replica_request_seconds_count', { ...here, op: 'write' }), 4)
    assert.equal(value(m, 'ukai_replica_request_seconds_bucket', { ...here, op: 'read', le: '+Inf' }), 7)
    const readSeconds = value(m, 'ukai_replica_request_seconds_sum', { ...here, op: 'read' })!
    assert.ok(readSeconds > 0 && readSeconds < 7 * 10, String(readSeconds))
    assert.equal(value(m, 'ukai_node_up', { id: node.id }), 1)
    assert.equal(value(m, 'ukai_image_hypervisor_reads_total', { image: 'm', node: node.id }), 6, 'every series names its node')
    assert.ok(m.has('process_cpu_seconds_total'), 'the process metrics are there too')

    // `ukai stats --json` counts the same.
    const s = await statsJson(node, 'm')
    assert.equal(s.reads, 6)
    assert.equal(s.writes, 4)
    assert.equal(s.bytesRead, 5 * 4096 + 65536)
    assert.equal(s.bytesWritten, 3 * 4096 + 65536)
    assert.equal(s.reads_local, 7)
    assert.equal(s.reads_remote, 0)
    assert.deepEqual(Object.keys(s.locations), [node.id])
    const l = s.locations[node.id]!
    assert.deepEqual({ ...l, read_seconds: 0, write_seconds: 0 },
      { local: true, blocks: 8, out_of_sync_blocks: 0, reads: 7, read_bytes: 5 * 4096 + 65536, read_seconds: 0, writes: 4, written_bytes: 3 * 4096 + 65536, write_seconds: 0 })
    assert.ok(Math.abs(l.read_seconds - readSeconds) < 1e-9, 'the histogram and the stats add up the same seconds')
    assert.equal(s.sync, null)

    // The table says it too.
    const text = await node.cliOk('stats', 'm')
    assert.match(text, /hypervisor I\/O: 6 read\(s\), 84 KiB; 4 write\(s\), 76 KiB/)
    assert.match(text, /replica reads: +7 local \(84 KiB\), 0 remote/)
    assert.match(text, new RegExp(`${node.id.replace(/\./g, '\\.')} +yes +7 +84 KiB +\\d+\\.\\d{3} ms +4 +76 KiB +\\d+\\.\\d{3} ms +8 +0`))
  })

  test('/metrics wants the token and this node\'s Host, like every control call', async (t) => {
    if (skip !== false) return t.skip(skip)
    let r = await node.apiText('GET', '/metrics', undefined, { token: null })
    assert.equal(r.status, 401)
    assert.equal(r.headers['www-authenticate'], 'Bearer realm="ukai"')
    assert.equal(JSON.parse(r.text).error.code, 'UKAI_ERR_UNAUTHENTICATED')
    r = await node.apiText('GET', '/metrics', undefined, { token: 'not-the-token' })
    assert.equal(r.status, 401)
    r = await node.apiText('GET', '/metrics', undefined, { headers: { host: `evil.example:${node.controlPort}` } })
    assert.equal(r.status, 403)
    r = await node.apiText('POST', '/metrics')
    assert.equal(r.status, 501)
    assert.equal(r.headers.allow, 'GET')
    // Stats of an image that does not exist: 404, exit 3.
    const missing = await node.cli('stats', 'nope')
    assert.equal(missing.code, 3, missing.stderr)
    assert.match(missing.stderr, /image 'nope' not found/)
  })

  test('a destroyed image leaves no series behind', async (t) => {
    if (skip !== false) return t.skip(skip)
    await node.cliOk('image', 'create', 'gone', '-s', '1M')
    await qemuIo(node, 'gone', ['write 0 4k', 'read 0 4k'])
    assert.equal(value(await scrape(node), 'ukai_replica_request_seconds_count', { image: 'gone', op: 'read' }), 1)
    await node.cliOk('image', 'destroy', 'gone')
    const m = await scrape(node)
    for (const name of ['ukai_image_reads_total', 'ukai_image_hypervisor_reads_total', 'ukai_replica_request_seconds_count', 'ukai_image_blocks']) {
      assert.equal(value(m, name, { image: 'gone' }), undefined, name)
    }
    assert.equal(value(m, 'ukai_image_hypervisor_reads_total', { image: 'm' }), 6)
  })
})

describe('metrics and stats, two nodes', { timeout: 240_000 }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode
  let skip: string | false = false

  before(async () => {
    if (!await hasTool('qemu-io')) { skip = 'qemu-io is not installed (qemu-utils)'; return }
    cluster = await Cluster.start({ nodes: 2, nbd: [0] })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
    // Blocks 0-3 on A (local to A's NBD export), 4-7 only on B (remote).
    const doc = {
      format: 1,
      name: 'split',
      size: 8 * MiB,
      block_size: MiB,
      used_size: 8 * MiB,
      hypervisors: [A.id],
      generation: 0,
      locations: {
        [A.id]: { blocks: [[0, 4]], out_of_sync: [] },
        [B.id]: { blocks: [[4, 8]], out_of_sync: [] }
      }
    }
    const r = await A.api('POST', '/v1/images/import', doc)
    assert.equal(r.status, 201, JSON.stringify(r.body))
  })
  after(async () => { await cluster?.destroy() })

  test('reads of a range only another node holds count as remote, per location', async (t) => {
    if (skip !== false) return t.skip(skip)
    await qemuIo(A, 'split', [
      'write -P 0x5a 0 8k', `write -P 0xa5 ${5 * MiB} 8k`,
      'read -P 0x5a 0 8k', 'read -P 0x5a 4k 4k', `read -P 0xa5 ${5 * MiB} 8k`, `read -P 0xa5 ${5 * MiB} 4k`, `read -P 0xa5 ${5 * MiB + 4096} 4k`
    ])
    const s = await statsJson(A, 'split')
    assert.equal(s.reads, 5)
    assert.equal(s.writes, 2)
    assert.equal(s.reads_local, 2)
    assert.equal(s.reads_remote, 3)
    assert.equal(s.read_bytes_local, 12 * 1024)
    assert.equal(s.read_bytes_remote, 16 * 1024)
    assert.deepEqual(Object.fromEntries(Object.entries(s.locations).map(([loc, l]) => [loc, [l.local, l.reads, l.read_bytes, l.writes, l.written_bytes, l.blocks]])), {
      [A.id]: [true, 2, 12 * 1024, 1, 8192, 4],
      [B.id]: [false, 3, 16 * 1024, 1, 8192, 4]
    })
    const m = await scrape(A)
    assert.equal(value(m, 'ukai_image_reads_local_total', { image: 'split' }), 2)
    assert.equal(value(m, 'ukai_image_reads_remote_total', { image: 'split' }), 3)
    assert.equal(value(m, 'ukai_image_reads_total', { image: 'split', location: B.id }), 3)
    assert.equal(value(m, 'ukai_image_writes_total', { image: 'split', location: B.id }), 1)
    assert.equal(value(m, 'ukai_replica_request_seconds_count', { image: 'split', location: B.id, op: 'read' }), 3)
    assert.equal(value(m, 'ukai_replica_request_seconds_count', { image: 'split', location: A.id, op: 'read' }), 2)
    assert.equal(value(m, 'ukai_node_up', { id: A.id }), 1)
    assert.equal(value(m, 'ukai_node_up', { id: B.id }), 1)
    // B served those reads through its peer export, not through a volume: it counts no hypervisor I/O.
    assert.equal(value(await scrape(B), 'ukai_image_hypervisor_reads_total', { image: 'split' }), 0)
  })

  test('out-of-sync blocks per location, and a sync\'s progress: on a terminal, as JSON lines, in the gauges', async (t) => {
    if (skip !== false) return t.skip(skip)
    // Blocks 0-1 placed on B too: out of sync there until synced.
    await A.cliOk('image', 'add-location', 'split', B.id, '-s', '0', '-e', '1')
    let s = await statsJson(A, 'split')
    assert.equal(s.locations[B.id]!.out_of_sync_blocks, 2)
    assert.equal(s.locations[B.id]!.blocks, 6)
    assert.equal(s.out_of_sync_blocks, 2)
    assert.equal(value(await scrape(A), 'ukai_image_out_of_sync_blocks', { image: 'split', location: B.id }), 2)

    // On a terminal (script(1) gives the command a pty): the bar.
    if (await hasTool('script')) {
      const cmd = [process.execPath, CLI, '--config', A.configPath, 'sync', 'split'].map((a) => `'${a}'`).join(' ')
      const r = await run('script', ['-qefc', cmd, '/dev/null'])
      assert.equal(r.code, 0, r.stdout)
      assert.match(r.stdout, /sync split \[={30}\] 2\/2 blocks, [\d.]+ [KM]iB, [\d.]+ [KMG]?i?B\/s, ETA 0 s/)
      assert.match(r.stdout, /synced 2 of 2 block\(s\), 8 KiB copied/)
    } else {
      await A.cliOk('sync', 'split')
    }
    s = await statsJson(A, 'split')
    assert.equal(s.locations[B.id]!.out_of_sync_blocks, 0)
    assert.deepEqual({ ...s.sync, started: undefined, ended: undefined }, { running: false, blocks: 2, done: 2, bytes: 8192, failed: 0, started: undefined, ended: undefined })

    // --json: a progress object per line, then the result.
    await A.cliOk('image', 'add-location', 'split', B.id, '-s', '2', '-e', '3')
    const r: RunResult = await A.cli('sync', 'split', '--json')
    assert.equal(r.code, 0, r.stderr)
    assert.equal(r.stderr, '')
    const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as { progress?: { done: number, total: number, bytes: number, rate: number, elapsed_s: number }, result?: { blocks: number, done: number, bytes: number, failed: unknown[] } })
    const progress = lines.filter((l) => l.progress !== undefined).map((l) => l.progress!)
    assert.ok(progress.length >= 2, r.stdout)
    assert.deepEqual(progress.map((p) => p.total), progress.map(() => 2))
    assert.equal(progress[0]!.done, 0)
    assert.equal(progress[progress.length - 1]!.done, 2)
    assert.ok(progress.every((p, i) => i === 0 || p.done >= progress[i - 1]!.done), 'done only grows')
    assert.deepEqual(lines[lines.length - 1], { result: { blocks: 2, done: 2, bytes: 0, failed: [] } }, 'blocks 2-3 were never written: holes, nothing copied')

    const m = await scrape(A)
    assert.equal(value(m, 'ukai_sync_running', { image: 'split' }), 0)
    assert.equal(value(m, 'ukai_sync_blocks_total', { image: 'split' }), 2)
    assert.equal(value(m, 'ukai_sync_blocks_done', { image: 'split' }), 2)
    assert.equal(value(m, 'ukai_sync_blocks_failed', { image: 'split' }), 0)
    assert.equal(value(m, 'ukai_image_out_of_sync_blocks', { image: 'split', location: B.id }), 0)

    // Not a terminal: plain lines on stderr; nothing left to sync.
    const plain = await A.cli('sync', 'split')
    assert.equal(plain.code, 0, plain.stderr)
    assert.match(plain.stderr, /^sync split: 0\/0 blocks, 0 B, 0 B\/s, ETA 0 s\nsync split: done, 0\/0 blocks, 0 B in \d+ s\n$/)
    assert.match(plain.stdout, /synced 0 of 0 block\(s\)/)
  })
})
