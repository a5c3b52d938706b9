/**
 * The conformance suite every MetadataStore backend runs (abstract-level's
 * model): the same tests, against a fresh, empty store from `open`.
 *
 * `open` may also return `openPeer`, a second store instance over the
 * same backing data (another process's view); the tests that need one are
 * skipped without it.
 */
import { test, describe } from 'node:test'
import assert from 'node:assert/strict'
import { UkaiError, type ErrorCode } from '../errors.js'
import { encodeStored } from './codec.js'
import { ImageMeta } from './image.js'
import { RangeSet } from './range-set.js'
import type { MetadataStore } from './store.js'
import { rejectsWith } from '../../test/helpers/assertions.js'

export interface OpenedStore {
  store: MetadataStore
  cleanup: () => Promise<void>
  /** Another instance over the same data; closed by the caller. */
  openPeer?: () => Promise<MetadataStore>
}

/** A valid two-location image: blocks [0, 10) on A, [5, 10) on B with 7 out of sync there. */
export function sampleImage (name: string): ImageMeta {
  const meta = new ImageMeta({ name, size: 10 * 4096 - 100, blockSize: 4096, usedSize: 0, hypervisors: ['10.0.0.9'] })
  meta.addLocation('10.0.0.1:22222', 0, 10, true)
  meta.addLocation('10.0.0.2', 5, 10, true)
  meta.setSync('10.0.0.2', 7, 8, false)
  return meta
}

/** The stored form without the generation: what a change must (not) alter. */
const content = (meta: ImageMeta | undefined): unknown => {
  assert.ok(meta !== undefined, 'image is missing')
  const { generation: _g, ...rest } = encodeStored(meta)
  return rest
}


