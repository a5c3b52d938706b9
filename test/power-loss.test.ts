/**
 * Power-loss tests. SIGKILL is not power loss: a killed process leaves its
 * writes in the page cache, so a missing fsync cannot fail a crash test.
 * Here the node's files live on the power-loss layer
 * (test/tools/powerloss-fs.ts), which keeps everything not yet fsynced in
 * memory and throws it away when the power is cut; a node killed with the
 * power then restarts on what was durable.
 *
 * First the layer itself, then UKAI on it. Skipped, with the reason, when
 * FUSE is not available.
 */
import { after, before, describe, test, type TestContext } from 'node:test'
import assert from 'node:assert/strict'
import { open, readdir, readFile, rename, mkdir, stat, truncate, unlink, writeFile } from 'node:fs/promises'
import { constants as fsConstants } from 'node:fs'
import { join } from 'node:path'
import { encodeStored } from '../src/metadata/codec.js'
import { FileCore } from '../src/metadata/file-core.js'
import { ImageMeta } from '../src/metadata/image.js'
import { MetadataStore, type ImageState } from '../src/metadata/store.js'
import { NbdClient } from '../src/peer/nbd-client.js'
import { prng } from './helpers/assertions.js'
import { TestNode, freePort, run } from './helpers/node-process.js'
import { PowerLossFs, powerLossUnavailable } from './helpers/powerloss.js'

const skip = await powerLossUnavailable()

async function fsyncPath (path: string, datasync = false): Promise<void> {
  const fh = await open(path, 'r')
  try { await (datasync ? fh.datasync() : fh.sync()) } finally { await fh.close() }
}

async function exists (path: string): Promise<boolean> {
  return await stat(path).then(() => true, () => false)
}

/** Writes `data` at `pos` through a handle, fsyncing it (or not). */
async function writeAt (path: string, data: string | Buffer, pos: number, sync: 'fsync' | 'fdatasync' | 'none', flags = 'r+'): Promise<void> {
  const fh = await open(path, flags)
  try {
    await fh.write(typeof data === 'string' ? Buffer.from(data) : data, 0, data.length, pos)
    if (sync === 'fsync') await fh.sync()
    if (sync === 'fdatasync') await fh.datasync()
  } finally { await fh.close() }
}

