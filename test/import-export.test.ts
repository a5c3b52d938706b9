/**
 * `ukai image import` and `ukai image export` (issue 11, item 4) on real
 * node processes speaking mutual TLS (the control API over HTTPS with the
 * cluster token): a sparse 1 GiB raw file with scattered data goes into a
 * two-location image and back, equal, and costs about its data on the
 * nodes and in the exported file; the refusals change nothing; an
 * interrupted import says so and resumes; the writer lease applies; and a
 * qcow2 disk goes in with qemu-img, through a raw file or straight into
 * the NBD export.
 */
import { after, before, describe, test, type TestContext } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { lstat, open, readFile, readdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { NbdClient } from '../src/peer/nbd-client.js'
import { Cluster } from './helpers/cluster.js'
import { prng } from './helpers/assertions.js'
import { CLI, run, type TestNode } from './helpers/node-process.js'

const KiB = 1024
const MiB = 2 ** 20
const GiB = 2 ** 30

/** Bytes allocated on disk by a file (st_blocks * 512). */
async function allocated (path: string): Promise<number> {
  return (await lstat(path)).blocks * 512
}

/** Bytes allocated by an image's block files on a node. */
async function allocatedOn (n: TestNode, image: string): Promise<number> {
  let sum = 0
  for (const f of await readdir(join(n.imageRoot, image))) if (/^\d+$/.test(f)) sum += await allocated(join(n.imageRoot, image, f))
  return sum
}

const available = new Map<string, Promise<boolean>>()
async function have (cmd: string): Promise<boolean> {
  let p = available.get(cmd)
  if (p === undefined) {
    p = new Promise<boolean>((resolve) => {
      const child = spawn(cmd, ['--version'], { stdio: 'ignore' })
      child.once('error', () => resolve(false))
      child.once('close', (code) => resolve(code === 0))
    })
    available.set(cmd, p)
  }
  return await p
}

async function needs (t: TestContext, ...cmds: string[]): Promise<boolean> {
  for (const c of cmds) {
    if (!await have(c)) { t.skip(`${c} is not installed`); return false }
  }
  return true
}

async function runOk (cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args)
  assert.equal(r.code, 0, `${cmd} ${args.join(' ')} exited ${r.code}:\n${r.stdout}\n${r.stderr}`)
  return r.stdout
}

