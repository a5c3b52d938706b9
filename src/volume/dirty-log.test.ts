/**
 * The dirty-block log against a real (embedded) metadata store. The
 * regression: a write that arrived while a trim was storing a log without
 * its block found the block in the old log and went ahead unlogged; a
 * crash then would skip the block's reconciliation.
 */
import { test, type TestContext } from 'node:test'
import assert from 'node:assert/strict'
import { join } from 'node:path'
import { FileCore } from '../metadata/file-core.js'
import { ImageMeta } from '../metadata/image.js'
import { RangeSet } from '../metadata/range-set.js'
import { MetadataStore, type ChangeOptions } from '../metadata/store.js'
import { makeTmpDir } from '../../test/helpers/tmp.js'
import { DirtyLog } from './dirty-log.js'

/** A store whose next putDirty waits for `open()`. */
class GatedStore extends MetadataStore {
  gate: Promise<void> | undefined
  override async putDirty (name: string, blocks: RangeSet, options?: ChangeOptions): Promise<void> {
    const g = this.gate
    this.gate = undefined
    if (g !== undefined) await g
    await super.putDirty(name, blocks, options)
  }
}

/** An image of two in-sync locations on an embedded store of class `Store`, its writer lease taken, and its empty log. */
async function logRig<S extends MetadataStore> (t: TestContext, Store: new (...args: ConstructorParameters<typeof MetadataStore>) => S): Promise<{ store: S, owner: { guard: number }, log: DirtyLog, lease: { revoke: () => Promise<void> } }> {
  const dir = await makeTmpDir('ukai-dirty-')
  t.after(dir.cleanup)
  const store = new Store(await FileCore.open(join(dir.path, 'metadata')), 22222)
  t.after(async () => await store.close())
  const meta = new ImageMeta({ name: 'img', size: 100 * 4096, blockSize: 4096 })
  meta.addLocation('10.0.0.1', 0, meta.blockCount, true)
  meta.addLocation('10.0.0.2', 0, meta.blockCount, true)
  await store.create(meta)
  const lease = await store.grantLease(60)
  const grant = await store.acquireWriter('img', { node: '10.0.0.1', session: 's', purpose: 'write', lease: lease.id, mayTakeOver: () => false })
  const log = new DirtyLog(store, 'img')
  log.adopt(new RangeSet())
  return { store, owner: { guard: grant.guard }, log, lease }
}

test('a write that arrives while a trim drops its block is logged again before it runs', async (t) => {
  const { store, owner, log, lease } = await logRig(t, GatedStore)

  // Block 5 written and done: it sits in the log.
  await log.around(owner, [5], async () => {})
  assert.deepEqual((await store.getDirty('img')).toJSON(), [[5, 6]])
  // A trim that drops it starts storing, and is held there.
  let open!: () => void
  store.gate = new Promise<void>((resolve) => { open = resolve })
  const trim = log.trim(owner, 0)
  await new Promise((resolve) => setImmediate(resolve))
  // Now a write to block 5 arrives. While it runs (until after the trim
  // has landed), the stored log must name block 5.
  let during: RangeSet | undefined
  const write = log.around(owner, [5], async () => {
    await trim
    during = await store.getDirty('img')
  })
  open()
  await Promise.all([trim, write])
  assert.deepEqual(during?.toJSON(), [[5, 6]], 'the write ran while the stored log did not name its block')
  await lease.revoke()
})

test('first writes to many blocks at once are logged in one or two metadata writes, each before its write runs', async (t) => {
  let puts = 0
  class CountingStore extends MetadataStore {
    override async putDirty (name: string, blocks: RangeSet, options?: ChangeOptions): Promise<void> {
      puts++
      await super.putDirty(name, blocks, options)
    }
  }
  const { store, owner, log, lease } = await logRig(t, CountingStore)

  const blocks = Array.from({ length: 32 }, (_, i) => i * 3)
  const seen: boolean[] = []
  await Promise.all(blocks.map(async (b) => await log.around(owner, [b], async () => {
    seen.push((await store.getDirty('img')).has(b))
  })))
  assert.ok(seen.length === 32 && seen.every((x) => x), 'a write ran before its block was stored in the log')
  assert.deepEqual([...(await store.getDirty('img')).values()], blocks)
  assert.ok(puts <= 2, `${puts} metadata writes for 32 blocks written at once`)
  await lease.revoke()
})