/** Resolves when `store.watch` reports `name` (the test's timeout guards a store that never does). */
function nextChange (store: MetadataStore, name: string): { seen: Promise<void>, stop: () => void } {
  let stop = (): void => {}
  const seen = new Promise<void>((resolve) => {
    stop = store.watch((changed) => { if (changed === name) resolve() })
  })
  return { seen, stop }
}

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

    test('a new store is empty', async () => withStore(async (s) => {
      assert.deepEqual(await s.list(), [])
      assert.equal(await s.get('image01'), undefined)
      await rejectsWith(s.require('image01'), 'UKAI_ERR_NOT_FOUND', /image 'image01' not found/)
    }))

    test('create, get, list', async () => withStore(async (s) => {
      const meta = sampleImage('image01')
      const created = await s.create(meta)
      assert.equal(created.generation, 1)
      const got = await s.get('image01')
      assert.ok(got instanceof ImageMeta)
      assert.deepEqual(content(got), content(meta))
      assert.equal(got.generation, 1)
      assert.deepEqual(got.replicasOf(7), [{ location: '10.0.0.1:22222', inSync: true }, { location: '10.0.0.2', inSync: false }])
      assert.deepEqual(got.replicasOf(2), [{ location: '10.0.0.1:22222', inSync: true }])
      assert.deepEqual(content(await s.require('image01')), content(meta))
      assert.deepEqual(await s.list(), ['image01'])
      await s.create(sampleImage('b-image'))
      await s.create(sampleImage('a-image'))
      assert.deepEqual(await s.list(), ['a-image', 'b-image', 'image01'])
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
      const other = sampleImage('img')
      other.usedSize = 4096
      await rejectsWith(s.create(other), 'UKAI_ERR_EXISTS', /image 'img' already exists/)
      const got = await s.get('img')
      assert.equal(got?.usedSize, 0)
      assert.equal(got?.generation, 1)
    }))

    test('concurrent creates of one name: exactly one wins', async () => withStore(async (s) => {
      const results = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => {
        const m = sampleImage('race')
        m.usedSize = i
        return s.create(m)
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

    test('update applies the change and increments the generation', async () => withStore(async (s) => {
      await s.create(sampleImage('img'))
      const next = await s.update('img', (m) => {
        m.usedSize = 8192
        m.setSync('10.0.0.2', 7, 8, true)
        m.addLocation('10.0.0.3', 0, 2, false)
        return m
      })
      assert.equal(next.generation, 2)
      const got = (await s.get('img'))!
      assert.equal(got.generation, 2)
      assert.equal(got.usedSize, 8192)
      assert.deepEqual(got.replicasOf(7).map((r) => r.inSync), [true, true])
      assert.deepEqual(got.replicasOf(1), [{ location: '10.0.0.1:22222', inSync: true }, { location: '10.0.0.3', inSync: false }])
      assert.deepEqual(content(got), content(next))
      // An async change, returning a different object.
      const third = await s.update('img', async (m) => {
        await Promise.resolve()
        return new ImageMeta({ name: m.name, size: m.size, blockSize: m.blockSize, usedSize: 1, locations: m.locations })
      })
      assert.equal(third.generation, 3)
      assert.equal((await s.get('img'))!.usedSize, 1)
      assert.deepEqual((await s.get('img'))!.hypervisors, [])
    }))

    test('update of a missing image fails with UKAI_ERR_NOT_FOUND and creates nothing', async () => withStore(async (s) => {
      let called = false
      await rejectsWith(s.update('ghost', (m) => { called = true; return m }), 'UKAI_ERR_NOT_FOUND', /image 'ghost' not found/)
      assert.equal(called, false)
      assert.deepEqual(await s.list(), [])
    }))

    test('an invalid update writes nothing', async () => withStore(async (s) => {
      await s.create(sampleImage('img'))
      const before = content(await s.get('img'))
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
        assert.deepEqual(content(now), before)
        assert.equal(now!.generation, 1)
      }
      assert.deepEqual(await s.list(), ['img'])
      // The store still works after the failures.
      assert.equal((await s.update('img', (m) => m)).generation, 2)
    }))

    test('concurrent updates of one image are all applied', async () => withStore(async (s) => {
      await s.create(sampleImage('img'))
      const n = 40
      const results = await Promise.all(Array.from({ length: n }, async (_, i) => await s.update('img', async (m) => {
        await new Promise((resolve) => setImmediate(resolve))
        m.hypervisors.push(`10.1.0.${i}`)
        m.usedSize += 1
        return m
      })))
      const got = (await s.get('img'))!
      assert.equal(got.generation, n + 1)
      assert.equal(got.usedSize, n)
      assert.deepEqual(got.hypervisors.slice(1).sort(), Array.from({ length: n }, (_, i) => `10.1.0.${i}`).sort())
      // Each update saw the one before it: generations 2..n+1, once each.
      assert.deepEqual(results.map((r) => r.generation).sort((a, b) => a - b), Array.from({ length: n }, (_, i) => i + 2))
    }))

    test('updates of different images do not interfere', async () => withStore(async (s) => {
      await s.create(sampleImage('a'))
      await s.create(sampleImage('b'))
      await Promise.all([
        ...Array.from({ length: 10 }, async () => await s.update('a', (m) => { m.usedSize++; return m })),
        ...Array.from({ length: 5 }, async () => await s.update('b', (m) => { m.usedSize += 2; return m }))
      ])
      assert.equal((await s.get('a'))!.usedSize, 10)
      assert.equal((await s.get('a'))!.generation, 11)
      assert.equal((await s.get('b'))!.usedSize, 10)
      assert.equal((await s.get('b'))!.generation, 6)
    }))

    test('delete', async () => withStore(async (s) => {
      await s.create(sampleImage('a'))
      await s.create(sampleImage('b'))
      await s.delete('a')
      assert.equal(await s.get('a'), undefined)
      assert.deepEqual(await s.list(), ['b'])
      await rejectsWith(s.delete('a'), 'UKAI_ERR_NOT_FOUND', /image 'a' not found/)
      await rejectsWith(s.update('a', (m) => m), 'UKAI_ERR_NOT_FOUND')
      // The name is free again, and starts over at generation 1.
      assert.equal((await s.create(sampleImage('a'))).generation, 1)
      assert.equal((await s.get('a'))!.generation, 1)
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
      assert.equal((await s.getDirty('img')).isEmpty, true)
      await s.putDirty('img', new RangeSet([[1, 3], [7, 8]]))
      assert.deepEqual((await s.getDirty('img')).toJSON(), [[1, 3], [7, 8]])
      await s.putDirty('img', RangeSet.of(4, 5))
      assert.deepEqual((await s.getDirty('img')).toJSON(), [[4, 5]])
      await s.putDirty('img', new RangeSet())
      assert.equal((await s.getDirty('img')).isEmpty, true)
      await s.putDirty('img', RangeSet.of(0, 2))
      // The log is not part of the image's metadata.
      assert.equal((await s.get('img'))!.generation, 1)
      await s.delete('img')
      await s.create(sampleImage('img'))
      assert.equal((await s.getDirty('img')).isEmpty, true)
    }))

    test('watch reports creates, updates and deletes', { timeout: 20_000 }, async () => withStore(async (s) => {
      let w = nextChange(s, 'img')
      await s.create(sampleImage('img'))
      await w.seen
      w.stop()
      w = nextChange(s, 'img')
      await s.update('img', (m) => { m.usedSize = 1; return m })
      await w.seen
      w.stop()
      w = nextChange(s, 'img')
      await s.delete('img')
      await w.seen
      w.stop()
    }))

    test('a listener that stopped watching is not called', { timeout: 20_000 }, async () => withStore(async (s) => {
      const early: string[] = []
      const stopEarly = s.watch((n) => early.push(n))
      stopEarly()
      const w = nextChange(s, 'img')
      await s.create(sampleImage('img'))
      await w.seen
      w.stop()
      assert.deepEqual(early, [])
    }))

    test('another instance sees the data and its changes are reported by watch', { timeout: 20_000 }, async (t) => withStore(async (s, opened) => {
      if (opened.openPeer === undefined) { t.skip('backend has no second instance'); return }
      const peer = await opened.openPeer()
      try {
        await s.create(sampleImage('img'))
        assert.deepEqual(content(await peer.get('img')), content(await s.get('img')))
        assert.deepEqual(await peer.list(), ['img'])

        let w = nextChange(s, 'img')
        await peer.update('img', (m) => { m.usedSize = 4096; return m })
        await w.seen
        w.stop()
        assert.equal((await s.get('img'))!.usedSize, 4096)
        assert.equal((await s.get('img'))!.generation, 2)

        w = nextChange(s, 'other')
        await peer.create(sampleImage('other'))
        await w.seen
        w.stop()
        assert.deepEqual(await s.list(), ['img', 'other'])

        // Updates through both instances at once are all applied.
        await Promise.all(Array.from({ length: 20 }, async (_, i) => await (i % 2 === 0 ? s : peer).update('other', (m) => {
          m.hypervisors.push(`10.2.0.${i}`)
          return m
        })))
        const other = (await s.get('other'))!
        assert.equal(other.generation, 21)
        assert.equal(other.hypervisors.length, 21)

        w = nextChange(s, 'img')
        await peer.delete('img')
        await w.seen
        w.stop()
        assert.equal(await s.get('img'), undefined)
        // Updates continue from the peer's generation.
        assert.equal((await s.update('other', (m) => m)).generation, 22)
      } finally {
        await peer.close()
      }
    }))
  })
}