describe('image import and export of raw files', { timeout: 600_000 }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode
  let dir: string

  before(async () => {
    cluster = await Cluster.start({ nodes: 2, nbd: [0, 1], config: { io_timeout: 5 } })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
    dir = join(cluster.dir, 'files')
    await runOk('mkdir', ['-p', dir])
  })
  after(async () => { await cluster?.destroy() })

  test('a sparse 1 GiB file with 10 MiB of scattered data: in and out equal, about 10 MiB allocated on each node and in the export', async () => {
    const src = join(dir, 'sparse.raw')
    const rand = prng(11)
    let data = 0
    const fh = await open(src, 'w')
    try {
      await fh.truncate(GiB)
      // 38 pieces of 256 KiB on 4 KiB boundaries, and a few unaligned bytes.
      for (let i = 0; i < 38; i++) {
        const at = Math.floor(rand() * (GiB / (256 * KiB) - 1)) * 256 * KiB
        await fh.write(randomBytes(256 * KiB), 0, 256 * KiB, at)
      }
      for (const at of [1, 5 * MiB + 3, GiB - 7]) await fh.write(Buffer.from('ukai!!!'), 0, 7, at)
      // Allocated zeros in the source: the image must not take them.
      await fh.write(Buffer.alloc(2 * MiB), 0, 2 * MiB, 300 * MiB)
    } finally { await fh.close() }
    data = await allocated(src) - 2 * MiB
    assert.ok(data > 9 * MiB && data < 11 * MiB, `source data ${data}`)

    const out = await A.cliOk('image', 'import', src, 'vm', '-b', '64M', '-l', A.id, '-l', B.id)
    assert.match(out, /imported .*sparse\.raw into image 'vm': 1 GiB, [\d.]+ MiB of data written/)
    const info = JSON.parse(await A.cliOk('image', 'info', 'vm', '--json'))
    assert.equal(info.size, GiB)
    assert.equal(info.used_size, GiB)
    assert.equal(info.block_size, 64 * MiB)
    assert.equal(info.out_of_sync, 0)
    assert.deepEqual(info.open, [], 'the import left the image open')
    assert.equal(info.writer, null, 'the import kept the writer lease')
    // Each node holds about the data: holes and zero pages were not written.
    for (const n of [A, B]) {
      const a = await allocatedOn(n, 'vm')
      assert.ok(a >= data - 64 * KiB && a <= data + MiB, `${n.id} allocates ${a} bytes for ${data} of data`)
    }
    assert.deepEqual(await cluster.checkReplicas('vm'), [])

    // Out again through the other node's control API.
    const back = join(dir, 'back.raw')
    const exported = await B.cliOk('image', 'export', 'vm', back)
    assert.match(exported, /exported image 'vm' to .*back\.raw: 1 GiB/)
    await runOk('cmp', [src, back])
    assert.equal((await lstat(back)).size, GiB)
    const a = await allocated(back)
    assert.ok(a >= data - 64 * KiB && a <= data + MiB, `the export allocates ${a} bytes for ${data} of data`)
    // du agrees.
    const du = Number((await runOk('du', ['-k', back])).split(/\s/)[0]) * KiB
    assert.ok(du <= data + MiB, `du says ${du}`)
  })

  test('--json: progress lines, then the result', async () => {
    const src = join(dir, 'small.raw')
    await writeFile(src, Buffer.concat([randomBytes(MiB), Buffer.alloc(3 * MiB), randomBytes(5000)]))
    const r = await A.cli('image', 'import', src, 'small', '--json', '-l', A.id, '-l', B.id)
    assert.equal(r.code, 0, r.stderr)
    const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l))
    assert.deepEqual(lines[lines.length - 1], { result: { image: 'small', file: src, size: 4 * MiB + 5000, data_bytes: MiB + 5000 } })
    for (const l of lines.slice(0, -1)) assert.ok(l.progress.done <= l.progress.total)
    const back = join(dir, 'small.back')
    const e = await A.cli('image', 'export', 'small', back, '--json')
    assert.equal(e.code, 0, e.stderr)
    assert.equal(JSON.parse(e.stdout.trim().split('\n').pop()!).result.size, 4 * MiB + 5000)
    await runOk('cmp', [src, back])
  })

  test('refused, changing nothing: an existing name, a missing file, an empty file, a bad block size, an existing export file', async () => {
    const src = join(dir, 'small.raw')
    const before = JSON.parse(await A.cliOk('image', 'list', '--json')).map((s: { name: string }) => s.name)
    const cases: Array<[string[], number, RegExp]> = [
      [['image', 'import', src, 'vm'], 4, /image 'vm' already exists/],
      [['image', 'import', join(dir, 'absent.raw'), 'new1'], 3, /cannot read .*absent\.raw: no such file or directory/],
      [['image', 'import', dir, 'new2'], 2, /is not a regular file/],
      [['image', 'import', src, 'new3', '-b', '3000'], 2, /block_size 3000 must be a power of two/],
      [['image', 'import', src, 'new4', '-b', '8M'], 2, /block_size 8388608 is larger than size/],
      [['image', 'import', src, 'bad/name'], 2, /invalid image name/],
      [['image', 'import', src], 2, /missing required argument 'NAME'/],
      [['image', 'import', src, 'small', '--resume', '-b', '1M'], 2, /has blocks of/],
      [['image', 'export', 'nope', join(dir, 'nope.raw')], 3, /image 'nope' not found/]
    ]
    await writeFile(join(dir, 'empty.raw'), '')
    cases.push([['image', 'import', join(dir, 'empty.raw'), 'new5'], 2, /is empty/])
    for (const [args, code, message] of cases) {
      const r = await A.cli(...args)
      assert.equal(r.code, code, `${args.join(' ')}: ${r.stderr}`)
      assert.match(r.stderr, message)
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr)
    }
    assert.deepEqual(JSON.parse(await A.cliOk('image', 'list', '--json')).map((s: { name: string }) => s.name), before)
    await assert.rejects(lstat(join(dir, 'nope.raw')))
    // An existing file is kept unless --force.
    const target = join(dir, 'keep.raw')
    await writeFile(target, 'keep me')
    const r = await A.cli('image', 'export', 'small', target)
    assert.equal(r.code, 4, r.stderr)
    assert.match(r.stderr, /keep\.raw already exists; give --force to replace it/)
    assert.equal(await readFile(target, 'utf8'), 'keep me')
    await A.cliOk('image', 'export', 'small', target, '--force')
    await runOk('cmp', [src, target])
    // No temporary file is left next to it.
    assert.deepEqual((await readdir(dir)).filter((f) => f.includes('ukai-export')), [])
  })

  test('the writer lease applies: an import into an image another node writes is refused', async () => {
    const c = await NbdClient.connect({ path: B.nbdSocket! }, 'small', { timeoutMs: 30_000 })
    try {
      await c.write(0, Buffer.alloc(4096, 1))
      const r = await A.cli('image', 'import', join(dir, 'small.raw'), 'small', '--resume')
      assert.equal(r.code, 5, r.stderr)
      assert.match(r.stderr, /image 'small' is open for writing on node/)
    } finally { await c.close() }
  })

  test('an interrupted import says where it stopped, and --resume completes it', async () => {
    const src = join(dir, 'full.raw')
    // 192 MiB with no zero page: every byte is sent.
    const piece = randomBytes(MiB)
    const fh = await open(src, 'w')
    try {
      for (let i = 0; i < 192; i++) { piece.writeUInt32LE(i, 0); await fh.write(piece, 0, MiB, i * MiB) }
    } finally { await fh.close() }
    const child = spawn(process.execPath, [CLI, '--config', A.configPath, 'image', 'import', src, 'full', '--json', '-l', A.id, '-l', B.id], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    let signalled = false
    child.stdout.on('data', (c: Buffer) => {
      stdout += c.toString()
      // Once the first progress line is out, Ctrl-C.
      if (!signalled && stdout.includes('"progress"')) { signalled = true; child.kill('SIGINT') }
    })
    child.stderr.on('data', (c: Buffer) => { stderr += c.toString() })
    const [code] = await once(child, 'close') as [number | null]
    assert.ok(signalled, `the import ended before its first progress line: ${stdout}`)
    assert.equal(code, 9, stderr)
    assert.match(stderr, /import of .*full\.raw into image 'full' stopped after .* \(interrupted \(SIGINT\)\); the image is incomplete: run the same import again with --resume, or remove it with 'ukai image destroy full'/)
    // The session ended with the CLI: nobody has the image open.
    assert.deepEqual(JSON.parse(await A.cliOk('image', 'info', 'full', '--json')).open, [])
    await A.cliOk('image', 'import', src, 'full', '--resume')
    const back = join(dir, 'full.back')
    await A.cliOk('image', 'export', 'full', back)
    await runOk('cmp', [src, back])
    assert.deepEqual(await cluster.checkReplicas('full'), [])
  })

  test('qcow2 through a raw file, and straight into the NBD export with qemu-img convert -n', async (t) => {
    if (!await needs(t, 'qemu-img', 'qemu-io')) return
    const qcow = join(dir, 'disk.qcow2')
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '64M'])
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 3M', '-c', 'write -P 0xa5 40M 64k', '-c', 'write -P 0x11 63M 1M', qcow])
    // The README's first way.
    const raw = join(dir, 'disk.raw')
    await runOk('qemu-img', ['convert', '-O', 'raw', qcow, raw])
    await A.cliOk('image', 'import', raw, 'vm1', '-l', A.id, '-l', B.id)
    // Its second: into an image made for it, through the NBD export.
    await A.cliOk('image', 'create', 'vm2', '-s', '64M', '-l', A.id, '-l', B.id)
    const url = (name: string): string => `nbd+unix:///${name}?socket=${A.nbdSocket!}`
    await runOk('qemu-img', ['convert', '-n', '-O', 'raw', qcow, url('vm2')])
    for (const name of ['vm1', 'vm2']) {
      const cmp = await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow, url(name)])
      assert.match(cmp, /Images are identical/)
      assert.deepEqual(await cluster.checkReplicas(name), [])
    }
    const back = join(dir, 'vm2.raw')
    await A.cliOk('image', 'export', 'vm2', back)
    await runOk('cmp', [raw, back])
  })
})
