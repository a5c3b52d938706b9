/**
 * The writer lease against a real (embedded) metadata store. The
 * regression (found by the chaos run, seed 1768545267, cycle 56): a
 * writer restarted after a crash took the lease and, while it was still
 * asking who else to fence, another node took the lease from it. Fenced
 * before it had learnt what it inherited, it reported "nothing left to
 * reconcile", so the next holder reconciled nothing, trimmed the log, and
 * a block the crashed writer had left different on its replicas stayed
 * in sync on all of them with different bytes.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { join } from 'node:path'
import { FileCore } from '../metadata/file-core.js'
import { ImageMeta } from '../metadata/image.js'
import { RangeSet } from '../metadata/range-set.js'
import { MetadataStore } from '../metadata/store.js'
import { makeTmpDir } from '../../test/helpers/tmp.js'
import { testCluster } from '../../test/helpers/cluster-context.js'
import { WriterLease, type LeaseHolder } from './writer-lease.js'
import type { WriterSession } from './writer-session.js'

function holder (meta: ImageMeta, reconciled: RangeSet[]): LeaseHolder {
  return {
    name: meta.name,
    meta,
    idle: () => false,
    refresh: () => {},
    adoptLog: () => {},
    reconcile: async (s: WriterSession, blocks: RangeSet) => {
      reconciled.push(blocks.clone())
      for (const [a, b] of blocks.ranges()) s.unsafe.remove(a, b)
    },
    trimLog: async () => {},
    flush: async () => {}
  }
}

test('a writer fenced before it knew what it inherited vouches for nothing: the next one reconciles the whole log', async (t) => {
  const dir = await makeTmpDir('ukai-lease-')
  t.after(dir.cleanup)
  const store = new MetadataStore(await FileCore.open(join(dir.path, 'metadata')), 22222)
  t.after(async () => await store.close())
  const meta = new ImageMeta({ name: 'img', size: 32 * 4096, blockSize: 4096 })
  for (const n of ['10.0.0.1', '10.0.0.2', '10.0.0.3']) meta.addLocation(n, 0, meta.blockCount, true)
  await store.create(meta)
  // A writer that crashed left blocks 3 and 23 in the dirty-block log.
  const dead = await store.grantLease(60)
  const old = await store.acquireWriter('img', { node: '10.0.0.1', session: 'crashed', purpose: 'write', lease: dead.id, mayTakeOver: () => false })
  await store.putDirty('img', new RangeSet([[3, 4], [23, 24]]), { guard: old.guard })

  // Node A (the crashed writer, restarted) takes the lease; asking the
  // others to fence is held until B has taken the lease from it.
  const aDone: RangeSet[] = []
  const bDone: RangeSet[] = []
  let letAGo!: () => void
  const aAsked = new Promise<void>((resolve) => { letAGo = resolve })
  let aWaiting!: () => void
  const aIsWaiting = new Promise<void>((resolve) => { aWaiting = resolve })
  const aCtx = { ...await testCluster(store, '10.0.0.1'), mayTakeOver: () => true, fenceOthers: async () => { aWaiting(); await aAsked; return undefined } }
  const a = new WriterLease(holder(meta, aDone), store, aCtx)
  const aUse = a.use('write')
  await aIsWaiting

  // Node B (a hypervisor) takes it over: it fences A, as the node would, and
  // uses what A's session says it cannot vouch for.
  let reported: Array<{ session: string, unsafe: RangeSet | undefined }> = []
  const bCtx = {
    ...await testCluster(store, '10.0.0.2'),
    mayTakeOver: () => true,
    fenceOthers: async (_image: string, grant: { generation: number, previous?: { session: string } }) => {
      reported = a.fence(grant.generation)
      const s = reported.find((x) => x.session === grant.previous?.session)
      return s?.unsafe
    }
  }
  const b = new WriterLease(holder(meta, bDone), store, bCtx)
  await b.use('write')
  letAGo()
  await assert.rejects(aUse)

  assert.equal(reported.length, 1)
  assert.equal(reported[0]!.unsafe, undefined, 'a session fenced before it knew its inheritance vouched for some blocks')
  assert.deepEqual(bDone.map((r) => r.toJSON()), [[[3, 4], [23, 24]]], 'the new holder did not reconcile the whole dirty-block log')
})
