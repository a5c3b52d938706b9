/**
 * The native FUSE plane's fast path (native/ukai-fuse.c) without a
 * mount: the addon's reads of granted blocks (readFast runs exactly what
 * a FUSE thread runs), grants and their revocation, and a Volume driving
 * it through ImageReadPlane: a block made unreadable locally is revoked
 * before the write that did it is acknowledged, and no native read of it
 * is under way by then.
 */
import { test, describe } from 'node:test'
import assert from 'node:assert/strict'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { BlockStore } from '../../blockstore/block-store.js'
import { UkaiError } from '../../errors.js'
import { FileCore } from '../../metadata/file-core.js'
import { ImageMeta } from '../../metadata/image.js'
import { MetadataStore } from '../../metadata/store.js'
import { FenceTable } from '../../node/fences.js'
import { LocalReplica, type Replica } from '../../replica/replica.js'
import { NodeErrors } from '../../volume/node-errors.js'
import { Volume } from '../../volume/volume.js'
import { testCluster } from '../../../test/helpers/cluster-context.js'
import { makeTmpDir } from '../../../test/helpers/tmp.js'
import { loadFuseAddon } from './native-addon.js'
import { ImageReadPlane } from './read-plane.js'

const { addon, error } = loadFuseAddon()
const skip = addon === undefined ? `the native FUSE addon is not built (${error ?? ''})` : false
const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))
const ranges = (...r: number[]): Float64Array => Float64Array.from(r)

function pattern (length: number, seed: number): Buffer {
  const b = Buffer.alloc(length)
  let x = (seed * 2654435761) >>> 0 || 1
  for (let i = 0; i < length; i++) {
    x ^= x << 13; x >>>= 0
    x ^= x >>> 17
    x ^= x << 5; x >>>= 0
    b[i] = x & 0xff
  }
  return b
}

