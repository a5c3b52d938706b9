/**
 * The conformance suite of MetadataStore (abstract-level's model): the
 * same tests on every metadata core, against a fresh, empty store from
 * `open`, with `openPeer` giving a second instance over the same data
 * (another process's view).
 */
import { test, describe } from 'node:test'
import assert from 'node:assert/strict'
import { UkaiError, type ErrorCode } from '../errors.js'
import { encodeStored } from './codec.js'
import { ImageMeta } from './image.js'
import { RangeSet } from './range-set.js'
import type { MetadataStore, WriterRecord } from './store.js'
import { rejectsWith } from '../../test/helpers/assertions.js'

export interface OpenedStore {
  store: MetadataStore
  cleanup: () => Promise<void>
  /** Another instance over the same data; closed by the caller. */
  openPeer: () => Promise<MetadataStore>
}

/** A valid two-location image: blocks [0, 10) on A, [5, 10) on B with 7 out of sync there. */
export function sampleImage (name: string): ImageMeta {
  const meta = new ImageMeta({ name, size: 10 * 4096 - 100, blockSize: 4096, usedSize: 0, hypervisors: ['10.0.0.9'] })
  meta.addLocation('10.0.0.1:22222', 0, 10, true)
  meta.addLocation('10.0.0.2', 5, 10, true)
  meta.setSync('10.0.0.2', 7, 8, false)
  return meta
}

/** The stored form without the revision: what a change must (not) alter. */
const content = (meta: ImageMeta | undefined): unknown => {
  assert.ok(meta !== undefined, 'image is missing')
  const { revision: _r, ...rest } = encodeStored(meta)
  return rest
}

/** Resolves when `store.watch` reports `name` (the test's timeout guards a store that never does). */
async function nextChange (store: MetadataStore, name: string): Promise<{ seen: Promise<void>, stop: () => Promise<void> }> {
  let resolveSeen = (): void => {}
  const seen = new Promise<void>((resolve) => { resolveSeen = resolve })
  const w = await store.watch({ onImage: (changed) => { if (changed === name) resolveSeen() } })
  return { seen, stop: async () => await w.close() }
}

const never = (): boolean => false

