/**
 * The NBD export through real clients: qemu-img, qemu-io (QEMU's NBD
 * client), nbdinfo and nbdcopy (libnbd). The node and its NbdServer run in
 * this process; the clients are child processes spawned asynchronously.
 * A test is skipped only when its client binary is not installed.
 */
import { after, before, describe, test, type TestContext } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { open, readFile, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { NbdServer } from '../src/frontends/nbd/server.js'
import { startNbd, type NbdFixture } from './helpers/nbd.js'
import { freePort, run, type RunResult } from './helpers/node-process.js'

const MiB = 2 ** 20
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

const available = new Map<string, Promise<boolean>>()
/** True when `cmd` can be run (it answers --version). */
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

/** Skips the test unless every command is installed. */
async function needs (t: TestContext, ...cmds: string[]): Promise<boolean> {
  for (const c of cmds) {
    if (!await have(c)) {
      t.skip(`${c} is not installed`)
      return false
    }
  }
  return true
}

function ok (r: RunResult, what: string): RunResult {
  assert.equal(r.code, 0, `${what} failed (${r.code}):\n${r.stdout}\n${r.stderr}`)
  return r
}

/** A raw file of `size` bytes: random data in `data` ranges, zeros (holes) elsewhere. */
async function rawFile (path: string, size: number, data: Array<[number, number]>): Promise<Buffer> {
  const content = Buffer.alloc(size)
  for (const [off, len] of data) randomBytes(len).copy(content, off)
  const fh = await open(path, 'w')
  try {
    await fh.truncate(size)
    for (const [off, len] of data) await fh.write(content, off, len, off)
  } finally { await fh.close() }
  return content
}

describe('NBD export with real clients', { timeout: 300_000 }, () => {
  let fx: NbdFixture
  /** Bytes a block file has allocated (holes take none). */
  const blockAllocated = async (image: string, block: number): Promise<number> =>
    await stat(join(fx.dir, 'images', image, String(block).padStart(16, '0'))).then((s) => s.blocks * 512, () => 0)

  before(async () => {
    fx = await startNbd()
    await fx.node.createImage({ name: 'q', size: 64 * MiB, block_size: 4 * MiB })
    await fx.node.createImage({ name: 'conv', size: 24 * MiB, block_size: MiB })
    // Blocks of 2 MiB: the writes below (3 MiB, and the copies' odd offsets) cross block edges.
    await fx.node.createImage({ name: 'copy', size: 30 * MiB, block_size: 2 * MiB })
    await fx.node.createImage({ name: 'busy', size: 8 * MiB, block_size: MiB })
  })
  after(async () => { await fx?.cleanup() })

  test('qemu-img info shows the image as a raw NBD export; an unknown name is refused with the server\'s message', async (t) => {
    if (!await needs(t, 'qemu-img')) return
    const info = JSON.parse(ok(await run('qemu-img', ['info', '--output=json', fx.uri('q')]), 'qemu-img info').stdout)
    assert.equal(info['virtual-size'], 64 * MiB)
    assert.equal(info.format, 'raw')
    const missing = await run('qemu-img', ['info', fx.uri('nope')])
    assert.notEqual(missing.code, 0)
    assert.match(missing.stderr, /image 'nope' not found/)
  })

  test('qemu-io: patterns, write -f (FUA), write -z with and without -u, discard, flush, map', async (t) => {
    if (!await needs(t, 'qemu-io', 'qemu-img')) return
    const io = async (...cmds: string[]): Promise<RunResult> =>
      await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), fx.uri('q')])
    const r = ok(await io(
      'write -P 0x5a 0 3M',
      'write -f -P 0xa5 3M 1M', // FUA
      'write -P 0x11 4M 4M',
      'write -P 0x22 8M 4M',
      'read -P 0x5a 0 3M',
      'read -P 0xa5 3M 1M',
      'read -P 0x11 4M 4M',
      'write -z 1M 1M', // NBD_CMD_FLAG_NO_HOLE: zeros, still allocated
      'write -z -u 4M 4M', // may unmap: block 1 freed
      'discard 10M 2M', // the tail of block 2
      'flush',
      'read -P 0x5a 0 1M',
      'read -P 0 1M 1M',
      'read -P 0x5a 2M 1M',
      'read -P 0 4M 4M',
      'read -P 0x22 8M 2M',
      'map'
    ), 'qemu-io')
    assert.doesNotMatch(r.stdout + r.stderr, /failed/i)
    assert.match(r.stdout, /64 MiB \(0x4000000\) bytes/, 'map covers the export')
    assert.equal(await blockAllocated('q', 0), 4 * MiB, 'write -z without -u keeps the block allocated')
    assert.equal(await blockAllocated('q', 1), 0, 'write -z -u frees the block')
    assert.equal(await blockAllocated('q', 2), 2 * MiB, 'discard freed the tail of the block')
    // The allocation as QEMU sees it through NBD_CMD_BLOCK_STATUS.
    const map = JSON.parse(ok(await run('qemu-img', ['map', '--output=json', '-f', 'raw', fx.uri('q')]), 'qemu-img map').stdout) as Array<{ start: number, length: number, data: boolean, zero: boolean }>
    const at = (off: number): { data: boolean, zero: boolean } => map.find((e) => e.start <= off && off < e.start + e.length)!
    assert.deepEqual([at(0).data, at(4 * MiB).data, at(4 * MiB).zero, at(8 * MiB).data, at(10 * MiB).data, at(10 * MiB).zero],
      [true, false, true, true, false, true])
    // A write past the end and a mismatched pattern fail (the checks above can fail).
    assert.notEqual((await io('write 64M 512')).code, 0)
    assert.notEqual((await io('read -P 0x77 0 512')).code, 0)
  })

  test('qemu-img convert of a raw file into the export and back gives the same SHA-256', async (t) => {
    if (!await needs(t, 'qemu-img')) return
    const src = join(fx.dir, 'conv-src.raw')
    const back = join(fx.dir, 'conv-back.raw')
    const content = await rawFile(src, 24 * MiB, [[0, 5 * MiB + 123], [7 * MiB, 3 * MiB], [20 * MiB - 4096, 4096 * 3]])
    ok(await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, fx.uri('conv')]), 'qemu-img convert in')
    ok(await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', fx.uri('conv'), back]), 'qemu-img convert out')
    assert.equal(sha(await readFile(back)), sha(content))
    // Also in the block files: what the volume stored is what was sent.
    const blocks: Buffer[] = []
    for (let b = 0; b < 24; b++) {
      const f = await readFile(join(fx.dir, 'images', 'conv', String(b).padStart(16, '0'))).catch(() => Buffer.alloc(0))
      blocks.push(Buffer.concat([f, Buffer.alloc(MiB - f.length)]))
    }
    assert.equal(sha(Buffer.concat(blocks)), sha(content))
  })

  test('nbdinfo --list names every image; nbdinfo --map shows data and holes', async (t) => {
    if (!await needs(t, 'nbdinfo', 'qemu-io')) return
    const list = JSON.parse(ok(await run('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${fx.socket}`]), 'nbdinfo --list').stdout)
    assert.deepEqual(list.exports.map((e: { 'export-name': string }) => e['export-name']).sort(), ['busy', 'conv', 'copy', 'q'])
    assert.equal(list.protocol, 'newstyle-fixed')
    assert.equal(list.structured, true)
    const one = list.exports.find((e: { 'export-name': string }) => e['export-name'] === 'copy')
    assert.equal(one['export-size'], 30 * MiB)
    assert.deepEqual(one.contexts, ['base:allocation'])
    assert.equal(one.is_read_only, false)
    assert.equal(one.can_fua, true)
    assert.equal(one.can_zero, true)
    assert.equal(one.can_fast_zero, true)
    // Data in blocks 0 (all), 1 (first 1 MiB), 3 (first 1 MiB); nothing elsewhere.
    ok(await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 3M', '-c', 'write -P 2 6M 1M', fx.uri('copy')]), 'qemu-io')
    const map = ok(await run('nbdinfo', ['--map', fx.uri('copy')]), 'nbdinfo --map').stdout
    const rows = map.trim().split('\n').map((l) => l.trim().split(/\s+/)).map(([off, len, type]) => [Number(off), Number(len), Number(type)])
    assert.deepEqual(rows, [[0, 3 * MiB, 0], [3 * MiB, 3 * MiB, 3], [6 * MiB, MiB, 0], [7 * MiB, 23 * MiB, 3]])
  })

  test('nbdcopy both ways gives the same SHA-256', async (t) => {
    if (!await needs(t, 'nbdcopy')) return
    const src = join(fx.dir, 'copy-src.raw')
    const back = join(fx.dir, 'copy-back.raw')
    const content = await rawFile(src, 30 * MiB, [[MiB + 17, 7 * MiB], [12 * MiB, 512], [29 * MiB, MiB]])
    ok(await run('nbdcopy', [src, fx.uri('copy')]), 'nbdcopy in')
    ok(await run('nbdcopy', [fx.uri('copy'), back]), 'nbdcopy out')
    assert.equal(sha(await readFile(back)), sha(content))
  })

  test('TCP: a HOST:PORT listener serves the same exports', async (t) => {
    if (!await needs(t, 'qemu-img')) return
    const server = new NbdServer(fx.node)
    const port = await freePort()
    await server.listen(`127.0.0.1:${port}`)
    try {
      const info = JSON.parse(ok(await run('qemu-img', ['info', '--output=json', `nbd://127.0.0.1:${port}/q`]), 'qemu-img info over TCP').stdout)
      assert.equal(info['virtual-size'], 64 * MiB)
    } finally { await server.close() }
  })

  test('a second writer is served read-only: nbdinfo shows it, qemu-io writes fail, reads work', async (t) => {
    if (!await needs(t, 'nbdinfo', 'qemu-io')) return
    const volume = await fx.node.acquireVolume('busy')
    const end = volume.open(true, 'the FUSE mount')
    try {
      const info = JSON.parse(ok(await run('nbdinfo', ['--json', fx.uri('busy')]), 'nbdinfo').stdout)
      assert.equal(info.exports[0].is_read_only, true)
      assert.equal(info.exports[0].can_multi_conn, true)
      ok(await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0 0 1M', fx.uri('busy')]), 'qemu-io read')
      assert.notEqual((await run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', fx.uri('busy')])).code, 0)
    } finally {
      end()
      await fx.node.releaseVolume(volume)
    }
    ok(await run('qemu-io', ['-f', 'raw', '-c', 'write -P 9 0 512', fx.uri('busy')]), 'qemu-io write once the writer left')
  })
})