describe('native FUSE addon: the fast path', { skip }, () => {
  const BS = 8192
  const name = (b: number): string => String(b).padStart(16, '0')

  test('reads granted blocks from their files (past a file end: zeros), across blocks, and hands everything else back', async (t) => {
    const dir = await makeTmpDir('ukai-plane-')
    t.after(dir.cleanup)
    await writeFile(join(dir.path, name(0)), pattern(BS, 1))
    await writeFile(join(dir.path, name(1)), pattern(100, 2)) // short: the rest reads as zeros
    const slot = addon!.registerImage(dir.path, '', 16, '', BS, 4, 3 * BS)
    try {
      const buf = Buffer.alloc(BS)
      assert.equal(addon!.readFast(slot, 0, buf), -1, 'nothing granted yet')
      addon!.grant(slot, ranges(0, 2))
      assert.deepEqual([...addon!.fastBlocks(slot)], [0, 2])
      assert.equal(addon!.readFast(slot, 0, buf), BS)
      assert.ok(buf.equals(pattern(BS, 1)))
      const across = Buffer.alloc(BS)
      assert.equal(addon!.readFast(slot, BS / 2, across), BS)
      assert.ok(across.equals(Buffer.concat([pattern(BS, 1).subarray(BS / 2), pattern(100, 2), Buffer.alloc(BS / 2 - 100)])))
      // Block 2 is not granted; block 3 is past used_size; block 2's file is missing.
      assert.equal(addon!.readFast(slot, BS + 10, Buffer.alloc(BS)), -1)
      addon!.grant(slot, ranges(2, 4))
      assert.equal(addon!.readFast(slot, 2 * BS, Buffer.alloc(10)), -1, 'a missing file is TypeScript\'s to answer')
      assert.equal(addon!.readFast(slot, 3 * BS, Buffer.alloc(10)), -1, 'past used_size')
      addon!.setUsedSize(slot, 4 * BS)
      await writeFile(join(dir.path, name(3)), pattern(BS, 3))
      const last = Buffer.alloc(10)
      assert.equal(addon!.readFast(slot, 3 * BS, last), 10)
      assert.ok(last.equals(pattern(10, 3)))
      const [reads, bytes, pieces] = addon!.takeCounters(slot) as unknown as number[]
      assert.deepEqual([reads, bytes, pieces], [3, 2 * BS + 10, 4])
      assert.deepEqual([...addon!.takeCounters(slot)].slice(0, 3), [0, 0, 0], 'taken')
    } finally {
      await addon!.unregisterImage(slot)
    }
  })

  test('revoke stops new reads at once; drain resolves only when the reads under way have finished', async (t) => {
    const dir = await makeTmpDir('ukai-plane-')
    t.after(dir.cleanup)
    await writeFile(join(dir.path, name(0)), pattern(BS, 1))
    await writeFile(join(dir.path, name(1)), pattern(BS, 2))
    const slot = addon!.registerImage(dir.path, '', 16, '', BS, 2, 2 * BS)
    try {
      addon!.grant(slot, ranges(0, 2))
      addon!.setReadDelay(slot, 300_000)
      // Each read holds its block for 300 ms from some time after it was queued.
      const queued = performance.now()
      const inFlight = addon!.readFastAsync(slot, 0, Buffer.alloc(BS))
      const other = addon!.readFastAsync(slot, BS, Buffer.alloc(BS))
      await sleep(100) // both reads hold their blocks now
      addon!.setReadDelay(slot, 0)
      addon!.revoke(slot, ranges(0, 1))
      assert.equal(addon!.readFast(slot, 0, Buffer.alloc(BS)), -1, 'no read of a revoked block starts')
      assert.equal(addon!.readFast(slot, BS, Buffer.alloc(BS)), BS, 'the other block is still granted')
      await addon!.drain(slot, ranges(0, 1))
      assert.ok(performance.now() - queued >= 299, `drained ${performance.now() - queued} ms after the read was queued, before it let its block go`)
      assert.deepEqual(await Promise.all([inFlight, other]), [BS, BS])
    } finally {
      await addon!.unregisterImage(slot)
    }
  })

  test('the fast path serves only while the JS thread renews its heartbeat', async (t) => {
    const dir = await makeTmpDir('ukai-plane-')
    t.after(dir.cleanup)
    await writeFile(join(dir.path, name(0)), pattern(BS, 1))
    const slot = addon!.registerImage(dir.path, '', 16, '', BS, 1, BS)
    try {
      addon!.grant(slot, ranges(0, 1))
      addon!.heartbeat(100)
      assert.equal(addon!.readFast(slot, 0, Buffer.alloc(BS)), BS)
      await sleep(150)
      assert.equal(addon!.readFast(slot, 0, Buffer.alloc(BS)), -1, 'no heartbeat for longer than it said: reads go to JS')
      addon!.heartbeat(100)
      assert.equal(addon!.readFast(slot, 0, Buffer.alloc(BS)), BS)
    } finally {
      addon!.heartbeat(0)
      await addon!.unregisterImage(slot)
    }
  })

  test('unregisterImage ends every read of the image and returns what they counted', async (t) => {
    const dir = await makeTmpDir('ukai-plane-')
    t.after(dir.cleanup)
    await writeFile(join(dir.path, name(0)), pattern(BS, 1))
    const slot = addon!.registerImage(dir.path, '', 16, '', BS, 1, BS)
    addon!.grant(slot, ranges(0, 1))
    addon!.setReadDelay(slot, 200_000)
    const read = addon!.readFastAsync(slot, 0, Buffer.alloc(BS))
    await sleep(50)
    const left = await addon!.unregisterImage(slot)
    assert.equal(await read, BS)
    assert.deepEqual([...left].slice(0, 3), [1, BS, 1])
    assert.throws(() => addon!.grant(slot, ranges(0, 1)), /not a registered image slot/)
  })
})

const A = '127.0.0.1:1'
const B = '127.0.0.1:2'
const IMG = 'vm1'

/** A volume of IMG on "this node" A (local) with a second replica on B (seen as remote), and a plane on A's block files. */
async function rig (t: { after: (fn: () => Promise<void>) => void }, blockSize: number, blocks: number): Promise<{
  vol: Volume, plane: ImageReadPlane, replicas: Map<string, Replica>, errors: NodeErrors, dirA: string
}> {
  const dir = await makeTmpDir('ukai-plane-vol-')
  const store = new MetadataStore(await FileCore.open(join(dir.path, 'metadata')), 22222)
  const fences = new FenceTable()
  const stores: Record<string, BlockStore> = { [A]: new BlockStore(join(dir.path, 'a'), '%016d'), [B]: new BlockStore(join(dir.path, 'b'), '%016d') }
  const replicas = new Map<string, Replica>()
  for (const loc of [A, B]) {
    await stores[loc]!.allocate(IMG)
    const r = new LocalReplica(loc, stores[loc]!, fences)
    replicas.set(loc, loc === A ? r : Object.create(r, { isLocal: { value: false } }) as Replica)
  }
  const meta = new ImageMeta({ name: IMG, size: blockSize * blocks, blockSize, usedSize: 0 })
  for (const loc of [A, B]) meta.addLocation(loc, 0, meta.blockCount, true)
  await store.create(meta)
  const errors = new NodeErrors(60)
  const vol = new Volume(await store.require(IMG), { store, replicas: { replicaFor: (l) => replicas.get(l) }, errors, cluster: await testCluster(store, A, fences) })
  await mkdir(stores[A]!.imageDir(IMG), { recursive: true })
  const plane = new ImageReadPlane(addon!, vol, { dir: stores[A]!.imageDir(IMG), prefix: '', width: 16, suffix: '' })
  t.after(async () => {
    await plane.close()
    await vol.close()
    for (const s of Object.values(stores)) await s.close()
    await store.close()
    await dir.cleanup()
  })
  return { vol, plane, replicas, errors, dirA: stores[A]!.imageDir(IMG) }
}

