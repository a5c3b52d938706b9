/**
 * The volume engine in one process with real parts: two BlockStores in
 * two directories play two nodes ('127.0.0.1:1' and '127.0.0.1:2'), each
 * behind a LocalReplica, and the image's metadata is in the embedded
 * metadata store. Nothing is mocked; a replica is made "remote" only by
 * an object whose isLocal is false.
 */
import { test, describe } from 'node:test'
import assert from 'node:assert/strict'
import { readdir, readFile, rm, stat } from 'node:fs/promises'
import { join } from 'node:path'
import fc from 'fast-check'
import { BlockStore } from '../blockstore/block-store.js'
import { UkaiError } from '../errors.js'
import { FileCore } from '../metadata/file-core.js'
import { ImageMeta } from '../metadata/image.js'
import { MetadataStore } from '../metadata/store.js'
import { FenceTable } from '../node/fences.js'
import { LocalReplica, type Replica } from '../replica/replica.js'
import { testCluster } from '../../test/helpers/cluster-context.js'
import { makeTmpDir } from '../../test/helpers/tmp.js'
import { NodeErrors } from './node-errors.js'
import { Volume, type VolumeContext } from './volume.js'
import { rejectsWith } from '../../test/helpers/assertions.js'

const A = '127.0.0.1:1'
const B = '127.0.0.1:2'
const IMG = 'vm1'

interface RigOptions {
  size: number
  blockSize: number
  usedSize?: number
  /** Which locations count as this node (isLocal); both by default. */
  local?: string[]
  /** The image's locations (both by default). */
  locations?: string[]
}

interface Rig {
  root: string
  vol: Volume
  store: MetadataStore
  /** A volume context like the rig volume's, for another Volume of the image. */
  context: () => Promise<VolumeContext>
  blocks: Record<string, BlockStore>
  /** The provider's table: delete an entry to make a location unreachable. */
  replicas: Map<string, Replica>
  errors: NodeErrors
  cleanup: () => Promise<void>
}

/** The same replica, seen as a remote one. */
function asRemote (r: Replica): Replica {
  return Object.create(r, { isLocal: { value: false } }) as Replica
}

async function makeRig (opts: RigOptions): Promise<Rig> {
  const dir = await makeTmpDir('ukai-volume-')
  const store = new MetadataStore(await FileCore.open(join(dir.path, 'metadata')), 22222)
  const fences = new FenceTable()
  const blocks: Record<string, BlockStore> = {
    [A]: new BlockStore(join(dir.path, 'node1'), '%016d', { maxOpen: 4 }),
    [B]: new BlockStore(join(dir.path, 'node2'), '%016d', { maxOpen: 4 })
  }
  const local = opts.local ?? [A, B]
  const replicas = new Map<string, Replica>()
  for (const loc of [A, B]) {
    await blocks[loc]!.allocate(IMG)
    const r = new LocalReplica(loc, blocks[loc]!, fences)
    replicas.set(loc, local.includes(loc) ? r : asRemote(r))
  }
  const meta = new ImageMeta({ name: IMG, size: opts.size, blockSize: opts.blockSize, usedSize: opts.usedSize ?? 0 })
  for (const loc of opts.locations ?? [A, B]) meta.addLocation(loc, 0, meta.blockCount, true)
  await store.create(meta)
  const errors = new NodeErrors(60)
  const context = async (): Promise<VolumeContext> => ({ store, replicas: { replicaFor: (l) => replicas.get(l) }, errors, cluster: await testCluster(store, A, fences) })
  const vol = new Volume(await store.require(IMG), await context())
  return {
    root: dir.path,
    vol,
    store,
    context,
    blocks,
    replicas,
    errors,
    cleanup: async () => {
      for (const b of Object.values(blocks)) await b.close()
      await store.close()
      await dir.cleanup()
    }
  }
}

/** The newest revision of the image's metadata keys (the dirty-block log is not metadata). */
async function metaRevision (rig: Rig): Promise<number> {
  return Math.max(...(await rig.store.core.range(`images/${IMG}/meta/`)).kvs.map((kv) => kv.modRevision))
}

async function withRig (opts: RigOptions, fn: (rig: Rig) => Promise<void>): Promise<void> {
  const rig = await makeRig(opts)
  try { await fn(rig) } finally { await rig.cleanup() }
}


