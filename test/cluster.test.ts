/**
 * Distributed blocks on a real three-node cluster on 127.0.0.1: replicated
 * writes, failover reads, node failures (kill -9, SIGSTOP), the dirty-block
 * log and resynchronisation. Node A mounts the image and serves NBD; B and
 * C hold replicas. Each check follows an invariant of DESIGN.md.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { open, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Cluster } from './helpers/cluster.js'
import { run, type TestNode } from './helpers/node-process.js'
import { NbdClient } from '../src/peer/nbd-client.js'
import { prng } from './helpers/assertions.js'
import { nbdWriterScript } from './helpers/writers.js'

const MB = 1_000_000
const BLOCK = MB
const SIZE = 12 * MB


/** Reads [offset, offset + length) of an export through NBD (no page cache in the way). */
async function nbdRead (node: TestNode, image: string, offset: number, length: number): Promise<Buffer> {
  const c = await NbdClient.connect({ path: node.nbdSocket! }, image, { timeoutMs: 30_000 })
  try {
    const buf = Buffer.alloc(length)
    await c.read(offset, buf)
    return buf
  } finally { await c.close() }
}

describe('three-node cluster', { timeout: 300_000 }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode, C: TestNode
  const model = Buffer.alloc(SIZE)
  const rnd = prng(3)

  /** Random writes through A's mount, avoiding the blocks in `avoid`, recorded in the model. */
  async function randomWrites (count: number, avoid: Array<[number, number]> = []): Promise<void> {
    const fh = await open(join(A.mountpoint!, 'mix'), 'r+')
    try {
      for (let i = 0; i < count;) {
        const len = 1 + Math.floor(rnd() * 1.5 * BLOCK)
        const off = Math.floor(rnd() * (SIZE - len))
        if (avoid.some(([s, e]) => off < e * BLOCK && off + len > s * BLOCK)) continue
        const data = randomBytes(len)
        const { bytesWritten } = await fh.write(data, 0, len, off)
        assert.equal(bytesWritten, len)
        data.copy(model, off)
        i++
      }
      await fh.sync()
    } finally { await fh.close() }
  }

  before(async () => {
    cluster = await Cluster.start({ nodes: 3, mount: [0], nbd: [0], config: { io_timeout: 2, retry_after: 30 } })
    ;[A, B, C] = cluster.nodes as [TestNode, TestNode, TestNode]
    // Blocks 0-3 on A and B, 4-7 on all three, 8-9 only on C (remote to A),
    // 10-11 on B and C (both remote to A).
    const doc = {
      format: 1,
      name: 'mix',
      size: SIZE,
      block_size: BLOCK,
      used_size: SIZE,
      hypervisors: [A.id],
      generation: 0,
      locations: {
        [A.id]: { blocks: [[0, 8]], out_of_sync: [] },
        [B.id]: { blocks: [[0, 8], [10, 12]], out_of_sync: [] },
        [C.id]: { blocks: [[4, 12]], out_of_sync: [] }
      }
    }
    const r = await A.api('POST', '/v1/images/import', doc)
    assert.equal(r.status, 201, JSON.stringify(r.body))
    const other = await A.cli('image', 'create', 'other', '-s', '4M', '-b', '1M')
    assert.equal(other.code, 0, other.stderr)
  })
  after(async () => { await cluster?.destroy() })

  test('writes reach every replica; reads come from the local replica first', async () => {
    await randomWrites(40)
    assert.deepEqual(await cluster.checkReplicas('mix', model), [])
    const before = (await A.api<{ readsFrom: Record<string, number> }>('GET', '/v1/images/mix/stats')).body.readsFrom
    const got = await nbdRead(A, 'mix', 0, 8 * MB)
    assert.ok(got.equals(model.subarray(0, 8 * MB)))
    const afterReads = (await A.api<{ readsFrom: Record<string, number> }>('GET', '/v1/images/mix/stats')).body.readsFrom
    const delta = (id: string): number => (afterReads[id] ?? 0) - (before[id] ?? 0)
    assert.ok(delta(A.id) >= 8, `reads from A: ${delta(A.id)}`)
    assert.equal(delta(B.id), 0, 'blocks held locally must not be read from B')
    assert.equal(delta(C.id), 0, 'blocks held locally must not be read from C')
    // Blocks 8-11 are not on A: read remotely, still equal.
    assert.ok((await nbdRead(A, 'mix', 8 * MB, 4 * MB)).equals(model.subarray(8 * MB)))
  })

  test('nodes register; create allocates replicas on other nodes and destroy removes them', async () => {
    const list = await A.cli('nodes', 'list', '--json')
    assert.equal(list.code, 0, list.stderr)
    const nodes = JSON.parse(list.stdout) as Array<{ id: string, reachable: boolean, rtt_ms: number, capacity: { available: number } }>
    assert.deepEqual(nodes.map((n) => n.id).sort(), [A.id, B.id, C.id].sort())
    assert.ok(nodes.every((n) => n.reachable && n.rtt_ms >= 0 && n.capacity.available > 0), list.stdout)
    const best = await A.cli('nodes', 'best')
    assert.ok([A.id, B.id, C.id].includes(best.stdout.trim()), best.stdout)

    const r = await A.cli('image', 'create', 'far', '-s', '4M', '-b', '1M', '-l', B.id, '-l', C.id)
    assert.equal(r.code, 0, r.stderr)
    assert.doesNotMatch(r.stderr, /warning/)
    const exists = async (n: TestNode): Promise<boolean> => await stat(join(n.imageRoot, 'far')).then(() => true, () => false)
    assert.equal(await exists(A), false)
    assert.equal(await exists(B), true)
    assert.equal(await exists(C), true)
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 1000000 100000', '-c', 'read -P 0x33 1000000 100000', `nbd+unix:///far?socket=${A.nbdSocket!}`])
    assert.equal(w.code, 0, w.stderr)
    assert.deepEqual(await cluster.checkReplicas('far'), [])
    const d = await A.cli('image', 'destroy', 'far')
    assert.equal(d.code, 0, d.stderr)
    assert.equal(await exists(B), false)
    assert.equal(await exists(C), false)
  })

  test('kill -9 of a replica node: I/O goes on, its blocks go out of sync, reads of blocks only it held fail with EIO; restart and sync restore identical replicas', async () => {
    await C.stop('SIGKILL')
    await randomWrites(40, [[8, 10]])
    const oos = await cluster.outOfSync('mix')
    assert.ok(oos[C.id]! > 0, 'the dead node must be marked out of sync')
    assert.equal(oos[A.id], 0)
    assert.equal(oos[B.id], 0)
    assert.deepEqual(await cluster.checkReplicas('mix', model), [], 'in-sync replicas must equal the model')
    // Everything but C's own blocks reads back equal, through NBD.
    assert.ok((await nbdRead(A, 'mix', 0, 8 * MB)).equals(model.subarray(0, 8 * MB)))
    assert.ok((await nbdRead(A, 'mix', 10 * MB, 2 * MB)).equals(model.subarray(10 * MB)))
    // Block 8 is only on C: EIO to the reader, and the node serves on.
    const io = await run('qemu-io', ['-f', 'raw', '-c', `read ${8 * MB} 4096`, `nbd+unix:///mix?socket=${A.nbdSocket!}`])
    assert.match(io.stdout + io.stderr, /Input\/output error/)
    assert.equal((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 64k', '-c', 'read -P 0x11 0 64k', `nbd+unix:///other?socket=${A.nbdSocket!}`])).code, 0)
    const errors = await A.cli('nodes', 'errors', '--json')
    assert.ok(JSON.parse(errors.stdout).some((e: { location: string }) => e.location === C.id), errors.stdout)

    await C.launch()
    // Writing to a block whose replica on C is out of sync does not bring
    // that replica back: it stays out of sync until `ukai sync`.
    const oosBefore = (await cluster.outOfSync('mix'))[C.id]!
    await randomWrites(5, [[0, 4], [8, 10]])
    assert.ok((await cluster.outOfSync('mix'))[C.id]! >= oosBefore)
    const sync = await A.cli('sync', 'mix')
    assert.equal(sync.code, 0, sync.stderr)
    assert.match(sync.stdout, /synced \d+ of \d+ block/)
    assert.deepEqual(Object.values(await cluster.outOfSync('mix')), [0, 0, 0])
    assert.deepEqual(await cluster.checkReplicas('mix', model, { includeOutOfSync: true }), [])
    // The whole image, read through NBD, has the model's SHA-256.
    const all = await nbdRead(A, 'mix', 0, SIZE)
    assert.equal(createHash('sha256').update(all).digest('hex'), createHash('sha256').update(model).digest('hex'))
  })

  test('a peer stopped with SIGSTOP: writes resume after the timeout; SIGCONT and sync restore identical replicas', async () => {
    process.kill(B.pid!, 'SIGSTOP')
    try {
      await randomWrites(10, [[8, 12]])
      assert.ok((await cluster.outOfSync('mix'))[B.id]! > 0)
    } finally {
      process.kill(B.pid!, 'SIGCONT')
    }
    const sync = await A.cli('sync', 'mix')
    assert.equal(sync.code, 0, sync.stderr)
    assert.deepEqual(await cluster.checkReplicas('mix', model, { includeOutOfSync: true }), [])
  })

  test('sync of a block range copies only that range', async () => {
    // Place blocks 0-1 on C too: new replicas start out of sync.
    const add = await A.cli('image', 'add-location', 'mix', C.id, '-s', '0', '-e', '1')
    assert.equal(add.code, 0, add.stderr)
    assert.equal((await cluster.outOfSync('mix'))[C.id], 2)
    const sync = await A.cli('sync', 'mix', '-s', '1', '-e', '1')
    assert.equal(sync.code, 0, sync.stderr)
    assert.equal((await cluster.outOfSync('mix'))[C.id], 1)
    assert.equal((await A.cli('sync', 'mix')).code, 0)
    assert.deepEqual(await cluster.checkReplicas('mix', model, { includeOutOfSync: true }), [])
    // Removing the only in-sync copy of a block is refused.
    const rm = await A.cli('image', 'remove-location', 'mix', C.id, '-s', '8', '-e', '8')
    assert.equal(rm.code, 6, rm.stderr)
    assert.match(rm.stderr, /without an in-sync replica/)
    assert.equal((await A.cli('image', 'remove-location', 'mix', C.id, '-s', '0', '-e', '1')).code, 0)
  })

  test('kill -9 of the writing node, repeated: in-sync replicas never differ after restart (dirty-block log)', async () => {
    // Two writers: through the FUSE mount (one write at a time, as the
    // kernel sends them) and through NBD with 32 writes in flight, so the
    // kill lands between replicas of some write.
    const fuseWriter = join(cluster.dir, 'fuse-writer.mjs')
    await writeFile(fuseWriter, `
      import { openSync, writeSync } from 'node:fs'
      import { randomBytes } from 'node:crypto'
      const fd = openSync(process.argv[2], 'r+')
      process.stdout.write('writing\\n')
      for (;;) {
        const len = 4096 + Math.floor(Math.random() * 600000)
        const off = Math.floor(Math.random() * (8000000 - len))
        try { writeSync(fd, randomBytes(len), 0, len, off) } catch { process.exit(0) }
      }
    `)
    const nbdWriter = await nbdWriterScript(cluster.dir, 'mix', 8_000_000)
    for (let round = 0; round < 4; round++) {
      const child = round % 2 === 0
        ? spawn(process.execPath, [nbdWriter, A.nbdSocket!], { stdio: ['ignore', 'pipe', 'inherit'] })
        : spawn(process.execPath, [fuseWriter, join(A.mountpoint!, 'mix')], { stdio: ['ignore', 'pipe', 'inherit'] })
      // Listen now: the writer may end on its own once A is gone.
      const closed = once(child, 'close')
      await once(child.stdout!, 'data')
      await new Promise((resolve) => setTimeout(resolve, 300 + Math.floor(rnd() * 500)))
      await A.stop('SIGKILL')
      child.kill('SIGKILL')
      await closed
      // The log names the blocks being written when the writer died.
      const logged = await cluster.dirtyLog('mix')
      assert.ok(!logged.isEmpty, `round ${round}: the dirty-block log is empty after a crash during writes`)
      await run('fusermount', ['-uz', A.mountpoint!])
      await A.launch()
      // Opening the image reconciles the blocks in the dirty-block log.
      const info = await run('qemu-img', ['info', `nbd+unix:///mix?socket=${A.nbdSocket!}`])
      assert.equal(info.code, 0, info.stderr)
      assert.deepEqual(await cluster.checkReplicas('mix'), [], `round ${round}: in-sync replicas differ`)
      assert.equal((await cluster.dirtyLog('mix')).isEmpty, true, 'the log is empty once reconciled')
    }
  })
})