describe('native FUSE plane and the volume', { skip }, () => {
  const BS = 65536

  test('a write that marks the local copy out of sync is acknowledged only after the native reads of it finish, and later reads go to the other replica', async (t) => {
    const { vol, plane, replicas } = await rig(t, BS, 4)
    await vol.write(0, pattern(4 * BS, 1))
    assert.deepEqual([...addon!.fastBlocks(plane.slot)], [0, 4], 'every block readable here')
    const old = Buffer.alloc(BS)
    assert.equal(addon!.readFast(plane.slot, BS, old), BS)
    assert.ok(old.equals(pattern(4 * BS, 1).subarray(BS, 2 * BS)))

    // This node's copy refuses writes from now on (a failing disk): the write reaches B only.
    const local = replicas.get(A)!
    replicas.set(A, Object.create(local, {
      write: { value: async () => { throw new UkaiError('UKAI_ERR_IO', 'the local disk failed') } }
    }) as Replica)
    // A native read of block 1 that decided on the fast path before the
    // write, and holds the block for 400 ms from some time after `queued`.
    addon!.setReadDelay(plane.slot, 400_000)
    const queued = performance.now()
    const stale = addon!.readFastAsync(plane.slot, BS, Buffer.alloc(BS))
    await sleep(100)
    addon!.setReadDelay(plane.slot, 0)
    const fresh = pattern(BS, 2)
    await vol.write(BS, fresh)
    const acked = performance.now() - queued
    assert.ok(acked >= 399, `the write was acknowledged ${acked} ms after the read was queued, while the read still held the block`)
    assert.equal(await stale, BS)
    assert.deepEqual([...addon!.fastBlocks(plane.slot)], [0, 1, 2, 4], 'block 1 revoked')
    assert.equal(addon!.readFast(plane.slot, BS, Buffer.alloc(BS)), -1)
    const got = Buffer.alloc(BS)
    assert.equal(await vol.read(BS, got), BS)
    assert.ok(got.equals(fresh), 'the volume reads the other replica')
    assert.equal(vol.chooseReader(1)?.location, B)
  })

  test('leave, the error state and a refresh revoke; the end of the error state grants again', async (t) => {
    const { vol, plane, errors } = await rig(t, BS, 4)
    await vol.write(0, pattern(4 * BS, 3))
    const left = vol.leave(A, 2, 4)
    assert.deepEqual([...addon!.fastBlocks(plane.slot)], [0, 2], 'revoked in the same tick')
    await left.drained
    left.cancel()
    assert.deepEqual([...addon!.fastBlocks(plane.slot)], [0, 4])
    errors.fail(A, 'test')
    assert.deepEqual([...addon!.fastBlocks(plane.slot)], [])
    errors.succeed(A)
    assert.deepEqual([...addon!.fastBlocks(plane.slot)], [0, 4])
    const meta = vol.meta.clone()
    meta.setSync(A, 3, 4, false)
    meta.revision = vol.meta.revision + 1
    vol.refresh(meta)
    assert.deepEqual([...addon!.fastBlocks(plane.slot)], [0, 3])
    await vol.readsSettled()
  })

  test('native reads reach the image statistics when they are read', async (t) => {
    const { vol, plane } = await rig(t, BS, 2)
    await vol.write(0, pattern(2 * BS, 4))
    const before = { reads: vol.stats.reads, bytes: vol.stats.bytesRead, local: vol.stats.readsFrom[A] ?? 0 }
    assert.equal(addon!.readFast(plane.slot, BS / 2, Buffer.alloc(BS)), BS) // two block pieces
    assert.equal(addon!.readFast(plane.slot, 0, Buffer.alloc(100)), 100)
    vol.stats.collect?.()
    assert.equal(vol.stats.reads - before.reads, 2)
    assert.equal(vol.stats.bytesRead - before.bytes, BS + 100)
    assert.equal((vol.stats.readsFrom[A] ?? 0) - before.local, 3)
    assert.equal(vol.stats.replicas[A]!.readBytes >= BS + 100, true)
  })
})