describe('the power-loss layer', { skip, timeout: 120_000 }, () => {
  let layer: PowerLossFs
  before(async () => { layer = await PowerLossFs.start() })
  after(async () => { await layer?.destroy() })

  /** The power goes and comes back. */
  const powerCycle = async (): Promise<string[]> => {
    const discarded = await layer.cut()
    await layer.restart()
    return discarded
  }

  test('a write without fsync is gone after a cut; with fsync (or fdatasync) it stays', async () => {
    const f = layer.path('data')
    await writeFile(f, 'old contents')
    await layer.sync()

    await writeAt(f, 'NEW', 0, 'none')
    // Before the cut every reader sees the write, as with a page cache.
    assert.equal(await readFile(f, 'utf8'), 'NEW contents')
    const discarded = await powerCycle()
    assert.ok(discarded.some((l) => l.startsWith('data of /data')), discarded.join('\n'))
    assert.equal(await readFile(f, 'utf8'), 'old contents')

    await writeAt(f, 'NEW', 0, 'fsync')
    await powerCycle()
    assert.equal(await readFile(f, 'utf8'), 'NEW contents')

    // fdatasync makes a grown size durable too.
    await writeAt(f, ' and more', 12, 'fdatasync')
    await writeAt(f, '!', 21, 'none')
    await powerCycle()
    assert.equal(await readFile(f, 'utf8'), 'NEW contents and more')
  })

  test('a large sparse write: only the fsynced pages survive, holes read as zeros', async () => {
    const f = layer.path('big')
    await writeFile(f, '')
    await layer.sync()
    const a = Buffer.alloc(300_000, 0xaa)
    const b = Buffer.alloc(200_000, 0xbb)
    await writeAt(f, a, 1_000_000, 'fsync')
    await writeAt(f, b, 1_100_000, 'none')
    const before = await readFile(f)
    assert.equal(before.length, 1_300_000)
    assert.ok(before.subarray(1_100_000).equals(b))
    await powerCycle()
    const got = await readFile(f)
    assert.equal(got.length, 1_300_000)
    assert.ok(got.subarray(0, 1_000_000).equals(Buffer.alloc(1_000_000)))
    assert.ok(got.subarray(1_000_000).equals(a))
  })

  test('a rename without an fsync of its directory is undone; with it it stays (the atomic-replace pattern)', async () => {
    const dir = layer.path('shards')
    await mkdir(dir)
    await writeFile(join(dir, 'shard.json'), 'version 1')
    await layer.sync()

    const replace = async (text: string, syncDir: boolean): Promise<void> => {
      const tmp = join(dir, '.shard.json.tmp')
      await writeAt(tmp, text, 0, 'fsync', 'w')
      await rename(tmp, join(dir, 'shard.json'))
      if (syncDir) await fsyncPath(dir)
    }
    await replace('version 2', false)
    assert.equal(await readFile(join(dir, 'shard.json'), 'utf8'), 'version 2')
    const discarded = await powerCycle()
    assert.ok(discarded.some((l) => l.startsWith('entries of /shards')), discarded.join('\n'))
    assert.equal(await readFile(join(dir, 'shard.json'), 'utf8'), 'version 1')
    assert.deepEqual(await readdir(dir), ['shard.json'], 'the temp file was never durable')

    await replace('version 3', true)
    await powerCycle()
    assert.equal(await readFile(join(dir, 'shard.json'), 'utf8'), 'version 3')
    assert.deepEqual(await readdir(dir), ['shard.json'])

    // The directory fsynced without the file: the new name is there, with
    // what the file had durably (nothing).
    const tmp = join(dir, '.shard.json.tmp')
    await writeAt(tmp, 'version 4', 0, 'none', 'w')
    await rename(tmp, join(dir, 'shard.json'))
    await fsyncPath(dir)
    await powerCycle()
    assert.equal(await readFile(join(dir, 'shard.json'), 'utf8'), '')
  })

  test('create + write + fsync of the file but not of its directory loses the file (as ext4 may)', async () => {
    const dir = layer.path('new-files')
    await mkdir(dir)
    await layer.sync()
    await writeAt(join(dir, 'lost'), 'fsynced, but its name never was', 0, 'fsync', 'w')
    await writeAt(join(dir, 'kept'), 'fsynced, and its directory too', 0, 'fsync', 'w')
    assert.equal(await readFile(join(dir, 'lost'), 'utf8'), 'fsynced, but its name never was')
    await powerCycle()
    assert.deepEqual(await readdir(dir), [])

    await writeAt(join(dir, 'kept'), 'fsynced, and its directory too', 0, 'fsync', 'w')
    await fsyncPath(dir)
    await powerCycle()
    assert.deepEqual(await readdir(dir), ['kept'])
    assert.equal(await readFile(join(dir, 'kept'), 'utf8'), 'fsynced, and its directory too')
  })

  test('unlink, mkdir and truncate are volatile until the right fsync', async () => {
    await writeFile(layer.path('victim'), 'still here')
    await writeFile(layer.path('shrink'), '0123456789')
    await layer.sync()

    await unlink(layer.path('victim'))
    await truncate(layer.path('shrink'), 4)
    await mkdir(layer.path('sub'))
    await writeAt(layer.path('sub', 'inner'), 'inner data', 0, 'fsync', 'w')
    await fsyncPath(layer.path('sub'))
    assert.equal(await exists(layer.path('victim')), false)
    assert.equal((await stat(layer.path('shrink'))).size, 4)
    await powerCycle()
    assert.equal(await readFile(layer.path('victim'), 'utf8'), 'still here', 'the unlink was never durable')
    assert.equal(await readFile(layer.path('shrink'), 'utf8'), '0123456789', 'the truncate was never durable')
    assert.equal(await exists(layer.path('sub')), false, 'a new directory goes with its parent\'s entries')

    await unlink(layer.path('victim'))
    await truncate(layer.path('shrink'), 4)
    await fsyncPath(layer.path('shrink'), true)
    await mkdir(layer.path('sub'))
    await writeAt(layer.path('sub', 'inner'), 'inner data', 0, 'fsync', 'w')
    await fsyncPath(layer.path('sub'))
    await fsyncPath(layer.mountpoint)
    await powerCycle()
    assert.equal(await exists(layer.path('victim')), false)
    assert.equal(await readFile(layer.path('shrink'), 'utf8'), '0123')
    assert.equal(await readFile(layer.path('sub', 'inner'), 'utf8'), 'inner data')
  })

  test('a rename between directories is made durable by each directory\'s own fsync', async () => {
    await mkdir(layer.path('from'))
    await mkdir(layer.path('to'))
    await writeFile(layer.path('from', 'moving'), 'moving data')
    await layer.sync()
    await rename(layer.path('from', 'moving'), layer.path('to', 'moving'))
    await fsyncPath(layer.path('to'))
    await powerCycle()
    // Only the destination was synced: the file is in both (the model's worst case).
    assert.equal(await readFile(layer.path('from', 'moving'), 'utf8'), 'moving data')
    assert.equal(await readFile(layer.path('to', 'moving'), 'utf8'), 'moving data')
  })

  test('O_DSYNC writes are durable when write(2) returns', async () => {
    await writeFile(layer.path('dsync'), 'aaaa')
    await layer.sync()
    const fh = await open(layer.path('dsync'), fsConstants.O_RDWR | fsConstants.O_DSYNC)
    try { await fh.write(Buffer.from('bb'), 0, 2, 1) } finally { await fh.close() }
    await powerCycle()
    assert.equal(await readFile(layer.path('dsync'), 'utf8'), 'abba')
  })

  test('a file replaced by rename is never missing for readers in other processes (atomic replace, as on a real file system)', async () => {
    const dir = layer.path('atomic')
    await mkdir(dir)
    await writeFile(join(dir, 'f.json'), '{"v":0}')
    const writer = `
      import { open, rename } from 'node:fs/promises'
      const dir = process.argv[1]
      const end = Date.now() + 1500
      for (let i = 1; Date.now() < end; i++) {
        const fh = await open(dir + '/.tmp' + i, 'w'); await fh.writeFile('{"v":' + i + '}'); await fh.sync(); await fh.close()
        await rename(dir + '/.tmp' + i, dir + '/f.json')
      }`
    const reader = `
      import { readFile } from 'node:fs/promises'
      const dir = process.argv[1]
      let reads = 0, failures = 0
      const end = Date.now() + 1500
      while (Date.now() < end) { reads++; try { JSON.parse(await readFile(dir + '/f.json', 'utf8')) } catch { failures++ } }
      process.stdout.write(JSON.stringify({ reads, failures }))`
    const runs = await Promise.all([writer, reader, reader].map(async (code) => await run(process.execPath, ['--input-type=module', '-e', code, dir])))
    for (const r of runs) assert.equal(r.code, 0, r.stderr)
    for (const r of runs.slice(1)) {
      const { reads, failures } = JSON.parse(r.stdout) as { reads: number, failures: number }
      assert.ok(reads > 100, `only ${reads} reads`)
      assert.equal(failures, 0, `${failures} of ${reads} reads found the file missing or torn`)
    }
  })

  test('an unlinked file stays readable and writable through its open handle', async () => {
    await writeFile(layer.path('doomed'), 'doomed data')
    await layer.sync()
    const fh = await open(layer.path('doomed'), 'r+')
    try {
      await unlink(layer.path('doomed'))
      assert.equal(await exists(layer.path('doomed')), false)
      await fh.write(Buffer.from('DOOMED'), 0, 6, 0)
      const buf = Buffer.alloc(11)
      await fh.read(buf, 0, 11, 0)
      assert.equal(buf.toString(), 'DOOMED data')
      await fh.sync() // the unlink is not durable yet: the durable name gets the data
    } finally { await fh.close() }
    await powerCycle()
    assert.equal(await readFile(layer.path('doomed'), 'utf8'), 'DOOMED data')
  })

  test('sync makes the whole tree durable: the backing directory is then the mount', async () => {
    await mkdir(layer.path('tree', 'a', 'b'), { recursive: true })
    await writeFile(layer.path('tree', 'a', 'b', 'leaf'), 'leaf')
    await writeFile(layer.path('tree', 'top'), Buffer.alloc(70_000, 7))
    assert.ok((await layer.status()).volatile.length > 0)
    await layer.sync()
    assert.deepEqual((await layer.status()).volatile, [])
    assert.equal(await readFile(join(layer.backing, 'tree', 'a', 'b', 'leaf'), 'utf8'), 'leaf')
    assert.ok((await readFile(join(layer.backing, 'tree', 'top'))).equals(Buffer.alloc(70_000, 7)))
    assert.deepEqual(await powerCycle(), [])
    assert.equal(await readFile(layer.path('tree', 'a', 'b', 'leaf'), 'utf8'), 'leaf')
  })
})

