/**
 * The conformance suite of the metadata core (core.ts): every backend runs
 * the same tests against a fresh, empty namespace from `open`. `open`
 * returns two instances over the same data (two processes' views), so the
 * tests also check what one sees of the other's changes.
 */
import { describe, test } from 'node:test'
import assert from 'node:assert/strict'
import type { KeyValue, MetadataCore, WatchEvent } from './core.js'

export interface OpenedCores {
  a: MetadataCore
  b: MetadataCore
  /** Closes both and removes what they stored. */
  cleanup: () => Promise<void>
}

async function until (what: string, fn: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms
  while (!await fn()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

const put = (key: string, value: string, lease?: string) => ({ type: 'put' as const, key, value, lease })

export function runCoreConformance (name: string, open: () => Promise<OpenedCores>): void {
  describe(`MetadataCore conformance: ${name}`, () => {
    const withCores = async (fn: (a: MetadataCore, b: MetadataCore) => Promise<void>): Promise<void> => {
      const opened = await open()
      try { await fn(opened.a, opened.b) } finally { await opened.cleanup() }
    }

    test('an empty namespace', async () => withCores(async (a) => {
      assert.deepEqual((await a.range('images/')).kvs, [])
      assert.equal(await a.get('images/x/meta/header'), undefined)
    }))

    test('put, get, range: values and revisions', async () => withCores(async (a, b) => {
      const r1 = await a.txn([], [put('images/x/meta/header', 'h1'), put('images/x/meta/loc/n1/0', 'l1')])
      assert.equal(r1.succeeded, true)
      const h = await b.get('images/x/meta/header')
      assert.ok(h !== undefined)
      assert.equal(h.value, 'h1')
      assert.equal(h.createRevision, r1.revision)
      assert.equal(h.modRevision, r1.revision)
      assert.equal(h.version, 1)
      assert.equal(h.lease, undefined)
      const r2 = await a.txn([], [put('images/x/meta/header', 'h2')])
      assert.ok(r2.revision > r1.revision)
      const h2 = (await a.get('images/x/meta/header'))!
      assert.deepEqual([h2.value, h2.createRevision, h2.modRevision, h2.version], ['h2', r1.revision, r2.revision, 2])
      const all = await b.range('images/x/')
      assert.deepEqual(all.kvs.map((kv) => [kv.key, kv.value]), [['images/x/meta/header', 'h2'], ['images/x/meta/loc/n1/0', 'l1']])
      assert.ok(all.revision >= r2.revision)
      // A prefix names keys, not shards: "images/x" also matches "images/xy".
      await a.txn([], [put('images/xy/meta/header', 'other')])
      assert.deepEqual((await b.range('images/x/')).kvs.length, 2)
      assert.deepEqual((await b.range('images/')).kvs.map((kv) => kv.key),
        ['images/x/meta/header', 'images/x/meta/loc/n1/0', 'images/xy/meta/header'])
    }))

    test('a transaction applies all of its ops or, when a compare fails, none', async () => withCores(async (a) => {
      const r = await a.txn([], [put('images/x/k1', '1')])
      const k1 = (await a.get('images/x/k1'))!
      const failed = await a.txn([{ key: 'images/x/k1', target: 'mod', op: '==', value: k1.modRevision + 100 }],
        [put('images/x/k1', 'changed'), put('images/x/k2', 'new')])
      assert.equal(failed.succeeded, false)
      assert.equal((await a.get('images/x/k1'))!.value, '1')
      assert.equal(await a.get('images/x/k2'), undefined)
      const ok = await a.txn([{ key: 'images/x/k1', target: 'mod', op: '==', value: r.revision }, { key: 'images/x/k2', target: 'version', op: '==', value: 0 }],
        [put('images/x/k1', 'changed'), put('images/x/k2', 'new')])
      assert.equal(ok.succeeded, true)
      assert.equal((await a.get('images/x/k1'))!.value, 'changed')
      assert.equal((await a.get('images/x/k2'))!.value, 'new')
      // An absent key compares with zeros: create only if absent.
      const again = await a.txn([{ key: 'images/x/k2', target: 'create', op: '==', value: 0 }], [put('images/x/k2', 'twice')])
      assert.equal(again.succeeded, false)
      assert.equal((await a.get('images/x/k2'))!.value, 'new')
    }))

    test('compares over a prefix hold for every key under it, and for none', async () => withCores(async (a, b) => {
      const r = await a.txn([], [put('images/x/meta/a', '1'), put('images/x/meta/b', '1'), put('images/x/open/n1', '1')])
      const snap = await a.range('images/x/meta/')
      const unchanged = { key: 'images/x/meta/', prefix: true, target: 'mod' as const, op: '<' as const, value: snap.revision + 1 }
      // A change outside the prefix does not disturb it.
      await b.txn([], [put('images/x/open/n2', '1')])
      assert.equal((await a.txn([unchanged], [put('images/x/meta/a', '2')])).succeeded, true)
      // Now a key under it changed after `snap`: the same compare fails...
      assert.equal((await a.txn([unchanged], [put('images/x/meta/b', '2')])).succeeded, false)
      // ...also for a key created under it since.
      const snap2 = await a.range('images/x/meta/')
      await b.txn([], [put('images/x/meta/c', '1')])
      assert.equal((await a.txn([{ ...unchanged, value: snap2.revision + 1 }], [put('images/x/meta/a', '3')])).succeeded, false)
      // "No key under the prefix": version == 0 over the range.
      const none = (p: string) => ({ key: p, prefix: true, target: 'version' as const, op: '==' as const, value: 0 })
      assert.equal((await a.txn([none('images/x/gone/')], [put('images/x/marker', '1')])).succeeded, true)
      assert.equal((await a.txn([none('images/x/open/')], [put('images/x/marker', '2')])).succeeded, false)
      assert.ok(r.revision > 0)
    }))

    test('delete of a key and of a prefix', async () => withCores(async (a, b) => {
      await a.txn([], [put('images/x/meta/header', 'h'), put('images/x/meta/loc/1', 'l'), put('images/x/dirty', 'd')])
      await a.txn([], [{ type: 'delete', key: 'images/x/dirty' }])
      assert.equal(await b.get('images/x/dirty'), undefined)
      await b.txn([], [{ type: 'delete', key: 'images/x/meta/', prefix: true }])
      assert.deepEqual((await a.range('images/x/')).kvs, [])
      // A key made again starts over: version 1, a new create revision.
      const r = await a.txn([], [put('images/x/meta/header', 'again')])
      const h = (await a.get('images/x/meta/header'))!
      assert.equal(h.version, 1)
      assert.equal(h.createRevision, r.revision)
    }))

    test('compare-and-swap from two instances loses no increment', async () => withCores(async (a, b) => {
      await a.txn([], [put('images/c/n', '0')])
      const bump = async (core: MetadataCore): Promise<number> => {
        for (let attempts = 1; ; attempts++) {
          const kv = (await core.get('images/c/n'))!
          const r = await core.txn([{ key: 'images/c/n', target: 'mod', op: '==', value: kv.modRevision }], [put('images/c/n', String(Number(kv.value) + 1))])
          if (r.succeeded) return attempts
        }
      }
      await Promise.all(Array.from({ length: 30 }, async (_, i) => await bump(i % 2 === 0 ? a : b)))
      assert.equal((await a.get('images/c/n'))!.value, '30')
    }))

    test('watch reports puts and deletes under its prefix, made by either instance', { timeout: 20_000 }, async () => withCores(async (a, b) => {
      const seen: WatchEvent[] = []
      const w = await a.watch('images/w/', { onEvents: (ev) => seen.push(...ev) })
      try {
        const r1 = await b.txn([], [put('images/w/meta/header', '1')])
        await a.txn([], [put('images/other/meta/header', 'x')])
        const r2 = await a.txn([], [put('images/w/meta/header', '2')])
        const r3 = await b.txn([], [{ type: 'delete', key: 'images/w/meta/header' }])
        await until('three events', () => seen.length >= 3)
        assert.deepEqual(seen.map((e) => [e.type, e.key]), [['put', 'images/w/meta/header'], ['put', 'images/w/meta/header'], ['delete', 'images/w/meta/header']])
        assert.deepEqual(seen.map((e) => e.revision).slice(0, 2), [r1.revision, r2.revision])
        assert.ok(seen[2]!.revision >= r3.revision - 1)
      } finally {
        await w.close()
      }
      // A closed watcher hears nothing more.
      const before = seen.length
      await b.txn([], [put('images/w/meta/header', '3')])
      await new Promise((resolve) => setTimeout(resolve, 300))
      assert.equal(seen.length, before)
    }))

    test('a key on a lease lives as long as its lease', { timeout: 30_000 }, async () => withCores(async (a, b) => {
      const lease = await a.grantLease(3)
      assert.equal(await lease.keepAlive(), true)
      assert.equal(await b.leaseAlive(lease.id), true)
      await a.txn([], [put('nodes/n1/alive', 'me', lease.id), put('nodes/n1/info', 'record')])
      const kv = (await b.get('nodes/n1/alive')) as KeyValue
      assert.equal(kv.lease, lease.id)
      // A compare sees the leased key while the lease lives.
      assert.equal((await b.txn([{ key: 'nodes/n1/alive', target: 'version', op: '==', value: 0 }], [put('nodes/n1/alive', 'b')])).succeeded, false)
      await lease.revoke()
      await until('the leased key to go', async () => await b.get('nodes/n1/alive') === undefined)
      assert.equal((await b.get('nodes/n1/info'))?.value, 'record')
      assert.equal(await b.leaseAlive(lease.id), false)
      assert.equal(await lease.keepAlive(), false)
      // Now absent for compares too.
      assert.equal((await b.txn([{ key: 'nodes/n1/alive', target: 'version', op: '==', value: 0 }], [put('nodes/n1/info', 'b')])).succeeded, true)
    }))

    test('a lease ends when its holder stops keeping it alive', { timeout: 30_000 }, async () => withCores(async (a, b) => {
      const lease = await a.grantLease(2)
      await a.txn([], [put('nodes/n2/alive', 'me', lease.id)])
      if (a.supports.timedLeases) {
        // Nobody renews it: etcd lets it expire after its TTL.
        await until('the lease to expire', async () => !await b.leaseAlive(lease.id), 15_000)
      } else {
        // A process-bound lease ends with the process (here: the instance).
        assert.equal(await b.leaseAlive(lease.id), true)
        await a.close()
        await until('the lease to end', async () => !await b.leaseAlive(lease.id))
      }
      assert.equal(await b.get('nodes/n2/alive'), undefined)
    }))

    test('transactions across shards: supported or refused, never half applied', async () => withCores(async (a) => {
      const ops = [put('images/s1/k', '1'), put('nodes/s2/k', '1')]
      if (a.supports.crossShardTxn) {
        assert.equal((await a.txn([], ops)).succeeded, true)
        assert.equal((await a.get('nodes/s2/k'))?.value, '1')
      } else {
        await assert.rejects(a.txn([], ops), /one shard/)
        assert.equal(await a.get('images/s1/k'), undefined)
        assert.equal(await a.get('nodes/s2/k'), undefined)
      }
    }))
  })
}