/** Deterministic bytes from a seed. */
function bytes (length: number, seed: number): Buffer {
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

async function readAll (vol: Volume, offset: number, length: number): Promise<{ n: number, buf: Buffer }> {
  const buf = Buffer.alloc(length, 0xee)
  const n = await vol.read(offset, buf)
  return { n, buf }
}

/** Every block file of the image on one node: name -> contents. */
async function blockFiles (rig: Rig, location: string): Promise<Map<string, Buffer>> {
  const dir = rig.blocks[location]!.imageDir(IMG)
  const out = new Map<string, Buffer>()
  for (const f of (await readdir(dir)).sort()) out.set(f, await readFile(join(dir, f)))
  return out
}

/**
 * Both nodes hold byte-identical block files, and they hold what `model`
 * says wherever `known` (when given) is set.
 */
async function checkReplicas (rig: Rig, model?: Buffer, known?: Uint8Array): Promise<void> {
  await rig.vol.flush()
  const a = await blockFiles(rig, A)
  const b = await blockFiles(rig, B)
  assert.deepEqual([...a.keys()], [...b.keys()], 'the two nodes have different block files')
  for (const [name, data] of a) assert.ok(data.equals(b.get(name)!), `block file ${name} differs between the nodes`)
  if (model === undefined) return
  const bs = rig.vol.blockSize
  for (let block = 0; block < rig.vol.meta.blockCount; block++) {
    const want = model.subarray(block * bs, Math.min(model.length, (block + 1) * bs))
    const file = a.get(String(block).padStart(16, '0')) ?? Buffer.alloc(0)
    assert.ok(file.length <= want.length, `block file ${block} is longer than its block`)
    const have = Buffer.concat([file, Buffer.alloc(want.length - file.length)])
    for (let i = 0; i < want.length; i++) {
      if (known !== undefined && known[block * bs + i] === 0) continue
      assert.equal(have[i], want[i], `block ${block} byte ${i} on disk differs from the model`)
    }
  }
}

type Op =
  | { kind: 'write', offset: number, length: number, seed: number }
  | { kind: 'read', offset: number, length: number }
  | { kind: 'zero', offset: number, length: number, mayFree: boolean }
  | { kind: 'trim', offset: number, length: number }

describe('Volume data path', () => {
  test('random writes, zeroes, trims and reads across block boundaries match an in-memory model', { timeout: 60_000 }, async () => {
    const geometry = fc.record({
      blockSize: fc.constantFrom(64, 100, 512),
      blocks: fc.integer({ min: 2, max: 6 }),
      tail: fc.nat({ max: 63 })
    }).map(({ blockSize, blocks, tail }) => ({ blockSize, size: blocks * blockSize - tail }))
    const scenario = geometry.chain(({ blockSize, size }) => fc.record({
      blockSize: fc.constant(blockSize),
      size: fc.constant(size),
      ops: fc.array(fc.oneof(
        fc.record({ kind: fc.constant('write' as const), offset: fc.nat({ max: size - 1 }), length: fc.integer({ min: 1, max: 2 * blockSize + 7 }), seed: fc.nat() })
          .map((o) => ({ ...o, length: Math.min(o.length, size - o.offset) })),
        fc.record({ kind: fc.constant('read' as const), offset: fc.nat({ max: size + 10 }), length: fc.nat({ max: 3 * blockSize }) }),
        fc.record({ kind: fc.constant('zero' as const), offset: fc.nat({ max: size - 1 }), length: fc.integer({ min: 1, max: 2 * blockSize }), mayFree: fc.boolean() })
          .map((o) => ({ ...o, length: Math.min(o.length, size - o.offset) })),
        fc.record({ kind: fc.constant('trim' as const), offset: fc.nat({ max: size - 1 }), length: fc.integer({ min: 1, max: 2 * blockSize }) })
          .map((o) => ({ ...o, length: Math.min(o.length, size - o.offset) }))
      ), { minLength: 1, maxLength: 25 })
    }))
    await fc.assert(fc.asyncProperty(scenario, async ({ blockSize, size, ops }) => {
      await withRig({ size, blockSize }, async (rig) => {
        const model = Buffer.alloc(size)
        // A trimmed byte's contents are unspecified until it is written or zeroed again.
        const known = new Uint8Array(size).fill(1)
        const same = (buf: Buffer, offset: number): boolean => buf.every((x, i) => known[offset + i] === 0 || x === model[offset + i])
        let used = 0
        for (const op of ops as Op[]) {
          if (op.kind === 'write') {
            const data = bytes(op.length, op.seed)
            await rig.vol.write(op.offset, data)
            data.copy(model, op.offset)
            known.fill(1, op.offset, op.offset + op.length)
            used = Math.max(used, op.offset + op.length)
          } else if (op.kind === 'zero') {
            await rig.vol.zero(op.offset, op.length, op.mayFree)
            model.fill(0, op.offset, op.offset + op.length)
            known.fill(1, op.offset, op.offset + op.length)
          } else if (op.kind === 'trim') {
            await rig.vol.trim(op.offset, op.length)
            known.fill(0, op.offset, op.offset + op.length)
          } else {
            const { n, buf } = await readAll(rig.vol, op.offset, op.length)
            const expected = Math.max(0, Math.min(op.offset + op.length, used) - op.offset)
            assert.equal(n, expected, `read(${op.offset}, ${op.length}) with used_size ${used}`)
            assert.ok(same(buf.subarray(0, n), op.offset), `read(${op.offset}, ${op.length}) data`)
          }
          assert.equal(rig.vol.usedSize, used)
        }
        const { n, buf } = await readAll(rig.vol, 0, size)
        assert.equal(n, used)
        assert.ok(same(buf.subarray(0, n), 0))
        assert.equal((await rig.store.require(IMG)).usedSize, used)
        await checkReplicas(rig, model, known)
      })
    }), { numRuns: 60 })
  })

  test('concurrent overlapping writes leave both replicas identical', async () => {
    await withRig({ size: 4 * 1000, blockSize: 1000 }, async (rig) => {
      const writes: Array<Promise<void>> = []
      for (let i = 0; i < 60; i++) {
        const offset = (i * 397) % 3500
        writes.push(rig.vol.write(offset, bytes(100 + (i * 53) % 400, i)))
        if (i % 7 === 0) writes.push(rig.vol.zero((i * 211) % 3000, 150, i % 2 === 0))
      }
      await Promise.all(writes)
      await checkReplicas(rig)
      // What the volume reads is what is on disk.
      const { n, buf } = await readAll(rig.vol, 0, 4000)
      assert.equal(n, rig.vol.usedSize)
      const files = await blockFiles(rig, A)
      const disk = Buffer.concat([0, 1, 2, 3].map((block) => {
        const file = files.get(String(block).padStart(16, '0')) ?? Buffer.alloc(0)
        return Buffer.concat([file, Buffer.alloc(1000 - file.length)])
      }))
      assert.ok(buf.subarray(0, n).equals(disk.subarray(0, n)))
      assert.ok(disk.subarray(n).equals(Buffer.alloc(4000 - n)), 'data on disk past used_size')
    })
  })

  test('reads at or past used_size are short', async () => {
    await withRig({ size: 1000, blockSize: 300 }, async (rig) => {
      assert.equal((await readAll(rig.vol, 0, 100)).n, 0)
      await rig.vol.write(500, Buffer.from('abcdefghij'))
      assert.equal(rig.vol.usedSize, 510)
      let r = await readAll(rig.vol, 505, 100)
      assert.equal(r.n, 5)
      assert.equal(r.buf.subarray(0, 5).toString(), 'fghij')
      assert.equal(r.buf[5], 0xee, 'bytes past the short read are left alone')
      r = await readAll(rig.vol, 0, 1000)
      assert.equal(r.n, 510)
      assert.ok(r.buf.subarray(0, 500).equals(Buffer.alloc(500)))
      assert.equal((await readAll(rig.vol, 510, 10)).n, 0)
      assert.equal((await readAll(rig.vol, 5000, 10)).n, 0)
      assert.equal((await readAll(rig.vol, 0, 0)).n, 0)
      await rejectsWith(rig.vol.read(-1, Buffer.alloc(1)), 'UKAI_ERR_OUT_OF_RANGE')
      await rejectsWith(rig.vol.read(0.5, Buffer.alloc(1)), 'UKAI_ERR_OUT_OF_RANGE')
    })
  })

  test('a write past size is UKAI_ERR_NO_SPACE and changes nothing', async () => {
    await withRig({ size: 1000, blockSize: 300 }, async (rig) => {
      await rig.vol.write(0, Buffer.from('x'))
      const before = await metaRevision(rig)
      await rejectsWith(rig.vol.write(995, Buffer.alloc(6, 1)), 'UKAI_ERR_NO_SPACE', /passes the end of image 'vm1' \(1000 bytes\)/)
      await rejectsWith(rig.vol.write(1000, Buffer.alloc(1, 1)), 'UKAI_ERR_NO_SPACE')
      await rejectsWith(rig.vol.write(2 ** 40, Buffer.alloc(1, 1)), 'UKAI_ERR_NO_SPACE')
      await rejectsWith(rig.vol.zero(900, 101), 'UKAI_ERR_NO_SPACE')
      await rejectsWith(rig.vol.trim(0, 1001), 'UKAI_ERR_NO_SPACE')
      await rejectsWith(rig.vol.write(-1, Buffer.alloc(1)), 'UKAI_ERR_OUT_OF_RANGE')
      assert.equal(rig.vol.usedSize, 1)
      const after = await rig.store.require(IMG)
      assert.equal(after.usedSize, 1)
      assert.equal(await metaRevision(rig), before)
      assert.deepEqual([...(await blockFiles(rig, A)).keys()], ['0000000000000000'])
      // Up to exactly size is fine, including the last partial block.
      await rig.vol.write(994, Buffer.from('ending'))
      assert.equal(rig.vol.usedSize, 1000)
      assert.equal((await readAll(rig.vol, 990, 20)).buf.subarray(4, 10).toString(), 'ending')
      assert.equal((await readFile(rig.blocks[B]!.blockPath(IMG, 3))).length, 100)
    })
  })

  test('writes past used_size grow it durably; writes inside do not touch the metadata', async () => {
    await withRig({ size: 10_000, blockSize: 1000, usedSize: 100 }, async (rig) => {
      await rig.vol.write(2500, Buffer.alloc(500, 7))
      assert.equal(rig.vol.usedSize, 3000)
      let stored = await rig.store.require(IMG)
      assert.equal(stored.usedSize, 3000)
      const revision = await metaRevision(rig)
      await rig.vol.write(0, Buffer.alloc(3000, 8))
      await rig.vol.write(1500, Buffer.alloc(10, 9))
      stored = await rig.store.require(IMG)
      assert.equal(stored.usedSize, 3000)
      assert.equal(await metaRevision(rig), revision, 'a write below used_size wrote the metadata')
      await rig.vol.write(9999, Buffer.from('z'))
      assert.equal((await rig.store.require(IMG)).usedSize, 10_000)
      // A volume opened afresh from the store sees the grown image.
      const again = new Volume(await rig.store.require(IMG), await rig.context())
      const { n, buf } = await readAll(again, 9990, 100)
      assert.equal(n, 10)
      assert.equal(buf.subarray(9, 10).toString(), 'z')
    })
  })

  test('truncate shrinks used_size and zeroes the tail; growth is refused', async () => {
    await withRig({ size: 5000, blockSize: 1000 }, async (rig) => {
      const data = bytes(4500, 1)
      await rig.vol.write(0, data)
      await rig.vol.truncate(1500)
      assert.equal(rig.vol.usedSize, 1500)
      assert.equal((await rig.store.require(IMG)).usedSize, 1500)
      const r = await readAll(rig.vol, 1000, 1000)
      assert.equal(r.n, 500)
      assert.ok(r.buf.subarray(0, 500).equals(data.subarray(1000, 1500)))
      await rejectsWith(rig.vol.truncate(1501), 'UKAI_ERR_PERMISSION', /may only shrink used_size \(1500\), not grow it to 1501/)
      await rejectsWith(rig.vol.truncate(-1), 'UKAI_ERR_OUT_OF_RANGE')
      await rig.vol.truncate(1500)
      assert.equal(rig.vol.usedSize, 1500)
      // Growing again by a write: the truncated bytes read as zeros, on every replica.
      await rig.vol.write(4499, Buffer.from('!'))
      const all = await readAll(rig.vol, 0, 5000)
      assert.equal(all.n, 4500)
      assert.ok(all.buf.subarray(0, 1500).equals(data.subarray(0, 1500)))
      assert.ok(all.buf.subarray(1500, 4499).equals(Buffer.alloc(2999)), 'truncated bytes came back')
      const model = Buffer.alloc(5000)
      data.copy(model, 0, 0, 1500)
      model[4499] = '!'.charCodeAt(0)
      await checkReplicas(rig, model)
      await rig.vol.truncate(0)
      assert.equal((await rig.store.require(IMG)).usedSize, 0)
      assert.equal((await readAll(rig.vol, 0, 10)).n, 0)
    })
  })

  test('one writer, many readers', async () => {
    await withRig({ size: 1000, blockSize: 500 }, async (rig) => {
      const closeWriter = rig.vol.open(true, 'nbd client 1')
      assert.equal(rig.vol.hasWriter, true)
      assert.throws(() => rig.vol.open(true, 'fuse'), (err: unknown) => {
        assert.ok(err instanceof UkaiError)
        assert.equal(err.code, 'UKAI_ERR_BUSY')
        assert.match(err.message, /image 'vm1' is already open for writing by nbd client 1/)
        return true
      })
      const readers = Array.from({ length: 10 }, (_, i) => rig.vol.open(false, `reader ${i}`))
      assert.equal(rig.vol.openCount, 11)
      await closeWriter()
      await closeWriter() // closing twice is harmless
      assert.equal(rig.vol.hasWriter, false)
      assert.equal(rig.vol.openCount, 10)
      const closeSecond = rig.vol.open(true, 'fuse')
      assert.throws(() => rig.vol.open(true, 'nbd client 1'), (err: unknown) => err instanceof UkaiError && err.code === 'UKAI_ERR_BUSY')
      await closeSecond()
      for (const close of readers) { await close(); await close() }
      assert.equal(rig.vol.openCount, 0)
    })
  })
})

describe('Volume replicas', () => {
  test('reads prefer the local replica', async () => {
    for (const [local, remote] of [[A, B], [B, A]] as const) {
      await withRig({ size: 4000, blockSize: 1000, local: [local] }, async (rig) => {
        await rig.vol.write(0, bytes(4000, 3))
        for (let i = 0; i < 10; i++) assert.ok((await readAll(rig.vol, i * 300, 700)).buf.subarray(0, 700).equals(bytes(4000, 3).subarray(i * 300, i * 300 + 700)))
        assert.ok((rig.vol.stats.readsFrom[local] ?? 0) >= 10)
        assert.equal(rig.vol.stats.readsFrom[remote], undefined)
      })
    }
  })

  test('a replica being left (leave) serves no read of its blocks, while writes still reach it; the blocks come back on cancel and are forgotten with the removal', async () => {
    await withRig({ size: 4000, blockSize: 1000, local: [A] }, async (rig) => {
      const data = bytes(4000, 7)
      await rig.vol.write(0, data)
      const readsFrom = (loc: string): number => rig.vol.stats.readsFrom[loc] ?? 0
      const leaving = rig.vol.leave(A, 1, 3)
      for (let b = 0; b < 4; b++) {
        const before = [readsFrom(A), readsFrom(B)]
        assert.ok((await readAll(rig.vol, b * 1000, 1000)).buf.equals(data.subarray(b * 1000, b * 1000 + 1000)))
        const left = b >= 1 && b < 3
        assert.deepEqual([readsFrom(A) - before[0]!, readsFrom(B) - before[1]!], left ? [0, 1] : [1, 0], `block ${b}`)
      }
      // Writes reach the replica being left: it stays identical until it goes.
      await rig.vol.write(1500, Buffer.from('still written'))
      await checkReplicas(rig)
      leaving.cancel()
      const before = readsFrom(A)
      await readAll(rig.vol, 1000, 1000)
      assert.equal(readsFrom(A), before + 1, 'a cancelled leave still avoids the replica')
      // Once the metadata that removed it is here, the record goes with it.
      const again = rig.vol.leave(A, 0, 4)
      const meta = await rig.store.update(IMG, (m) => { m.removeBlocks(A, 3, 4); return m })
      again.removed(meta.revision + 1)
      assert.equal(rig.vol.chooseReader(0)?.location, B)
      rig.vol.refresh(meta)
      assert.equal(rig.vol.chooseReader(0)?.location, B, 'forgotten before its revision arrived')
      rig.vol.refresh(await rig.store.update(IMG, (m) => { m.hypervisors.push('127.0.0.1:9'); return m }))
      assert.equal(rig.vol.chooseReader(0)?.location, A)
      assert.equal(rig.vol.chooseReader(3)?.location, B)
    })
  })

  test('with no local replica, a remote in-sync one serves the reads', async () => {
    await withRig({ size: 2000, blockSize: 1000, local: [] }, async (rig) => {
      await rig.vol.write(0, Buffer.from('remote data'))
      assert.equal((await readAll(rig.vol, 0, 11)).buf.subarray(0, 11).toString(), 'remote data')
      const served = Object.values(rig.vol.stats.readsFrom).reduce((a, b) => a + b, 0)
      assert.equal(served, 1)
    })
  })

  test('a replica whose image directory is gone: reads fall over without marking it; the next write marks it out of sync', async () => {
    // B is this node's replica (preferred for reads); A is "remote".
    await withRig({ size: 4000, blockSize: 1000, local: [B] }, async (rig) => {
      const data = bytes(4000, 5)
      await rig.vol.write(0, data)
      await rig.blocks[B]!.closeImage(IMG)
      await rm(rig.blocks[B]!.imageDir(IMG), { recursive: true })

      // Block 1 is read from B first, fails, and is served by A.
      const r = await readAll(rig.vol, 1000, 1000)
      assert.equal(r.n, 1000)
      assert.ok(r.buf.equals(data.subarray(1000, 2000)))
      assert.equal(rig.vol.stats.readsFrom[A], 1)
      assert.equal(rig.vol.stats.readsFrom[B], undefined)
      // A replica that answers with an error is not a node gone away: no error state.
      assert.deepEqual(rig.errors.list(), [])
      // A read proves a replica unavailable, not stale: its state stays.
      let stored = await rig.store.require(IMG)
      assert.deepEqual(stored.replicasOf(1), [{ location: A, inSync: true }, { location: B, inSync: true }])

      // A write to block 3: A takes it, B is durably marked out of sync for it.
      await rig.vol.write(3100, Buffer.from('new'))
      stored = await rig.store.require(IMG)
      assert.deepEqual(stored.replicasOf(3), [{ location: A, inSync: true }, { location: B, inSync: false }])
      assert.deepEqual(rig.vol.meta.replicasOf(3), stored.replicasOf(3))
      assert.equal((await readAll(rig.vol, 3100, 3)).buf.subarray(0, 3).toString(), 'new')
      assert.deepEqual(rig.errors.list(), [])
    })
  })

  test('a write that fails on one replica is acknowledged only after that replica is marked out of sync', async () => {
    await withRig({ size: 4000, blockSize: 1000 }, async (rig) => {
      await rig.vol.write(0, Buffer.alloc(4000, 1))
      // Flushed, so that only the block the failed write touches may have lost data on B.
      await rig.vol.flush()
      await rig.blocks[B]!.closeImage(IMG)
      await rm(rig.blocks[B]!.imageDir(IMG), { recursive: true })
      assert.deepEqual(rig.errors.list(), [])

      await rig.vol.write(1500, Buffer.from('only on A'))
      const stored = await rig.store.require(IMG)
      assert.deepEqual(stored.replicasOf(1), [{ location: A, inSync: true }, { location: B, inSync: false }])
      for (const b of [0, 2, 3]) assert.deepEqual(stored.replicasOf(b).map((x) => x.inSync), [true, true], `block ${b}`)
      // B answered (with an error): it is not in the error state.
      assert.deepEqual(rig.errors.list(), [])
      assert.equal((await readAll(rig.vol, 1500, 9)).buf.subarray(0, 9).toString(), 'only on A')

      // B comes back (empty); the out-of-sync block is not written there, the in-sync ones are.
      await rig.blocks[B]!.allocate(IMG)
      rig.errors.succeed(B)
      await rig.vol.write(1000, Buffer.alloc(2000, 2))
      assert.deepEqual([...(await blockFiles(rig, B)).keys()], ['0000000000000002'])
      assert.deepEqual((await rig.store.require(IMG)).replicasOf(1).map((x) => x.inSync), [true, false])
    })
  })

  test('a write\'s buffer is released once every replica took it; never after a failure, which is marked out of sync before the ack', async () => {
    await withRig({ size: 4000, blockSize: 1000 }, async (rig) => {
      let released = 0
      await rig.vol.write(500, Buffer.alloc(1000, 1), () => { released++ })
      assert.equal(released, 1, 'both replicas took it')

      // B fails mid-write, long after A wrote: the buffer is not released
      // while B's request runs, nor after it failed (a failed request may
      // still have the bytes queued on a closing connection), and the write
      // is acknowledged only once B is durably out of sync.
      const real = rig.replicas.get(B)!
      let failB!: (err: Error) => void
      let startedB!: () => void
      const started = new Promise<void>((resolve) => { startedB = resolve })
      rig.replicas.set(B, Object.create(real, {
        write: { value: async (): Promise<void> => { startedB(); await new Promise<void>((_resolve, reject) => { failB = reject }) } }
      }) as Replica)
      let acked = false
      const w = rig.vol.write(1000, Buffer.alloc(1000, 2), () => { released++ }).then(() => { acked = true })
      await started
      await new Promise((resolve) => setTimeout(resolve, 20))
      assert.equal(acked, false)
      assert.equal(released, 1, 'not released while B may still read the bytes')
      failB(new UkaiError('UKAI_ERR_IO', 'B failed mid-write'))
      await w
      assert.equal(released, 1, 'not released after a failure')
      assert.deepEqual((await rig.store.require(IMG)).replicasOf(1), [{ location: A, inSync: true }, { location: B, inSync: false }])
      assert.equal((await readAll(rig.vol, 1000, 1000)).buf.equals(Buffer.alloc(1000, 2)), true)
    })
  })

  test('an unreachable location is marked out of sync on write', async () => {
    await withRig({ size: 2000, blockSize: 1000 }, async (rig) => {
      rig.replicas.delete(A)
      await rig.vol.write(0, Buffer.from('b only'))
      const stored = await rig.store.require(IMG)
      assert.deepEqual(stored.replicasOf(0), [{ location: A, inSync: false }, { location: B, inSync: true }])
      assert.deepEqual(stored.replicasOf(1).map((x) => x.inSync), [true, true])
      assert.equal((await readAll(rig.vol, 0, 6)).buf.subarray(0, 6).toString(), 'b only')
      assert.equal(rig.vol.stats.readsFrom[B], 1)
    })
  })

  test('when no replica can serve a block, reads and writes are UKAI_ERR_UNAVAILABLE', async () => {
    await withRig({ size: 2000, blockSize: 1000 }, async (rig) => {
      await rig.vol.write(0, Buffer.alloc(2000, 3))
      for (const loc of [A, B]) {
        await rig.blocks[loc]!.closeImage(IMG)
        await rm(rig.blocks[loc]!.imageDir(IMG), { recursive: true })
      }
      await rejectsWith(rig.vol.read(0, Buffer.alloc(10)), 'UKAI_ERR_UNAVAILABLE', /image 'vm1' block 0: no in-sync location could be read/)
      await rejectsWith(rig.vol.read(1500, Buffer.alloc(10)), 'UKAI_ERR_UNAVAILABLE', /block 1/)
      await rejectsWith(rig.vol.write(0, Buffer.alloc(10)), 'UKAI_ERR_UNAVAILABLE')
    })
    await withRig({ size: 2000, blockSize: 1000 }, async (rig) => {
      await rig.vol.write(0, Buffer.alloc(2000, 3))
      rig.replicas.clear()
      await rejectsWith(rig.vol.read(0, Buffer.alloc(10)), 'UKAI_ERR_UNAVAILABLE', /none reachable/)
    })
  })

  test('flush reaches every replica that was written', async () => {
    await withRig({ size: 2000, blockSize: 1000, local: [A] }, async (rig) => {
      const flushed: string[] = []
      for (const [loc, r] of [...rig.replicas]) {
        rig.replicas.set(loc, Object.create(r, {
          flush: { value: async (image: string) => { flushed.push(loc); await r.flush(image) } }
        }) as Replica)
      }
      await rig.vol.write(0, Buffer.from('x'))
      await rig.vol.flush()
      assert.deepEqual(flushed.sort(), [A, B])
      flushed.length = 0
      await rig.vol.flush()
      // Nothing new was written: only this node's files are synced (for writers before this volume).
      assert.deepEqual(flushed, [A])
    })
  })

  test('extents: unwritten blocks are holes, written ranges are data', async () => {
    await withRig({ size: 5000, blockSize: 1000, usedSize: 5000 }, async (rig) => {
      await rig.vol.write(10, Buffer.alloc(10, 1))
      await rig.vol.write(3000, Buffer.alloc(1000, 2))
      const ext = await rig.vol.extents(0, 5000)
      // The extents tile the range in order.
      let pos = 0
      for (const e of ext) {
        assert.equal(e.offset, pos)
        assert.ok(e.length > 0)
        assert.equal(e.zero, e.hole)
        pos += e.length
      }
      assert.equal(pos, 5000)
      const at = (x: number): boolean => ext.find((e) => e.offset <= x && x < e.offset + e.length)!.hole
      for (const x of [10, 19, 3000, 3999]) assert.equal(at(x), false, `byte ${x} is data`)
      for (const x of [20, 999, 1000, 2999, 4000, 4999]) assert.equal(at(x), true, `byte ${x} is a hole`)
      // Holes read as zeros.
      const { buf } = await readAll(rig.vol, 0, 5000)
      for (const e of ext.filter((x) => x.hole)) assert.ok(buf.subarray(e.offset, e.offset + e.length).equals(Buffer.alloc(e.length)))
      // Clipped at used_size.
      await rig.vol.truncate(3500)
      const clipped = await rig.vol.extents(0, 5000)
      assert.equal(clipped.reduce((n, e) => n + e.length, 0), 3500)
    })
  })

  test('extents without a local replica report everything as data', async () => {
    await withRig({ size: 3000, blockSize: 1000, usedSize: 3000, local: [] }, async (rig) => {
      assert.deepEqual(await rig.vol.extents(0, 3000), [{ offset: 0, length: 3000, hole: false, zero: false }])
    })
  })
})

/** An errno error as node:fs raises it. */
const errno = (code: string): NodeJS.ErrnoException => Object.assign(new Error(`${code}: from the test`), { code })

/** Replica `loc` of the rig, with some operations replaced. */
function patch (rig: Rig, loc: string, ops: Partial<Record<'read' | 'write' | 'flush', (...args: never[]) => Promise<void>>>): void {
  const r = rig.replicas.get(loc)!
  const props: PropertyDescriptorMap = {}
  for (const [k, v] of Object.entries(ops)) props[k] = { value: v }
  rig.replicas.set(loc, Object.create(r, props) as Replica)
}

describe('Volume: a read split over blocks', () => {
  test('fails only once every piece is done: no piece still reads into the buffer its caller may hand on', async () => {
    await withRig({ size: 8192, blockSize: 4096, locations: [A] }, async (rig) => {
      await rig.vol.write(0, bytes(8192, 3))
      let slowDone = false
      const real = rig.replicas.get(A)!
      patch(rig, A, {
        read: (async (image: string, block: number, offset: number, out: Buffer) => {
          if (block === 0) throw errno('EIO')
          await new Promise((resolve) => setTimeout(resolve, 50))
          await real.read(image, block, offset, out)
          slowDone = true
        }) as never
      })
      await assert.rejects(rig.vol.read(0, Buffer.alloc(8192)), (err: UkaiError) => err.code === 'UKAI_ERR_UNAVAILABLE')
      assert.equal(slowDone, true, 'the read failed while its other piece still read into the buffer')
    })
  })
})

describe('Volume: local write failures lose nothing acknowledged (issue 9)', () => {
  test('ENOSPC on the only copy: the writer gets ENOSPC, no block changes state, other reads go on', async () => {
    await withRig({ size: 4000, blockSize: 1000, locations: [A] }, async (rig) => {
      await rig.vol.write(0, bytes(3000, 1))
      const real = rig.replicas.get(A)!
      let full = true
      patch(rig, A, { write: (async (image: string, block: number, offset: number, data: Buffer, g: number) => {
        if (full && block === 1) throw errno('ENOSPC')
        await real.write(image, block, offset, data, g)
      }) as never })
      await rejectsWith(rig.vol.write(1500, Buffer.alloc(100, 9)), 'UKAI_ERR_NO_SPACE')
      const stored = await rig.store.require(IMG)
      for (let b = 0; b < 4; b++) assert.deepEqual(stored.replicasOf(b), [{ location: A, inSync: true }], `block ${b}`)
      assert.deepEqual(rig.errors.list(), [], 'an answer of ENOSPC is not a node gone away')
      assert.ok((await readAll(rig.vol, 0, 3000)).buf.subarray(0, 3000).equals(bytes(3000, 1)), 'acknowledged data still reads back')
      // Space again: the same write goes through.
      full = false
      await rig.vol.write(1500, Buffer.alloc(100, 9))
      assert.ok((await readAll(rig.vol, 1500, 100)).buf.subarray(0, 100).equals(Buffer.alloc(100, 9)))
    })
  })

  test('ENOSPC on one of two copies: only the block it missed goes out of sync there, and its node is not put in the error state', async () => {
    await withRig({ size: 4000, blockSize: 1000, local: [A] }, async (rig) => {
      await rig.vol.write(0, bytes(4000, 2))
      const real = rig.replicas.get(B)!
      // B is a peer: its ENOSPC comes back as the NBD error of its answer.
      patch(rig, B, { write: (async (image: string, block: number, offset: number, data: Buffer, g: number) => {
        if (block === 2) throw new UkaiError('UKAI_ERR_NO_SPACE', 'NBD_CMD_WRITE failed on the NBD server: NBD_ENOSPC', { nbdError: 28 })
        await real.write(image, block, offset, data, g)
      }) as never })
      await rig.vol.write(2100, Buffer.alloc(10, 7))
      const stored = await rig.store.require(IMG)
      assert.deepEqual(stored.replicasOf(2), [{ location: A, inSync: true }, { location: B, inSync: false }])
      for (const b of [0, 1, 3]) assert.deepEqual(stored.replicasOf(b).map((x) => x.inSync), [true, true], `block ${b} written before and not flushed`)
      assert.deepEqual(rig.errors.list(), [])
    })
  })

  test('a write no copy took fails with the copies\' error; of two copies one keeps the block, none is lost', async () => {
    await withRig({ size: 4000, blockSize: 1000 }, async (rig) => {
      await rig.vol.write(0, bytes(4000, 3))
      for (const loc of [A, B]) patch(rig, loc, { write: (async () => { throw errno('ENOSPC') }) as never })
      await rejectsWith(rig.vol.write(500, Buffer.alloc(10)), 'UKAI_ERR_NO_SPACE')
      const states = (await rig.store.require(IMG)).replicasOf(0)
      assert.equal(states.filter((r) => r.inSync).length, 1, JSON.stringify(states))
      for (const b of [1, 2, 3]) assert.deepEqual((await rig.store.require(IMG)).replicasOf(b).map((x) => x.inSync), [true, true])
    })
  })

  test('two writes no copy took, settled at once while the preferred copy changes: one copy keeps the block', async () => {
    await withRig({ size: 4000, blockSize: 1000 }, async (rig) => {
      await rig.vol.write(0, bytes(4000, 3))
      for (const loc of [A, B]) patch(rig, loc, { write: (async () => { throw errno('EIO') }) as never })
      // Metadata changes take a while: the second write settles while the first one's change is on its way.
      const update = rig.store.update.bind(rig.store)
      rig.store.update = (async (...args: Parameters<typeof update>) => {
        await new Promise((resolve) => setTimeout(resolve, 50))
        return await update(...args)
      }) as typeof update
      const first = rig.vol.write(0, Buffer.alloc(10)).then(() => 'acknowledged', (err: UkaiError) => err.code)
      await new Promise((resolve) => setTimeout(resolve, 15))
      // A goes into the error state: the second write would keep B, where the first keeps A.
      rig.errors.fail(A, 'from the test')
      const second = rig.vol.write(100, Buffer.alloc(10)).then(() => 'acknowledged', (err: UkaiError) => err.code)
      assert.deepEqual(await Promise.all([first, second]), ['UKAI_ERR_UNAVAILABLE', 'UKAI_ERR_UNAVAILABLE'])
      rig.store.update = update
      const states = (await rig.store.require(IMG)).replicasOf(0)
      assert.equal(states.filter((r) => r.inSync).length, 1, `block 0 was left without an in-sync copy: ${JSON.stringify(states)}`)
    })
  })

  test('a flush that could not record a failed replica fails, and so does its retry, until the failure is recorded', async () => {
    await withRig({ size: 4000, blockSize: 1000, local: [A] }, async (rig) => {
      await rig.vol.write(0, bytes(2000, 4))
      const real = rig.replicas.get(B)!
      patch(rig, B, { flush: (async () => { throw errno('EIO') }) as never })
      // The store refuses the first change after this (a metadata store away).
      const update = rig.store.update.bind(rig.store)
      let refuse = true
      rig.store.update = (async (...args: Parameters<typeof update>) => {
        if (refuse) { refuse = false; throw new UkaiError('UKAI_ERR_METADATA_UNAVAILABLE', 'from the test') }
        return await update(...args)
      }) as typeof update
      await rejectsWith(rig.vol.flush(), 'UKAI_ERR_METADATA_UNAVAILABLE')
      assert.deepEqual((await rig.store.require(IMG)).replicasOf(0).map((x) => x.inSync), [true, true])
      // The retried flush flushes B again, and records that it failed.
      await rig.vol.flush()
      const stored = await rig.store.require(IMG)
      for (const b of [0, 1]) assert.deepEqual(stored.replicasOf(b), [{ location: A, inSync: true }, { location: B, inSync: false }], `block ${b}`)
      void real
    })
  })

  test('the only copy cannot be flushed: the flush fails, and keeps failing', async () => {
    await withRig({ size: 4000, blockSize: 1000, locations: [A] }, async (rig) => {
      await rig.vol.write(0, bytes(1000, 5))
      patch(rig, A, { flush: (async () => { throw errno('EIO') }) as never })
      await rejectsWith(rig.vol.flush(), 'UKAI_ERR_IO', /only in-sync copy of block 0 could not be flushed/)
      await rejectsWith(rig.vol.flush(), 'UKAI_ERR_IO')
      assert.deepEqual((await rig.store.require(IMG)).replicasOf(0), [{ location: A, inSync: true }])
    })
  })
})

describe('Volume: resync while the image is written (issue 9)', () => {
  /** A rig whose B replicas are all out of sync (a location just added), with B's writes held at a gate. */
  async function outOfSyncRig (rig: Rig): Promise<{ open: () => void, held: Promise<void> }> {
    await rig.vol.write(0, bytes(16 * 1000, 7))
    await rig.store.update(IMG, (m) => { m.setSync(B, 0, m.blockCount, false); return m })
    rig.vol.refresh(await rig.store.require(IMG))
    const real = rig.replicas.get(B)!
    let open!: () => void
    const gate = new Promise<void>((resolve) => { open = resolve })
    let entered!: () => void
    const held = new Promise<void>((resolve) => { entered = resolve })
    patch(rig, B, { write: (async (image: string, block: number, offset: number, data: Buffer, g: number) => {
      entered()
      await gate
      await real.write(image, block, offset, data, g)
    }) as never })
    return { open, held }
  }

  test('a whole-block resync is sparse: holes of the source are punched on the target, never skipped, and only data is copied', async () => {
    const MiB = 2 ** 20
    await withRig({ size: 4 * MiB, blockSize: MiB, local: [A] }, async (rig) => {
      await rig.vol.write(0, bytes(MiB, 1))
      await rig.vol.zero(MiB / 4, MiB / 2)
      await rig.vol.flush()
      // B holds stale data where A has holes, in a block A holds data in and in one A never wrote.
      await rig.blocks[B]!.write(IMG, 0, MiB / 4, bytes(MiB / 2, 2))
      await rig.blocks[B]!.write(IMG, 2, 0, bytes(MiB / 4, 3))
      await rig.store.update(IMG, (m) => { m.setSync(B, 0, 4, false); return m })
      rig.vol.refresh(await rig.store.require(IMG))
      const result = await rig.vol.sync(0, 4)
      assert.deepEqual(result.failed, [])
      assert.equal(result.bytes, MiB / 2, 'more than the source\'s data was copied')
      const b = rig.replicas.get(B)!
      for (const [block, off, len] of [[0, MiB / 4, MiB / 2], [2, 0, MiB]] as const) {
        const got = Buffer.alloc(len, 0xee)
        await b.read(IMG, block, off, got)
        assert.ok(got.equals(Buffer.alloc(len)), `block ${block}: the stale data at ${off} was not zeroed`)
      }
      const model = bytes(MiB, 1).fill(0, MiB / 4, 3 * MiB / 4)
      const got = Buffer.alloc(MiB)
      await b.read(IMG, 0, 0, got)
      assert.ok(got.equals(model))
      const allocated = async (block: number): Promise<number> => (await stat(rig.blocks[B]!.blockPath(IMG, block))).blocks * 512
      assert.ok(await allocated(0) <= MiB / 2 + 64 * 1024, `block 0 on B allocates ${await allocated(0)} bytes`)
      assert.equal(await allocated(2), 0)
    })
  })

  test('a write to a block the resync has not reached does not wait for the resync', async () => {
    await withRig({ size: 16 * 1000, blockSize: 1000, local: [A] }, async (rig) => {
      const { open, held } = await outOfSyncRig(rig)
      const sync = rig.vol.sync(0, 16)
      await held
      // Blocks 0 and 1 are being copied, stuck at B; block 15 is not reached yet.
      const write = rig.vol.write(15 * 1000 + 10, Buffer.from('guest'))
      const done = await Promise.race([write.then(() => true), new Promise((resolve) => setTimeout(() => resolve(false), 2000))])
      open()
      await sync
      await write
      assert.equal(done, true, 'the write waited for the resync of other blocks')
      const stored = await rig.store.require(IMG)
      for (let b = 0; b < 16; b++) assert.deepEqual(stored.replicasOf(b).map((x) => x.inSync), [true, true], `block ${b}`)
      await checkReplicas(rig)
    })
  })

  test('a write to the range the resync is reading from the source neither waits for that read nor is overwritten by it', async () => {
    await withRig({ size: 4 * 1000, blockSize: 1000, local: [A] }, async (rig) => {
      await rig.vol.write(0, bytes(4 * 1000, 7))
      await rig.store.update(IMG, (m) => { m.setSync(B, 0, m.blockCount, false); return m })
      rig.vol.refresh(await rig.store.require(IMG))
      // The source's reads take their data at once and answer later: what
      // they answer is older than a write that lands meanwhile.
      const real = rig.replicas.get(A)!
      let open!: () => void
      const gate = new Promise<void>((resolve) => { open = resolve })
      let entered!: () => void
      const reading = new Promise<void>((resolve) => { entered = resolve })
      patch(rig, A, { read: (async (image: string, block: number, offset: number, buf: Buffer) => {
        await real.read(image, block, offset, buf)
        entered()
        await gate
      }) as never })
      const model = Buffer.from(bytes(4 * 1000, 7))
      const sync = rig.vol.sync(0, 4)
      await reading
      const data = Buffer.from('written while the copy read')
      const write = rig.vol.write(10, data).then(() => { data.copy(model, 10) })
      const done = await Promise.race([write.then(() => true), new Promise((resolve) => setTimeout(() => resolve(false), 2000))])
      open()
      await sync
      await write
      assert.equal(done, true, 'the write waited for the copy\'s read of the source')
      const stored = await rig.store.require(IMG)
      for (let b = 0; b < 4; b++) assert.deepEqual(stored.replicasOf(b).map((x) => x.inSync), [true, true], `block ${b}`)
      await checkReplicas(rig, model)
    })
  })

  test('a resync flushes its targets as it copies (every 32 MiB), not only once at the end of a batch', async () => {
    const MiB = 2 ** 20
    await withRig({ size: 96 * MiB, blockSize: 32 * MiB, local: [A] }, async (rig) => {
      await rig.vol.write(0, bytes(96 * MiB, 5))
      await rig.vol.flush()
      await rig.store.update(IMG, (m) => { m.setSync(B, 0, m.blockCount, false); return m })
      rig.vol.refresh(await rig.store.require(IMG))
      const real = rig.replicas.get(B)!
      let flushes = 0
      patch(rig, B, { flush: (async (image: string) => { flushes++; await real.flush(image) }) as never })
      const result = await rig.vol.sync(0, 3)
      assert.deepEqual(result.failed, [])
      // Three blocks of 32 MiB: a flush after each 32 MiB copied, and the batch's own.
      assert.ok(flushes >= 3, `the target was flushed ${flushes} times for 96 MiB`)
      await checkReplicas(rig)
    })
  })

  test('a resync writes its targets a chunk at a time while nobody writes the image, in 512 KiB pieces while a writer has it open', async () => {
    const MiB = 2 ** 20
    for (const writer of [false, true]) {
      await withRig({ size: 16 * MiB, blockSize: 16 * MiB, local: [A] }, async (rig) => {
        await rig.vol.write(0, bytes(16 * MiB, 3))
        await rig.store.update(IMG, (m) => { m.setSync(B, 0, m.blockCount, false); return m })
        rig.vol.refresh(await rig.store.require(IMG))
        const real = rig.replicas.get(B)!
        let largest = 0
        patch(rig, B, { write: (async (image: string, block: number, offset: number, data: Buffer, g: number) => {
          largest = Math.max(largest, data.length)
          await real.write(image, block, offset, data, g)
        }) as never })
        const close = writer ? rig.vol.open(true, 'nbd client') : undefined
        try {
          assert.deepEqual((await rig.vol.sync(0, 1)).failed, [])
        } finally { await close?.() }
        // A writer waits for one piece of the copy's writes at most; without one, a chunk (4 MiB) goes at once.
        assert.equal(largest, writer ? 512 * 1024 : 4 * MiB, `largest write to the target ${writer ? 'with' : 'without'} a writer`)
        await checkReplicas(rig)
      })
    }
  })

  test('writes during a resync, to every block and at every moment, leave identical replicas', async () => {
    await withRig({ size: 16 * 1000, blockSize: 1000, local: [A] }, async (rig) => {
      const { open } = await outOfSyncRig(rig)
      const model = Buffer.from(bytes(16 * 1000, 7))
      const sync = rig.vol.sync(0, 16)
      // While B is held: writes to separate ranges, some waiting for the chunk being copied.
      const writes: Array<Promise<void>> = []
      for (let i = 0; i < 16; i++) {
        const off = i * 1000 + 100 + (i % 3) * 200
        const data = bytes(300, 100 + i)
        writes.push(rig.vol.write(off, data).then(() => { data.copy(model, off) }))
      }
      await new Promise((resolve) => setTimeout(resolve, 50))
      open()
      // Then overlapping ones, one at a time (the model's order is the volume's).
      for (let i = 0; i < 30; i++) {
        const off = (i * 397) % (16 * 1000 - 300)
        const data = bytes(300, 200 + i)
        await rig.vol.write(off, data)
        data.copy(model, off)
      }
      await sync
      await Promise.all(writes)
      const stored = await rig.store.require(IMG)
      for (let b = 0; b < 16; b++) assert.deepEqual(stored.replicasOf(b).map((x) => x.inSync), [true, true], `block ${b}`)
      await checkReplicas(rig, model)
    })
  })
})