// ---- UKAI on the layer ------------------------------------------------------------------

const KiB = 1024
const MiB = 2 ** 20
const SECTOR = 4 * KiB

/** Layers, nodes and NBD clients of one test, all ended (by PID) and removed when it ends, pass or fail. */
class Rig {
  readonly layers: PowerLossFs[] = []
  readonly nodes: TestNode[] = []
  readonly clients: NbdClient[] = []

  constructor (t: TestContext) {
    t.after(async () => await this.destroy())
  }

  async layer (): Promise<PowerLossFs> {
    const l = await PowerLossFs.start()
    this.layers.push(l)
    return l
  }

  /** A node serving NBD (its socket and config outside the layer) with its image_root on `layer` and its metadata at `metadataRoot`. */
  async node (layer: PowerLossFs, name: string, metadataRoot: string): Promise<TestNode> {
    const n = await TestNode.start({
      nbd: true,
      config: { image_root: layer.path(name, 'images'), metadata_root: metadataRoot, io_timeout: 3, retry_after: 30 }
    })
    this.nodes.push(n)
    return n
  }

  async client (n: TestNode, image: string): Promise<NbdClient> {
    const c = await NbdClient.connect({ path: n.nbdSocket! }, image, { timeoutMs: 30_000 })
    this.clients.push(c)
    return c
  }

  async destroy (): Promise<void> {
    for (const c of this.clients) await c.close().catch(() => {})
    for (const n of this.nodes) await n.destroy().catch(() => {})
    for (const l of this.layers) await l.destroy().catch(() => {})
  }
}

async function cli (n: TestNode, ...args: string[]): Promise<string> {
  const r = await n.cli(...args)
  assert.equal(r.code, 0, `ukai ${args.join(' ')}: exit ${r.code}\n${r.stderr}${r.stdout}`)
  return r.stdout
}

/** The image's state as the (embedded) store at `metadataRoot` holds it, read from this process. */
async function readState (metadataRoot: string, name: string): Promise<ImageState> {
  const store = new MetadataStore(await FileCore.open(metadataRoot), 22222)
  try {
    return await store.requireState(name)
  } finally {
    await store.close()
  }
}

/**
 * Waits until nobody writes the image any more as the store says (the
 * writer lease given back, the dirty-block log emptied): a client's close
 * returns before its node has let go.
 */
/**
 * n1 (the writer) and the metadata on one machine, n2 on another: an
 * image on both, all of it written and flushed (pattern `seed`), then its
 * first 2 MiB (blocks 0 and 1) written again (pattern `seed + 1`) and not
 * flushed, through the client `c` that stays open.
 */
async function peerWritesUnflushed (t: TestContext, seed: number): Promise<{ rig: Rig, lb: PowerLossFs, meta: string, n1: TestNode, n2: TestNode, base: Buffer, c: NbdClient, fresh: Buffer }> {
  const rig = new Rig(t)
  const la = await rig.layer()
  const lb = await rig.layer()
  const meta = la.path('metadata')
  const n1 = await rig.node(la, 'n1', meta)
  const n2 = await rig.node(lb, 'n2', meta)
  await cli(n1, 'image', 'create', 'img', '-s', '4M', '-b', '1M', '-l', n1.id, '-l', n2.id)
  const base = pattern(seed, 4 * MiB)
  let c = await rig.client(n1, 'img')
  await c.write(0, base)
  await c.flush()
  await c.close()
  await released(meta, 'img')
  await la.sync()
  await lb.sync()
  c = await rig.client(n1, 'img')
  const fresh = pattern(seed + 1, 2 * MiB)
  await c.write(0, fresh)
  return { rig, lb, meta, n1, n2, base, c, fresh }
}