export function runStoreConformance (name: string, open: () => Promise<OpenedStore>): void {
  describe(`MetadataStore conformance: ${name}`, () => {
    /** Runs `fn` with a fresh store, closing and cleaning up afterwards. */
    const withStore = async (fn: (s: MetadataStore, opened: OpenedStore) => Promise<void>): Promise<void> => {
      const opened = await open()
      try {
        await fn(opened.store, opened)
      } finally {
        await opened.store.close()
        await opened.cleanup()
      }
    }
    const withPeer = async (fn: (s: MetadataStore, peer: MetadataStore) => Promise<void>): Promise<void> => withStore(async (s, opened) => {
      const peer = await opened.openPeer()
      try { await fn(s, peer) } finally { await peer.close() }
    })

    test('a new store is empty', async () => withStore(async (s) => {
      assert.deepEqual(await s.list(), [])
      assert.equal(await s.get('image01'), undefined)
      await rejectsWith(s.require('image01'), 'UKAI_ERR_NOT_FOUND', /image 'image01' not found/)
      assert.deepEqual(await s.listNodes(), [])
    }))

    test('create, get, list', async () => withStore(async (s) => {
      const meta = sampleImage('image01')
      const created = await s.create(meta)
      assert.ok(created.revision > 0)
      const got = await s.get('image01')
      assert.ok(got instanceof ImageMeta)
      assert.deepEqual(content(got), content(meta))
      assert.ok(got.revision >= created.revision)
      assert.deepEqual(got.replicasOf(7), [{ location: '10.0.0.1:22222', inSync: true }, { location: '10.0.0.2', inSync: false }])
      assert.deepEqual(got.replicasOf(2), [{ location: '10.0.0.1:22222', inSync: true }])
      assert.deepEqual(content(await s.require('image01')), content(meta))
      assert.deepEqual(await s.list(), ['image01'])
      await s.create(sampleImage('b-image'))
      await s.create(sampleImage('a-image'))
      assert.deepEqual(await s.list(), ['a-image', 'b-image', 'image01'])
      const st = (await s.state('image01'))!
      assert.match(st.incarnation, /^[0-9a-f-]{36}$/)
      assert.equal(st.writer, undefined)
      assert.equal(st.generation, 0)
      assert.deepEqual(st.opens, [])
    }))

    test('the caller\'s objects are not the stored ones', async () => withStore(async (s) => {
      const meta = sampleImage('img')
      await s.create(meta)
      meta.usedSize = 5
      meta.hypervisors.push('10.0.0.10')
      const got = (await s.get('img'))!
      assert.equal(got.usedSize, 0)
      got.usedSize = 7
      got.locations.get('10.0.0.1:22222')!.outOfSync.add(0, 1)
      const again = (await s.get('img'))!
      assert.equal(again.usedSize, 0)
      assert.deepEqual(again.hypervisors, ['10.0.0.9'])
      assert.equal(again.replicasOf(0)[0]!.inSync, true)
    }))

    test('create of an existing name fails with UKAI_ERR_EXISTS and keeps the stored image', async () => withStore(async (s) => {
      await s.create(sampleImage('img'))
      const incarnation = (await s.state('img'))!.incarnation
      const other = sampleImage('img')
      other.usedSize = 4096
      await rejectsWith(s.create(other), 'UKAI_ERR_EXISTS', /image 'img' already exists/)
      const st = (await s.state('img'))!
      assert.equal(st.meta.usedSize, 0)
      assert.equal(st.incarnation, incarnation)
    }))

    test('concurrent creates of one name, from two instances: exactly one wins', async () => withPeer(async (s, peer) => {
      const results = await Promise.allSettled(Array.from({ length: 8 }, async (_, i) => {
        const m = sampleImage('race')
        m.usedSize = i
        return await (i % 2 === 0 ? s : peer).create(m)
      }))
      const won = results.filter((r) => r.status === 'fulfilled')
      assert.equal(won.length, 1)
      for (const r of results) {
        if (r.status === 'rejected') assert.equal((r.reason as UkaiError).code, 'UKAI_ERR_EXISTS')
      }
      assert.equal((await s.get('race'))!.usedSize, (won[0] as PromiseFulfilledResult<ImageMeta>).value.usedSize)
    }))

    test('create validates the image', async () => withStore(async (s) => {
      const bad = sampleImage('img')
      bad.usedSize = bad.size + 1
      await rejectsWith(s.create(bad), 'UKAI_ERR_INVALID_METADATA', /'used_size' .* is larger than 'size'/)
      const uncovered = new ImageMeta({ name: 'img', size: 100, blockSize: 10 })
      uncovered.addLocation('h', 0, 9, true)
      await rejectsWith(s.create(uncovered), 'UKAI_ERR_INVALID_METADATA', /block 9 has no location/)
      assert.deepEqual(await s.list(), [])
    }))

    test('update applies the change and raises the revision', async () => withStore(async (s) => {
      const created = await s.create(sampleImage('img'))
      const next = await s.update('img', (m) => {
        m.usedSize = 8192
        m.setSync('10.0.0.2', 7, 8, true)
        m.addLocation('10.0.0.3', 0, 2, false)
        return m
      })
      assert.ok(next.revision > created.revision)
      const got = (await s.get('img'))!
      assert.ok(got.revision >= next.revision)
      assert.equal(got.usedSize, 8192)
      assert.deepEqual(got.replicasOf(7).map((r) => r.inSync), [true, true])
      assert.deepEqual(got.replicasOf(1), [{ location: '10.0.0.1:22222', inSync: true }, { location: '10.0.0.3', inSync: false }])
      assert.deepEqual(content(got), content(next))
      // An async change, returning a different object.
      const third = await s.update('img', async (m) => {
        await Promise.resolve()
        return new ImageMeta({ name: m.name, size: m.size, blockSize: m.blockSize, usedSize: 1, locations: m.locations })
      })
      assert.ok(third.revision > next.revision)
      assert.equal((await s.get('img'))!.usedSize, 1)
      assert.deepEqual((await s.get('img'))!.hypervisors, [])
      // Removing a location drops its keys: the image reads back without it.
      await s.update('img', (m) => { m.locations.delete('10.0.0.3'); return m })
      assert.deepEqual([...(await s.get('img'))!.locations.keys()], ['10.0.0.1:22222', '10.0.0.2'])
    }))

    test('update of a missing image fails with UKAI_ERR_NOT_FOUND and creates nothing', async () => withStore(async (s) => {
      let called = false
      await rejectsWith(s.update('ghost', (m) => { called = true; return m }), 'UKAI_ERR_NOT_FOUND', /image 'ghost' not found/)
      assert.equal(called, false)
      assert.deepEqual(await s.list(), [])
    }))

    test('an invalid update writes nothing', async () => withStore(async (s) => {
      await s.create(sampleImage('img'))
      const before = await s.get('img')
      const bad: Array<[(m: ImageMeta) => ImageMeta, ErrorCode, RegExp]> = [
        [(m) => { m.usedSize = m.size + 1; return m }, 'UKAI_ERR_INVALID_METADATA', /'used_size'/],
        [(m) => { m.usedSize = -1; return m }, 'UKAI_ERR_INVALID_METADATA', /'used_size'/],
        [(m) => { m.locations.get('10.0.0.1:22222')!.blocks.remove(0, 1); return m }, 'UKAI_ERR_INVALID_METADATA', /block 0 has no location/],
        [(m) => { m.locations.get('10.0.0.2')!.outOfSync.add(0, 1); return m }, 'UKAI_ERR_INVALID_METADATA', /does not hold them all/],
        [(m) => { m.addLocation('not a host', 0, 1, true); return m }, 'UKAI_ERR_INVALID_METADATA', /invalid location/],
        [(m) => { m.hypervisors.push('bad/host'); return m }, 'UKAI_ERR_INVALID_METADATA', /hypervisor/],
        [(m) => { m.blockSize = 0; return m }, 'UKAI_ERR_INVALID_METADATA', /'block_size' must be a positive integer/],
        [(m) => { m.size = m.size * 2; return m }, 'UKAI_ERR_INVALID_METADATA', /has no location/],
        [(m) => { m.name = 'renamed'; return m }, 'UKAI_ERR_INVALID_ARGUMENT', /may not rename/],
        [(m) => { m.usedSize = 1; throw new UkaiError('UKAI_ERR_BUSY', 'change refused') }, 'UKAI_ERR_BUSY', /change refused/]
      ]
      for (const [change, code, message] of bad) {
        await rejectsWith(s.update('img', change), code, message)
        const now = await s.get('img')
        assert.deepEqual(content(now), content(before))
      }
      assert.deepEqual(await s.list(), ['img'])
      // The store still works after the failures; a change of nothing writes nothing.
      const same = await s.update('img', (m) => m)
      assert.deepEqual(content(same), content(before))
    }))

    test('concurrent updates of one image from two instances are all applied', async () => withPeer(async (s, peer) => {
      await s.create(sampleImage('img'))
      const n = 40
      await Promise.all(Array.from({ length: n }, async (_, i) => await (i % 2 === 0 ? s : peer).update('img', async (m) => {
        await new Promise((resolve) => setImmediate(resolve))
        m.hypervisors.push(`10.1.0.${i}`)
        m.usedSize += 1
        return m
      })))
      const got = (await s.get('img'))!
      assert.equal(got.usedSize, n)
      assert.deepEqual(got.hypervisors.slice(1).sort(), Array.from({ length: n }, (_, i) => `10.1.0.${i}`).sort())
    }))

    test('two updates that each rely on what the other removes: only one lands', async () => withPeer(async (s, peer) => {
      const meta = new ImageMeta({ name: 'img', size: 4096, blockSize: 4096 })
      meta.addLocation('10.0.0.1', 0, 1, true)
      meta.addLocation('10.0.0.2', 0, 1, true)
      await s.create(meta)
      // Each removes one replica if the other is still in sync (remove-location's rule).
      const removeIfOther = (gone: string, other: string) => async (m: ImageMeta): Promise<ImageMeta> => {
        await new Promise((resolve) => setTimeout(resolve, 20))
        if (!m.replicasOf(0).some((r) => r.location === other && r.inSync)) throw new UkaiError('UKAI_ERR_PERMISSION', `${other} is not in sync`)
        m.locations.delete(gone)
        return m
      }
      const results = await Promise.allSettled([
        s.update('img', removeIfOther('10.0.0.1', '10.0.0.2')),
        peer.update('img', removeIfOther('10.0.0.2', '10.0.0.1'))
      ])
      assert.equal(results.filter((r) => r.status === 'fulfilled').length, 1)
      assert.equal((await s.get('img'))!.replicasOf(0).length, 1)
    }))

    test('updates of different images do not interfere', async () => withStore(async (s) => {
      await s.create(sampleImage('a'))
      await s.create(sampleImage('b'))
      await Promise.all([
        ...Array.from({ length: 10 }, async () => await s.update('a', (m) => { m.usedSize++; return m })),
        ...Array.from({ length: 5 }, async () => await s.update('b', (m) => { m.usedSize += 2; return m }))
      ])
      assert.equal((await s.get('a'))!.usedSize, 10)
      assert.equal((await s.get('b'))!.usedSize, 10)
    }))

    test('keys stay small: a 1 TiB image of 1 MiB blocks, and a sync-state change rewrites one small key', async () => withStore(async (s) => {
      const meta = new ImageMeta({ name: 'big', size: 2 ** 40, blockSize: 2 ** 20 })
      meta.addLocation('10.0.0.1', 0, meta.blockCount, true)
      meta.addLocation('10.0.0.2', 0, meta.blockCount, true)
      await s.create(meta)
      const before = await s.core.range('images/big/meta/')
      assert.equal(before.kvs.length, 1 + 2 * 16, 'a header and 16 segments per location')
      assert.ok(before.kvs.every((kv) => kv.value.length < 400), `largest key: ${Math.max(...before.kvs.map((kv) => kv.value.length))} bytes`)
      // Every other block of a segment out of sync: still one key per segment, bounded.
      await s.update('big', (m) => { for (let b = 0; b < 65536; b += 2) m.setSync('10.0.0.2', b, b + 1, false); return m })
      const fragmented = await s.core.get('images/big/meta/loc/10.0.0.2/00000000')
      assert.ok(fragmented !== undefined && fragmented.value.length < 1_200_000, 'a fully fragmented segment fits in one etcd request')
      const mid = await s.core.range('images/big/meta/')
      await s.update('big', (m) => { m.setSync('10.0.0.1', 500_000, 500_001, false); return m })
      const after = await s.core.range('images/big/meta/')
      const changed = after.kvs.filter((kv) => mid.kvs.find((o) => o.key === kv.key)?.modRevision !== kv.modRevision)
      assert.deepEqual(changed.map((kv) => kv.key), ['images/big/meta/loc/10.0.0.1/00000007'])
      assert.deepEqual((await s.get('big'))!.replicasOf(500_000), [{ location: '10.0.0.1', inSync: false }, { location: '10.0.0.2', inSync: true }])
    }))

    test('delete', async () => withStore(async (s) => {
      await s.create(sampleImage('a'))
      await s.create(sampleImage('b'))
      await s.putDirty('a', RangeSet.of(0, 2))
      const first = (await s.state('a'))!.incarnation
      await s.delete('a')
      assert.equal(await s.get('a'), undefined)
      assert.deepEqual(await s.list(), ['b'])
      await rejectsWith(s.delete('a'), 'UKAI_ERR_NOT_FOUND', /image 'a' not found/)
      await rejectsWith(s.update('a', (m) => m), 'UKAI_ERR_NOT_FOUND')
      await rejectsWith(s.putDirty('a', RangeSet.of(0, 1)), 'UKAI_ERR_NOT_FOUND')
      // The name is free again: a new incarnation, with nothing of the old one.
      await s.create(sampleImage('a'))
      const st = (await s.state('a'))!
      assert.notEqual(st.incarnation, first)
      assert.equal(st.dirty.isEmpty, true)
    }))

    test('invalid names are refused by every operation', async () => withStore(async (s) => {
      for (const bad of ['../etc/passwd', '..', 'a/b', '/etc', '', '.hidden', 'a\0b', 'x'.repeat(129)]) {
        await rejectsWith(s.get(bad), 'UKAI_ERR_INVALID_NAME')
        await rejectsWith(s.require(bad), 'UKAI_ERR_INVALID_NAME')
        await rejectsWith(s.update(bad, (m) => m), 'UKAI_ERR_INVALID_NAME')
        await rejectsWith(s.delete(bad), 'UKAI_ERR_INVALID_NAME')
        await rejectsWith(s.getDirty(bad), 'UKAI_ERR_INVALID_NAME')
        await rejectsWith(s.putDirty(bad, RangeSet.of(0, 1)), 'UKAI_ERR_INVALID_NAME')
        const meta = sampleImage('x')
        meta.name = bad
        await rejectsWith(s.create(meta), 'UKAI_ERR_INVALID_NAME')
      }
      assert.deepEqual(await s.list(), [])
    }))

    test('the dirty-block log: empty until stored, replaced by put, gone with the image', async () => withStore(async (s) => {
      await s.create(sampleImage('img'))
      const before = content(await s.get('img'))
      assert.equal((await s.getDirty('img')).isEmpty, true)
      await s.putDirty('img', new RangeSet([[1, 3], [7, 8]]))
      assert.deepEqual((await s.getDirty('img')).toJSON(), [[1, 3], [7, 8]])
      await s.putDirty('img', RangeSet.of(4, 5))
      assert.deepEqual((await s.getDirty('img')).toJSON(), [[4, 5]])
      await s.putDirty('img', new RangeSet())
      assert.equal((await s.getDirty('img')).isEmpty, true)
      await s.putDirty('img', RangeSet.of(0, 2))
      // The log is not part of the image's metadata.
      assert.deepEqual(content(await s.get('img')), before)
    }))

    test('the writer lease: one holder, generations, takeover, fencing of the old holder', async () => withPeer(async (s, peer) => {
      await s.create(sampleImage('img'))
      const la = await s.grantLease(30)
      const lb = await peer.grantLease(30)
      const req = (node: string, session: string, lease: string, mayTakeOver: (h: WriterRecord) => boolean) =>
        ({ node, session, purpose: 'write' as const, lease, mayTakeOver })
      const a = await s.acquireWriter('img', req('10.0.0.1', 'sa', la.id, never))
      assert.equal(a.generation, 1)
      assert.equal(a.previous, undefined)
      // The same session again (a retry): the same grant.
      assert.equal((await s.acquireWriter('img', req('10.0.0.1', 'sa', la.id, never))).generation, 1)
      // Another node, not allowed to take over: BUSY, nothing changes.
      await rejectsWith(peer.acquireWriter('img', req('10.0.0.2', 'sb', lb.id, never)), 'UKAI_ERR_BUSY', /being written by node 10\.0\.0\.1/)
      const st = (await peer.state('img'))!
      assert.equal(st.writer?.node, '10.0.0.1')
      assert.equal(st.writer?.generation, 1)
      // The holder's guarded changes work.
      await s.update('img', (m) => { m.usedSize = 100; return m }, { guard: a.guard })
      await s.putDirty('img', RangeSet.of(1, 2), { guard: a.guard })
      // A takeover: generation 2, the old holder named.
      let asked: WriterRecord | undefined
      const b = await peer.acquireWriter('img', req('10.0.0.2', 'sb', lb.id, (h) => { asked = h; return true }))
      assert.equal(asked?.node, '10.0.0.1')
      assert.equal(b.generation, 2)
      assert.equal(b.previous?.session, 'sa')
      assert.deepEqual(b.state.dirty.toJSON(), [[1, 2]])
      // The old holder is fenced: every guarded change fails and changes nothing.
      await rejectsWith(s.update('img', (m) => { m.usedSize = 200; return m }, { guard: a.guard }), 'UKAI_ERR_FENCED', /node 10\.0\.0\.2 took it over/)
      await rejectsWith(s.putDirty('img', RangeSet.of(5, 6), { guard: a.guard }), 'UKAI_ERR_FENCED')
      assert.equal((await s.get('img'))!.usedSize, 100)
      assert.deepEqual((await s.getDirty('img')).toJSON(), [[1, 2]])
      // Releasing with a stale guard does nothing; with the holder's, the lease is free.
      await s.releaseWriter('img', a.guard)
      assert.equal((await s.state('img'))!.writer?.node, '10.0.0.2')
      await peer.releaseWriter('img', b.guard)
      assert.equal((await s.state('img'))!.writer, undefined)
      // The generation outlives its holders.
      assert.equal((await s.acquireWriter('img', req('10.0.0.1', 'sc', la.id, never))).generation, 3)
      // A holder whose lease ends loses the writer key; the next grant goes on counting.
      await la.revoke()
      const deadline = Date.now() + 10_000
      while ((await peer.state('img'))!.writer !== undefined) {
        assert.ok(Date.now() < deadline, 'the writer key outlived its lease')
        await new Promise((resolve) => setTimeout(resolve, 20))
      }
      assert.equal((await peer.acquireWriter('img', req('10.0.0.2', 'sd', lb.id, never))).generation, 4)
      await lb.revoke()
    }))

    test('who has an image open, and no destroy while anyone has', async () => withPeer(async (s, peer) => {
      await s.create(sampleImage('img'))
      const la = await s.grantLease(30)
      const lb = await peer.grantLease(30)
      await s.putOpen('img', '10.0.0.1', { readers: 0, writers: 1 }, la.id)
      await peer.putOpen('img', '10.0.0.2:22222', { readers: 2, writers: 0 }, lb.id)
      const st = (await s.state('img'))!
      assert.deepEqual(st.opens.map((o) => [o.node, o.readers, o.writers]), [['10.0.0.1', 0, 1], ['10.0.0.2:22222', 2, 0]])
      await rejectsWith(peer.delete('img'), 'UKAI_ERR_BUSY', /open on node 10\.0\.0\.1 \(writing\), node 10\.0\.0\.2:22222 \(2 readers\)/)
      assert.ok(await s.get('img') !== undefined)
      await s.putOpen('img', '10.0.0.1', { readers: 0, writers: 0 }, la.id)
      await rejectsWith(s.delete('img'), 'UKAI_ERR_BUSY', /10\.0\.0\.2/)
      // A node that goes away (its lease ends) no longer has anything open.
      await lb.revoke()
      const deadline = Date.now() + 10_000
      while ((await s.state('img'))!.opens.length > 0) {
        assert.ok(Date.now() < deadline, 'the open outlived its lease')
        await new Promise((resolve) => setTimeout(resolve, 20))
      }
      await s.delete('img')
      await rejectsWith(s.putOpen('img', '10.0.0.1', { readers: 1, writers: 0 }, la.id), 'UKAI_ERR_NOT_FOUND')
      await la.revoke()
    }))

    test('nodes register under their lease; a live id is refused; the record stays when the node goes', async () => withPeer(async (s, peer) => {
      const info = { id: '10.0.0.1:22222', control_address: '10.0.0.1', control_port: 22221, started: new Date().toISOString() }
      const la = await s.grantLease(30)
      const r = await s.registerNode(info, la)
      assert.equal(r.registered, true)
      const lb = await peer.grantLease(30)
      // The same node under another spelling is the same id.
      const dup = await peer.registerNode({ ...info, id: '10.0.0.1' }, lb)
      assert.equal(dup.registered, false)
      assert.ok(!dup.registered && dup.holder.lease === la.id && dup.holder.pid === process.pid)
      let nodes = await peer.listNodes()
      assert.deepEqual(nodes.map((n) => [n.info.id, n.alive !== undefined]), [['10.0.0.1:22222', true]])
      await la.revoke()
      const deadline = Date.now() + 10_000
      while ((nodes = await peer.listNodes())[0]!.alive !== undefined) {
        assert.ok(Date.now() < deadline, 'the node stayed alive after its lease ended')
        await new Promise((resolve) => setTimeout(resolve, 20))
      }
      assert.equal(nodes[0]!.info.id, '10.0.0.1:22222')
      assert.equal((await peer.registerNode({ ...info, id: '10.0.0.1' }, lb)).registered, true)
      await lb.revoke()
    }))

    test('watch reports creates, updates, deletes, of this instance and of another', { timeout: 20_000 }, async () => withPeer(async (s, peer) => {
      for (const by of [s, peer]) {
        let w = await nextChange(s, 'img')
        await by.create(sampleImage('img'))
        await w.seen
        await w.stop()
        w = await nextChange(s, 'img')
        await by.update('img', (m) => { m.usedSize = 1; return m })
        await w.seen
        await w.stop()
        w = await nextChange(s, 'img')
        await by.delete('img')
        await w.seen
        await w.stop()
      }
    }))

    test('a listener that stopped watching is not called', { timeout: 20_000 }, async () => withStore(async (s) => {
      const early: string[] = []
      const stopEarly = await s.watch({ onImage: (n) => early.push(n) })
      await stopEarly.close()
      const w = await nextChange(s, 'img')
      await s.create(sampleImage('img'))
      await w.seen
      await w.stop()
      assert.deepEqual(early, [])
    }))

    test('another instance sees the data', { timeout: 20_000 }, async () => withPeer(async (s, peer) => {
      await s.create(sampleImage('img'))
      assert.deepEqual(content(await peer.get('img')), content(await s.get('img')))
      assert.deepEqual(await peer.list(), ['img'])
      await peer.update('img', (m) => { m.usedSize = 4096; return m })
      assert.equal((await s.get('img'))!.usedSize, 4096)
      await peer.delete('img')
      assert.equal(await s.get('img'), undefined)
    }))
  })
}