async function released (metadataRoot: string, name: string): Promise<ImageState> {
  const deadline = Date.now() + 20_000
  for (;;) {
    const st = await readState(metadataRoot, name)
    if (st.writer === undefined && st.dirty.isEmpty && st.opens.every((o) => o.writers === 0)) return st
    if (Date.now() > deadline) {
      throw new Error(`image '${name}' is still written after 20 s: writer ${JSON.stringify(st.writer)}, log ${JSON.stringify(st.dirty.toJSON())}, opens ${JSON.stringify(st.opens)}`)
    }
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

/** Block `b` of `image` as node `n` holds it on disk (through the mount), padded with zeros; undefined without the image's directory. */
async function blockOnDisk (n: TestNode, image: string, b: number, length: number): Promise<Buffer | undefined> {
  try {
    if (!(await stat(join(n.imageRoot, image))).isDirectory()) return undefined
  } catch { return undefined }
  let data: Buffer
  try {
    data = await readFile(join(n.imageRoot, image, String(b).padStart(16, '0')))
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
    data = Buffer.alloc(0)
  }
  return Buffer.concat([data.subarray(0, length), Buffer.alloc(Math.max(0, length - data.length))])
}

/**
 * What an image may hold after a cut: `flushed` is what an acknowledged
 * flush covered; each unflushed write may or may not be there, sector by
 * sector, but nothing else may (no garbage).
 */
class Expectation {
  readonly flushed: Buffer
  /** What the image held when the test began (to tell old data from garbage in messages). */
  private readonly initial: Buffer
  private unflushed: Array<{ offset: number, data: Buffer }> = []
  private pending: Array<{ offset: number, data: Buffer }> = []

  constructor (initial: Buffer) {
    this.flushed = Buffer.from(initial)
    this.initial = Buffer.from(initial)
  }

  write (offset: number, data: Buffer): void { this.pending.push({ offset, data: Buffer.from(data) }) }
  zero (offset: number, length: number): void { this.write(offset, Buffer.alloc(length)) }
  /** An acknowledged flush: everything written so far is in `flushed`. */
  flush (): void {
    for (const w of this.pending) w.data.copy(this.flushed, w.offset)
    this.pending = []
  }

  /** Writes after the last flush stay candidates. */
  cut (): void {
    this.unflushed.push(...this.pending)
    this.pending = []
  }

  /**
   * Problems of `got` (bytes [at, at + got.length) of the image), one line
   * per block of `blockSize` bytes with sectors that are neither the
   * flushed data nor an unflushed write.
   */
  check (got: Buffer, at = 0, blockSize = MiB): string[] {
    const bad = new Map<number, { zeros: number, old: number, other: number, first: number }>()
    for (let off = 0; off < got.length; off += SECTOR) {
      const pos = at + off
      const sector = got.subarray(off, off + SECTOR)
      if (sector.equals(this.flushed.subarray(pos, pos + sector.length))) continue
      const candidates = this.unflushed.filter((w) => pos >= w.offset && pos + sector.length <= w.offset + w.data.length)
      if (candidates.some((w) => sector.equals(w.data.subarray(pos - w.offset, pos - w.offset + sector.length)))) continue
      const block = Math.floor(pos / blockSize)
      let b = bad.get(block)
      if (b === undefined) { b = { zeros: 0, old: 0, other: 0, first: pos }; bad.set(block, b) }
      if (sector.equals(this.initial.subarray(pos, pos + sector.length))) b.old++
      else if (sector.every((x) => x === 0)) b.zeros++
      else b.other++
    }
    return [...bad].map(([block, b]) => `block ${block}: ${b.zeros + b.old + b.other} sector(s) from byte ${b.first} are neither what a flush acknowledged nor a later write ` +
      `(${b.old} hold the data from before the acknowledged writes, ${b.zeros} zeros, ${b.other} other bytes)`)
  }
}

function pattern (seed: number, length: number): Buffer {
  const r = prng(seed)
  const b = Buffer.allocUnsafe(length)
  for (let i = 0; i < length; i += 4) b.writeUInt32LE(Math.floor(r() * 2 ** 32), i)
  return b
}

/**
 * Every replica of every block as the nodes hold it on disk, against the
 * durable metadata: in-sync replicas of a block outside the dirty-block
 * log must be equal, and with `model`, every in-sync replica must be what
 * it allows. Returns one line per problem.
 */
async function checkReplicasOnDisk (nodes: TestNode[], st: ImageState, model?: Expectation): Promise<string[]> {
  const meta = st.meta
  const problems: string[] = []
  for (let b = 0; b < meta.blockCount; b++) {
    const length = meta.blockLength(b)
    let first: { location: string, data: Buffer } | undefined
    for (const { location, inSync } of meta.replicasOf(b)) {
      if (!inSync) continue
      const n = nodes.find((x) => x.id === location)
      if (n === undefined) { problems.push(`block ${b}: location ${location} is no node of the test`); continue }
      const data = await blockOnDisk(n, meta.name, b, length)
      if (data === undefined) { problems.push(`block ${b}: the replica on ${location} has no image directory`); continue }
      if (model !== undefined) for (const p of model.check(data, b * meta.blockSize, meta.blockSize)) problems.push(`${p} on ${location} (in sync)`)
      if (first === undefined) first = { location, data }
      else if (!st.dirty.has(b) && !data.equals(first.data)) {
        problems.push(`block ${b}: in-sync replicas on ${first.location} and ${location} differ and the block is not in the dirty-block log`)
      }
    }
  }
  return problems
}

describe('UKAI on the power-loss layer', { skip, timeout: 600_000 }, () => {
  test('metadata: an acknowledged change (create, add-hypervisor) survives a power cut right after the command, and the store opens cleanly', async (t) => {
    const rig = new Rig(t)
    const layer = await rig.layer()
    const node = await rig.node(layer, 'n1', layer.path('metadata'))
    // The node's directories, made at its first start, are durable (as the
    // kernel's writeback makes them in 30 s); the next test is about them.
    await layer.sync()

    await cli(node, 'image', 'create', 'img', '-s', '4M', '-b', '1M')
    await cli(node, 'image', 'add-hypervisor', 'img', '10.9.8.7')
    const discarded = await layer.cut([node])
    t.diagnostic(`the cut threw away: ${discarded.join('; ') || 'nothing'}`)
    await layer.restart()

    // The store opens cleanly from here, and from the node.
    const st = await readState(layer.path('metadata'), 'img')
    assert.deepEqual(st.meta.hypervisors, ['10.9.8.7'], 'the acknowledged add-hypervisor was lost')
    await node.launch()
    const info = JSON.parse(await cli(node, 'image', 'info', 'img', '--json')) as { hypervisors: string[], size: number }
    assert.deepEqual(info.hypervisors, ['10.9.8.7'])
    assert.equal(info.size, 4 * MiB)
    const shards = await readdir(layer.path('metadata', 'shards'))
    assert.ok(shards.every((f) => !f.endsWith('.tmp')), `temp files left after the open: ${shards.join(', ')}`)
    // And it takes changes again.
    await cli(node, 'image', 'remove-hypervisor', 'img', '10.9.8.7')
  })

  test('first start: an image created right after a node\'s first start survives a power cut (the directories the node made are durable)', async (t) => {
    const rig = new Rig(t)
    const layer = await rig.layer()
    const node = await rig.node(layer, 'n1', layer.path('metadata'))
    await cli(node, 'image', 'create', 'img', '-s', '4M', '-b', '1M')
    const discarded = await layer.cut([node])
    await layer.restart()
    await node.launch()
    const r = await node.cli('image', 'info', 'img', '--json')
    assert.equal(r.code, 0,
      'the acknowledged image create was lost with the power: the node made metadata_root/shards (FileCore.open) and image_root (UkaiNode.start) ' +
      'with mkdir and never fsynced their parent directories, so the shard files fsynced inside them are not reachable after the cut. ' +
      `The cut threw away: ${discarded.join('; ')}. ukai: ${r.stderr.trim()}`)
  })

  test('image create: the replica directory of an acknowledged image survives a power cut (it reads as zeros, not as errors)', async (t) => {
    const rig = new Rig(t)
    const layer = await rig.layer()
    const node = await rig.node(layer, 'n1', layer.path('metadata'))
    await layer.sync()
    await cli(node, 'image', 'create', 'img', '-s', '4M', '-b', '1M')
    const discarded = await layer.cut([node])
    await layer.restart()
    await node.launch()
    assert.ok((await readState(layer.path('metadata'), 'img')).meta.size === 4 * MiB, 'the image metadata is durable')
    const dirThere = await stat(join(node.imageRoot, 'img')).then(() => true, () => false)
    const c = await rig.client(node, 'img')
    const buf = Buffer.alloc(MiB, 1)
    const read = await c.read(0, buf).then(() => undefined, (err: Error) => err.message)
    assert.ok(dirThere && read === undefined,
      `the image's replica directory ${join(node.imageRoot, 'img')} is ${dirThere ? 'there' : 'gone'} after the cut and a read ${read === undefined ? 'worked' : `failed: ${read}`}: ` +
      'BlockStore.allocate makes it with mkdir and nothing fsyncs image_root afterwards, so the create was acknowledged with a directory entry that was not durable. ' +
      `The cut threw away: ${discarded.join('; ')}`)
    assert.ok(buf.equals(Buffer.alloc(MiB)))
  })

  test('data, one node: what a FLUSH acknowledged reads back after a power cut (overwrites, zeroed ranges, a shortened block file); later writes are old or new, never garbage', async (t) => {
    const rig = new Rig(t)
    const layer = await rig.layer()
    const node = await rig.node(layer, 'n1', layer.path('metadata'))
    const size = 8 * MiB
    await cli(node, 'image', 'create', 'img', '-s', '8M', '-b', '1M')
    // Every block file exists, durably, before the test (the next test is
    // about files made by a write); block 7 is written only in part.
    const usedBefore = 7 * MiB + 4 * KiB
    const base = Buffer.concat([pattern(1, usedBefore), Buffer.alloc(size - usedBefore)])
    let c = await rig.client(node, 'img')
    await c.write(0, base.subarray(0, usedBefore))
    await c.flush()
    await c.close()
    await released(layer.path('metadata'), 'img')
    await layer.sync()

    const model = new Expectation(base)
    c = await rig.client(node, 'img')
    const write = async (offset: number, data: Buffer): Promise<void> => { await c.write(offset, data); model.write(offset, data) }
    const zero = async (offset: number, length: number): Promise<void> => { await c.writeZeroes(offset, length); model.zero(offset, length) }
    await write(MiB / 2, pattern(2, MiB)) // across blocks 0 and 1
    await write(3 * MiB + 4 * KiB, pattern(3, 64 * KiB))
    await write(6 * MiB - 8 * KiB, pattern(4, 16 * KiB)) // across 5 and 6
    await zero(5 * MiB - 256 * KiB, 256 * KiB) // the tail of block 4: the file is cut short
    await zero(7 * MiB - 128 * KiB, 64 * KiB) // inside block 6: zeros written
    await write(7 * MiB + 512 * KiB, pattern(8, 64 * KiB)) // past the end of block 7's file: it grows
    await c.flush()
    model.flush()
    // Not flushed: may or may not survive.
    await write(3 * MiB / 4, pattern(5, MiB / 2))
    await write(2 * MiB, pattern(6, 128 * KiB))
    await write(4 * MiB + 800 * KiB, pattern(7, 64 * KiB)) // past the shortened end of block 4
    model.cut()
    const discarded = await layer.cut([node])
    t.diagnostic(`the cut threw away: ${discarded.join('; ') || 'nothing'}`)
    await layer.restart()
    await node.launch()

    c = await rig.client(node, 'img')
    const got = Buffer.alloc(size)
    await c.read(0, got)
    assert.deepEqual(model.check(got), [])
    const st = await readState(layer.path('metadata'), 'img')
    assert.equal(st.meta.usedSize, size)
  })

  test('data, one node: flushed writes that created block files (after the image\'s first flush in the process) survive a power cut', async (t) => {
    const rig = new Rig(t)
    const layer = await rig.layer()
    const node = await rig.node(layer, 'n1', layer.path('metadata'))
    const size = 8 * MiB
    await cli(node, 'image', 'create', 'img', '-s', '8M', '-b', '1M')
    await layer.sync() // the image's directory is durable (see the image create test)

    const model = new Expectation(Buffer.alloc(size))
    const c = await rig.client(node, 'img')
    const a = pattern(11, MiB + MiB / 2)
    await c.write(0, a) // block files 0 and 1 made
    model.write(0, a)
    await c.flush() // the first flush of the image in this process
    model.flush()
    const b = pattern(12, MiB + MiB / 2)
    await c.write(4 * MiB, b) // block files 4 and 5 made
    model.write(4 * MiB, b)
    await c.flush()
    model.flush()
    const discarded = await layer.cut([node])
    await layer.restart()
    await node.launch()

    const c2 = await rig.client(node, 'img')
    const got = Buffer.alloc(size)
    await c2.read(0, got)
    const problems = model.check(got)
    const files = await readdir(join(node.imageRoot, 'img'))
    assert.deepEqual(problems, [],
      `flushed data lost after the cut; block files there now: ${files.join(', ') || 'none'}. ` +
      'BlockStore.flush fdatasyncs the files written since the last flush, and fsyncs the image directory only in the first flush of the image in a process ' +
      '(syncEverything): a block file created after that is fdatasynced but its directory entry never made durable. ' +
      `The cut threw away: ${discarded.join('; ')}`)
  })

  /** Two nodes with their image_root and the shared metadata_root on one layer, and a two-replica image filled with `base`, durable. */
  const twoNodes = async (rig: Rig, size: number, blockSize: number, base: Buffer): Promise<{ layer: PowerLossFs, n1: TestNode, n2: TestNode, meta: string }> => {
    const layer = await rig.layer()
    const meta = layer.path('metadata')
    const n1 = await rig.node(layer, 'n1', meta)
    const n2 = await rig.node(layer, 'n2', meta)
    await cli(n1, 'image', 'create', 'img', '-s', String(size), '-b', String(blockSize), '-l', n1.id, '-l', n2.id)
    const c = await rig.client(n1, 'img')
    await c.write(0, base)
    await c.flush()
    await c.close()
    await released(meta, 'img') // the last writer's close empties the dirty-block log
    await layer.sync()
    return { layer, n1, n2, meta }
  }

  test('data, two replicas on the layer: what a FLUSH acknowledged is on both replicas after a power cut; after reconciliation they agree', async (t) => {
    const rig = new Rig(t)
    const size = 8 * MiB
    const base = pattern(21, size)
    const { layer, n1, n2, meta } = await twoNodes(rig, size, MiB, base)

    const model = new Expectation(base)
    let c = await rig.client(n1, 'img')
    const write = async (offset: number, data: Buffer): Promise<void> => { await c.write(offset, data); model.write(offset, data) }
    await write(MiB / 2, pattern(22, MiB))
    await write(3 * MiB + 4 * KiB, pattern(23, 64 * KiB))
    await write(6 * MiB - 8 * KiB, pattern(24, 16 * KiB))
    await c.writeZeroes(5 * MiB - 256 * KiB, 256 * KiB)
    model.zero(5 * MiB - 256 * KiB, 256 * KiB)
    await c.flush()
    model.flush()
    await write(3 * MiB / 4, pattern(25, MiB / 2))
    await write(2 * MiB, pattern(26, 128 * KiB))
    model.cut()
    const discarded = await layer.cut([n1, n2])
    t.diagnostic(`the cut threw away: ${discarded.join('; ') || 'nothing'}`)
    await layer.restart()
    await n1.launch()
    await n2.launch()

    // On disk, before anyone opens the image: both replicas have what the flush acknowledged.
    let st = await readState(meta, 'img')
    assert.deepEqual([...st.meta.locations.values()].map((l) => l.outOfSync.size), [0, 0], 'no replica was marked out of sync')
    assert.deepEqual(await checkReplicasOnDisk([n1, n2], st, model), [])
    // The first open reconciles what the dead writer left in the log.
    t.diagnostic(`dirty-block log after the cut: ${JSON.stringify(st.dirty.toJSON())}`)
    c = await rig.client(n1, 'img')
    const got = Buffer.alloc(size)
    await c.read(0, got)
    assert.deepEqual(model.check(got), [])
    await c.close()
    st = await released(meta, 'img') // and the log is empty
    assert.deepEqual(await checkReplicasOnDisk([n1, n2], st, model), [])
  })

  /**
   * Rounds of: writes in flight from 12 writers (FLUSH now and then), the
   * power cut at a random moment, both nodes back; the durable log checked;
   * the image opened (which reconciles) and closed; the power cut again.
   * With `untrimmed` (at most 64 blocks) the log keeps every block written
   * since the open, so each acknowledged write's blocks must be in it.
   */
  const dirtyLogRounds = async (t: TestContext, size: number, blockSize: number, untrimmed: boolean, ms: [number, number], flushEvery: number): Promise<void> => {
    const seed = Number(process.env.UKAI_TEST_SEED ?? Date.now() % 2 ** 31)
    t.diagnostic(`seed ${seed} (set UKAI_TEST_SEED to repeat)`)
    const random = prng(seed)
    const rig = new Rig(t)
    const { layer, n1, n2, meta } = await twoNodes(rig, size, blockSize, pattern(31, size))
    const blocksOf = ([off, len]: [number, number]): number[] => {
      const out: number[] = []
      for (let b = Math.floor(off / blockSize); b * blockSize < off + len; b++) out.push(b)
      return out
    }
    let diverged = 0
    for (let round = 0; round < 3; round++) {
      const c = await rig.client(n1, 'img')
      const acked: Array<[number, number]> = []
      const inflight = new Set<[number, number]>()
      let flushes = 0
      let stop = false
      const worker = async (w: number): Promise<void> => {
        const r = prng(seed + round * 100 + w)
        while (!stop) {
          const len = SECTOR * (1 + Math.floor(r() * 48))
          const off = SECTOR * Math.floor(r() * (size - len) / SECTOR)
          const req: [number, number] = [off, len]
          inflight.add(req)
          await c.write(off, pattern(seed + acked.length * 7 + w, len))
          inflight.delete(req)
          acked.push(req)
          if (r() < flushEvery) { await c.flush(); flushes++ }
        }
      }
      const workers = Array.from({ length: 12 }, async (_, w) => await worker(w).catch(() => {}))
      await new Promise((resolve) => setTimeout(resolve, ms[0] + Math.floor(random() * (ms[1] - ms[0]))))
      const discarded = await layer.cut([n1, n2])
      const atCut = [...inflight]
      stop = true
      await Promise.all(workers)
      await c.close().catch(() => {})
      await layer.restart()
      await n1.launch()
      await n2.launch()

      const st = await readState(meta, 'img')
      const logged = atCut.flatMap(blocksOf).filter((b) => st.dirty.has(b)).length
      t.diagnostic(`round ${round}: ${acked.length} writes and ${flushes} flushes acknowledged, ${atCut.length} writes in flight at the cut ` +
        `(${logged} of their ${atCut.flatMap(blocksOf).length} block pieces logged); the cut threw away ${discarded.length} item(s); log ${JSON.stringify(st.dirty.toJSON())}; ` +
        `out of sync: ${[...st.meta.locations].map(([l, x]) => `${l} ${x.outOfSync.size}`).join(', ')}`)
      if (untrimmed) {
        const missing = new Set<number>()
        for (const w of acked) {
          for (const b of blocksOf(w)) {
            const inSync = st.meta.replicasOf(b).filter((x) => x.inSync).length
            if (inSync > 1 && !st.dirty.has(b)) missing.add(b)
          }
        }
        assert.deepEqual([...missing], [], `round ${round}: blocks with acknowledged writes missing from the durable dirty-block log ${JSON.stringify(st.dirty.toJSON())}`)
      }
      // Replicas that differ now are all in the log.
      assert.deepEqual(await checkReplicasOnDisk([n1, n2], st), [], `round ${round}`)
      for (let b = 0; b < st.meta.blockCount; b++) {
        const [x, y] = await Promise.all([blockOnDisk(n1, 'img', b, blockSize), blockOnDisk(n2, 'img', b, blockSize)])
        if (!x!.equals(y!)) diverged++
      }

      // The next open reconciles; its close empties the log.
      const r = await rig.client(n1, 'img')
      await r.read(0, Buffer.alloc(SECTOR))
      await r.close()
      let after = await released(meta, 'img') // and the log is empty
      assert.deepEqual(await checkReplicasOnDisk([n1, n2], after), [], `round ${round}: replicas differ after reconciliation`)

      // The power goes again right after: the reconciliation was durable before the log was emptied.
      await layer.cut([n1, n2])
      await layer.restart()
      await n1.launch()
      await n2.launch()
      after = await readState(meta, 'img')
      assert.deepEqual(await checkReplicasOnDisk([n1, n2], after), [], `round ${round}: after a second cut, in-sync replicas differ outside the log`)
    }
    t.diagnostic(`blocks whose replicas differed after a cut (before reconciliation): ${diverged}`)
  }

  test('the dirty-block log: after a power cut during writes it names every block written, and reconciliation leaves identical replicas (also across a second cut)', async (t) => {
    // 16 blocks: the log is trimmed only past 64, so every block written since the open stays in it.
    await dirtyLogRounds(t, 4 * MiB, 256 * KiB, true, [300, 1500], 0.15)
  })

  test('the dirty-block log trimmed after flushes (256 blocks): a block it dropped has identical replicas after a power cut', async (t) => {
    // Each new block costs a metadata write, so writes are slow here: longer rounds, more flushes.
    await dirtyLogRounds(t, 4 * MiB, 16 * KiB, false, [3000, 6000], 0.4)
  })

  test('resync: replicas a sync marked in sync hold the copied data after a power cut right after the sync (flush before the mark)', async (t) => {
    const rig = new Rig(t)
    const size = 4 * MiB
    const { layer, n1, n2, meta } = await twoNodes(rig, size, MiB, pattern(41, size))
    // n2's replica out of sync (its old block files stay), n1 written alone.
    await cli(n1, 'image', 'remove-location', 'img', n2.id)
    await cli(n1, 'image', 'add-location', 'img', n2.id)
    const fresh = pattern(42, size)
    const c = await rig.client(n1, 'img')
    await c.write(0, fresh)
    await c.flush()
    await c.close()
    await released(meta, 'img')
    await layer.sync()
    assert.equal((await readState(meta, 'img')).meta.locations.get(n2.id)!.outOfSync.size, 4)

    await cli(n1, 'sync', 'img')
    assert.equal((await readState(meta, 'img')).meta.locations.get(n2.id)!.outOfSync.size, 0)
    const discarded = await layer.cut([n1, n2])
    t.diagnostic(`the cut threw away: ${discarded.join('; ') || 'nothing'}`)
    await layer.restart()
    await n1.launch()
    await n2.launch()
    const st = await readState(meta, 'img')
    assert.equal(st.meta.locations.get(n2.id)!.outOfSync.size, 0, 'the marks of the acknowledged sync were lost')
    const model = new Expectation(fresh)
    assert.deepEqual(await checkReplicasOnDisk([n1, n2], st, model), [])
  })

  test('a peer loses power: what the writer acknowledged as flushed is on every replica still marked in sync', async (t) => {
    const { rig, lb, meta, n1, n2, base, c, fresh } = await peerWritesUnflushed(t, 51)
    const discarded = await lb.cut([n2])
    t.diagnostic(`n2's cut threw away: ${discarded.join('; ') || 'nothing'}`)
    const flushed = await c.flush().then(() => 'acknowledged', (err: Error) => `failed: ${err.message}`)
    t.diagnostic(`the FLUSH after n2 lost power: ${flushed}`)
    await lb.restart()
    await n2.launch()
    await c.close()
    const st = await released(meta, 'img')
    const model = new Expectation(base)
    model.write(0, fresh)
    if (flushed === 'acknowledged') model.flush()
    else model.cut()
    const problems = await checkReplicasOnDisk([n1, n2], st, model)
    // What a reader on n2 gets: n2 reads its own in-sync replica first.
    const r = await rig.client(n2, 'img')
    const got = Buffer.alloc(2 * MiB)
    await r.read(0, got)
    await r.close()
    const seen = got.equals(fresh) ? 'the acknowledged data' : got.equals(base.subarray(0, 2 * MiB)) ? 'the data from before the acknowledged writes' : 'something else'
    assert.deepEqual(problems, [],
      `the FLUSH was ${flushed}, yet n2, still in sync for every block, lost the unflushed writes with its power (a reader on n2 now gets ${seen}). ` +
      'RemoteReplica.flush sends FLUSH only on the pool\'s open connections: once n2\'s connections broke it flushes none and ' +
      'succeeds, so Volume.flush counts n2\'s unflushed blocks as flushed and never marks them out of sync.')
  })

  test('a peer power-cycles between the writes and the FLUSH: the FLUSH does not count what the peer lost', async (t) => {
    const { lb, meta, n1, n2, base, c, fresh } = await peerWritesUnflushed(t, 61)
    await lb.cut([n2])
    await lb.restart()
    await n2.launch() // back before the writer does anything
    const flushed = await c.flush().then(() => 'acknowledged', (err: Error) => `failed: ${err.message}`)
    t.diagnostic(`the FLUSH after n2 came back: ${flushed}`)
    await c.close()
    const st = await released(meta, 'img')
    const model = new Expectation(base)
    model.write(0, fresh)
    if (flushed === 'acknowledged') model.flush()
    else model.cut()
    assert.deepEqual(await checkReplicasOnDisk([n1, n2], st, model), [],
      `the FLUSH was ${flushed}, yet n2 is in sync without the writes it lost with its power: the writer never learns that a peer restarted ` +
      '(a broken connection is not a failure to RemoteReplica.flush), so what that peer had not flushed is counted as flushed.')
  })

  test('image destroy: after a power cut, a new image of the same name reads as zeros, not as the destroyed one', async (t) => {
    const rig = new Rig(t)
    const layer = await rig.layer()
    const node = await rig.node(layer, 'n1', layer.path('metadata'))
    await cli(node, 'image', 'create', 'img', '-s', '2M', '-b', '1M')
    const c = await rig.client(node, 'img')
    await c.write(0, pattern(71, 2 * MiB))
    await c.flush()
    await c.close()
    await released(layer.path('metadata'), 'img')
    await layer.sync()

    await cli(node, 'image', 'destroy', 'img')
    const discarded = await layer.cut([node])
    await layer.restart()
    await node.launch()
    await cli(node, 'image', 'create', 'img', '-s', '2M', '-b', '1M')
    const r = await rig.client(node, 'img')
    const got = Buffer.alloc(2 * MiB)
    await r.read(0, got)
    await r.close()
    const files = await readdir(join(node.imageRoot, 'img'))
    assert.ok(got.equals(Buffer.alloc(2 * MiB)),
      `the new image reads the destroyed image's data (block files ${files.join(', ')}): the destroy was acknowledged after removing ${join(node.imageRoot, 'img')} ` +
      'with rm -r and no fsync of image_root, so the directory came back with the power; the new image\'s allocation keeps the files it finds. ' +
      `The cut threw away: ${discarded.join('; ')}`)
  })

  test('the first layout\'s migration: an image destroyed after the move stays destroyed across a power cut', async (t) => {
    const rig = new Rig(t)
    const layer = await rig.layer()
    const metaRoot = layer.path('metadata')
    // A node of the first version left its image in <metadata_root>/img.json, long ago (durable).
    const port = await freePort()
    const id = `127.0.0.1:${port}`
    const old = new ImageMeta({ name: 'img', size: 2 * MiB, blockSize: MiB, usedSize: 0 })
    old.addLocation(id, 0, old.blockCount, true)
    const doc = encodeStored(old) as unknown as Record<string, unknown>
    delete doc.revision
    // shards/ too, so that this test is not about the first start's directories (an earlier test is).
    await mkdir(join(metaRoot, 'shards'), { recursive: true })
    await writeFile(join(metaRoot, 'img.json'), JSON.stringify(doc) + '\n')
    await mkdir(layer.path('n1', 'images', 'img'), { recursive: true })
    await layer.sync()

    const node = await TestNode.start({ nbd: true, config: { image_root: layer.path('n1', 'images'), metadata_root: metaRoot, proxy_port: port, id } })
    rig.nodes.push(node)
    assert.deepEqual((await readdir(metaRoot)).sort(), ['shards', 'v1'], 'the node moved the first layout in')
    await cli(node, 'image', 'destroy', 'img')
    const discarded = await layer.cut([node])
    await layer.restart()
    await node.launch()
    const r = await node.cli('image', 'info', 'img')
    assert.equal(r.code, 3,
      'the acknowledged destroy was undone by the power cut: the image is back. migrateV1 moved img.json into v1/ with renames that no fsync of ' +
      'metadata_root made durable, so after the cut the old file is in place again and the next start moves it in once more. ' +
      `The cut threw away: ${discarded.join('; ')}`)
  })
})
