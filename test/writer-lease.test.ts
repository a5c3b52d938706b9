/**
 * One truth for the cluster (issue 8), on real processes: nodes on a real
 * etcd (and, where the rule is the embedded store's too, on a shared
 * metadata directory). One test per observation of the issue:
 *
 * - a read-open on another node does not touch the writer's dirty-block
 *   log, so a crash of the writer still leaves no in-sync replicas that
 *   differ;
 * - destroy (and remove-location) sent to another node is refused while
 *   the image is open;
 * - a second writer on another node gets EBUSY (FUSE) or a read-only
 *   export (NBD);
 * - a node started with a live node's id is refused before it touches
 *   anything;
 *
 * and the rules built for them: a hypervisor's takeover fences the old
 * writer; a change is seen by every node that has the image open before
 * the write that made it is acknowledged; an etcd outage loses nothing.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { open, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { Cluster } from './helpers/cluster.js'
import { etcdMissing } from './helpers/etcd.js'
import { CLI, freePort, run, type TestNode } from './helpers/node-process.js'
import { NbdClient } from '../src/peer/nbd-client.js'
import { prng } from './helpers/assertions.js'
import { nbdWriterScript } from './helpers/writers.js'

const MB = 2 ** 20
const LEASE = { lease_ttl: 4, io_timeout: 2, retry_after: 30 }
const skipEtcd = etcdMissing()

async function nbd (node: TestNode, image: string): Promise<NbdClient> {
  return await NbdClient.connect({ path: node.nbdSocket! }, image, { timeoutMs: 30_000 })
}

async function nbdRead (node: TestNode, image: string, offset: number, length: number): Promise<Buffer> {
  const c = await nbd(node, image)
  try {
    const buf = Buffer.alloc(length)
    await c.read(offset, buf)
    return buf
  } finally { await c.close() }
}

async function cliOk (node: TestNode, ...args: string[]): Promise<string> {
  const r = await node.cli(...args)
  assert.equal(r.code, 0, `ukai ${args.join(' ')}: ${r.stderr}`)
  return r.stdout
}

/** Polls `fn` until it returns something, for at most 10 s. */
async function until<T> (fn: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + 10_000
  for (;;) {
    const v = await fn()
    if (v !== undefined) return v
    assert.ok(Date.now() < deadline, 'timed out')
    await new Promise((r) => setTimeout(r, 50))
  }
}

interface InfoDoc {
  open: Array<{ node: string, readers: number, writers: number }>
  writer: { node: string, generation: number } | null
  writer_generation: number
}

/** Waits until no node has the image open (a FUSE release reaches the node after close returns). */
async function closedEverywhere (node: TestNode, image: string): Promise<void> {
  await until(async () => {
    const info = JSON.parse(await cliOk(node, 'image', 'info', image, '--json')) as InfoDoc
    return info.open.length === 0 && info.writer === null ? true : undefined
  })
}

for (const backend of ['etcd', 'file'] as const) {
  describe(`writer lease and node identity (${backend})`, { timeout: 300_000, skip: backend === 'etcd' ? skipEtcd : undefined }, () => {
    let cluster: Cluster
    let A: TestNode, B: TestNode

    before(async () => {
      cluster = await Cluster.start({ nodes: 2, mount: [0, 1], nbd: [0, 1], etcd: backend === 'etcd', config: LEASE })
      ;[A, B] = cluster.nodes as [TestNode, TestNode]
      await cliOk(A, 'image', 'create', 'vm', '-s', '8M', '-b', '1M', '-l', A.id, '-l', B.id)
    })
    after(async () => { await cluster?.destroy() })

    test('a node started with the id of a live node is refused (exit 11) and changes nothing', async () => {
      const before = JSON.parse(await cliOk(A, 'nodes', 'list', '--json')) as Array<{ id: string, pid: number, alive: boolean }>
      const dir = join(cluster.dir, 'impostor')
      const config = join(cluster.dir, 'impostor.json')
      await writeFile(config, JSON.stringify({
        ...cluster.metadataConfig, ...LEASE, id: A.id, image_root: join(dir, 'images'), control_port: await freePort(), proxy_port: await freePort()
      }))
      const r = await run(process.execPath, [CLI, '--config', config, 'server'])
      assert.equal(r.code, 11, r.stderr)
      assert.match(r.stderr, new RegExp(`node id ${A.id.replace(/\./g, '\\.')} is in use by a running node \\(pid ${A.pid!}`))
      assert.equal(r.stderr.trim().split('\n').length, backend === 'etcd' ? 2 : 1, `one line of error (and one of waiting): ${r.stderr}`)
      // Nothing of it is anywhere: the real node's registration is as it was, and no image root was made.
      const after = JSON.parse(await cliOk(A, 'nodes', 'list', '--json')) as typeof before
      assert.deepEqual(after.map((n) => [n.id, n.pid, n.alive]), before.map((n) => [n.id, n.pid, n.alive]))
      assert.ok(after.find((n) => n.id === A.id)!.alive)
      await assert.rejects(stat(dir), /ENOENT/)
      // And the real node still serves its replica.
      assert.ok((await nbdRead(A, 'vm', 0, 4096)).equals(Buffer.alloc(4096)))
    })

    test('a second writer on another node gets EBUSY on FUSE and a read-only NBD export', async () => {
      const fh = await open(join(A.mountpoint!, 'vm'), 'r+')
      try {
        await fh.write(Buffer.alloc(4096, 0x11), 0, 4096, 0)
        await assert.rejects(open(join(B.mountpoint!, 'vm'), 'r+'), /EBUSY/)
        const c = await nbd(B, 'vm')
        try {
          assert.equal(c.readOnly, true, 'B must export the image read-only while A writes it')
        } finally { await c.close() }
        const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 0 4k', `nbd+unix:///vm?socket=${B.nbdSocket!}`])
        assert.notEqual(io.code, 0)
        // Readers on B are welcome, and see A's data.
        const rd = await open(join(B.mountpoint!, 'vm'), 'r')
        const buf = Buffer.alloc(4096)
        await rd.read(buf, 0, 4096, 0)
        await rd.close()
        assert.ok(buf.equals(Buffer.alloc(4096, 0x11)))
        const info = JSON.parse(await cliOk(B, 'image', 'info', 'vm', '--json')) as InfoDoc
        assert.deepEqual(info.open.filter((o) => o.writers > 0).map((o) => o.node), [A.id])
        assert.equal(info.writer?.node, A.id)
      } finally { await fh.close() }
      // Once A's close is through (the kernel sends FUSE's release after close returns), B may write.
      const w = await until(async () => await open(join(B.mountpoint!, 'vm'), 'r+').catch(() => undefined))
      await w.write(Buffer.alloc(4096, 0x33), 0, 4096, 4096)
      await w.close()
      await closedEverywhere(B, 'vm')
    })

    test('destroy sent to another node is refused while the image is open; remove-location of the node that has it open is applied by that node', async () => {
      const c = await nbd(A, 'vm')
      try {
        assert.equal(c.readOnly, false)
        await c.write(0, Buffer.alloc(4096, 0x44))
        const r = await B.cli('image', 'destroy', 'vm')
        assert.equal(r.code, 5, `image destroy vm: ${r.stderr}`)
        assert.match(r.stderr, new RegExp(`open on node ${A.id.replace(/\./g, '\\.')}`))
        // Everything is still there, and the writer writes on.
        assert.equal((await B.cli('image', 'info', 'vm')).code, 0)
        assert.ok((await stat(join(B.imageRoot, 'vm'))).isDirectory())
        await c.write(MB, Buffer.alloc(4096, 0x55))
        await c.flush()
        // A's location goes (B holds every block in sync): asked of B, A removes it itself, and writes on to B alone.
        await cliOk(B, 'image', 'remove-location', 'vm', A.id)
        const doc = JSON.parse(await cliOk(B, 'image', 'info', 'vm', '--json')) as { locations: Record<string, unknown> }
        assert.deepEqual(Object.keys(doc.locations), [B.id])
        await c.write(5 * MB, Buffer.alloc(4096, 0x56))
        await c.flush()
        const got = Buffer.alloc(4096)
        await c.read(0, got)
        assert.ok(got.equals(Buffer.alloc(4096, 0x44)))
      } finally { await c.close() }
      assert.ok((await nbdRead(B, 'vm', MB, 4096)).equals(Buffer.alloc(4096, 0x55)))
      assert.ok((await nbdRead(B, 'vm', 5 * MB, 4096)).equals(Buffer.alloc(4096, 0x56)))
      // A's copy comes back for the tests that follow.
      await closedEverywhere(B, 'vm')
      await cliOk(B, 'image', 'add-location', 'vm', A.id)
      await cliOk(B, 'sync', 'vm')
      // Closed everywhere: B may remove A's location now.
      const r = await B.cli('image', 'create', 'scratch', '-s', '2M', '-b', '1M', '-l', A.id, '-l', B.id)
      assert.equal(r.code, 0, r.stderr)
      assert.equal((await B.cli('image', 'destroy', 'scratch')).code, 0)
      await assert.rejects(stat(join(A.imageRoot, 'scratch')), /ENOENT/)
    })

    test('a hypervisor takes the writer lease over and fences the old writer', async () => {
      await cliOk(A, 'image', 'add-hypervisor', 'vm', A.id)
      await cliOk(A, 'image', 'add-hypervisor', 'vm', B.id)
      const old = await nbd(A, 'vm')
      const neu = await nbd(B, 'vm')
      try {
        await old.write(0, Buffer.alloc(4096, 0x66))
        const g1 = (JSON.parse(await cliOk(A, 'image', 'info', 'vm', '--json')) as InfoDoc).writer!
        assert.equal(g1.node, A.id)
        // The migration's destination opens read-write (it is a hypervisor), and takes over at its first write.
        assert.equal(neu.readOnly, false)
        await neu.write(0, Buffer.alloc(4096, 0x77))
        const info = JSON.parse(await cliOk(A, 'image', 'info', 'vm', '--json')) as InfoDoc
        assert.equal(info.writer?.node, B.id)
        assert.equal(info.writer?.generation, g1.generation + 1)
        // A late write of the old writer fails and never lands.
        await assert.rejects(old.write(0, Buffer.alloc(4096, 0x88)))
        await assert.rejects(old.write(2 * MB, Buffer.alloc(4096, 0x88)))
        await neu.flush()
        for (const n of [A, B]) {
          const b0 = await cluster.blockOnDisk(n, 'vm', 0, MB)
          assert.ok(b0.subarray(0, 4096).equals(Buffer.alloc(4096, 0x77)), `block 0 on ${n.id} has the old writer's bytes`)
          const b2 = await cluster.blockOnDisk(n, 'vm', 2, MB)
          assert.ok(b2.subarray(0, 4096).equals(Buffer.alloc(4096)), `block 2 on ${n.id} has the old writer's late write`)
        }
        // A's peer export of the old generation is refused to anyone.
        await assert.rejects(NbdClient.connect({ host: '127.0.0.1', port: B.config.proxy_port as number }, `replica/vm@${g1.generation}`, { timeoutMs: 5000 }))
        assert.deepEqual(await cluster.checkReplicas('vm'), [])
      } finally {
        await old.close()
        await neu.close()
      }
      await cliOk(A, 'image', 'remove-hypervisor', 'vm', A.id)
      await cliOk(A, 'image', 'remove-hypervisor', 'vm', B.id)
    })
  })
}

describe('a read-open elsewhere and writer crashes (etcd)', { timeout: 300_000, skip: skipEtcd }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode
  const rnd = prng(8)

  before(async () => {
    cluster = await Cluster.start({ nodes: 2, nbd: [0, 1], etcd: true, config: LEASE })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
    await cliOk(A, 'image', 'create', 'vm', '-s', '8M', '-b', '1M', '-l', A.id, '-l', B.id)
  })
  after(async () => { await cluster?.destroy() })

  test('opening the image on B while A writes leaves A\'s log alone; after kill -9 of A in-sync replicas never differ', async () => {
    const writer = await nbdWriterScript(cluster.dir, 'vm', 8 * MB)
    for (let round = 0; round < 4; round++) {
      const child = spawn(process.execPath, [writer, A.nbdSocket!], { stdio: ['ignore', 'pipe', 'inherit'] })
      const closed = once(child, 'close')
      await once(child.stdout!, 'data')
      await new Promise((r) => setTimeout(r, 200 + Math.floor(rnd() * 300)))
      const logged = await cluster.dirtyLog('vm')
      assert.ok(!logged.isEmpty, `round ${round}: A's log is empty while it writes`)
      // A read-only open on B, and reads through it: B reconciles nothing.
      const info = await run('qemu-img', ['info', `nbd+unix:///vm?socket=${B.nbdSocket!}`])
      assert.equal(info.code, 0, info.stderr)
      await nbdRead(B, 'vm', 0, 8 * MB)
      assert.ok(!(await cluster.dirtyLog('vm')).isEmpty, `round ${round}: a reader on B emptied the writer's dirty-block log`)
      assert.doesNotMatch(B.output, /reconciled/)
      await A.stop('SIGKILL')
      child.kill('SIGKILL')
      await closed
      await A.launch()
      // The next open of the image reconciles what the dead writer left.
      const again = await run('qemu-img', ['info', `nbd+unix:///vm?socket=${A.nbdSocket!}`])
      assert.equal(again.code, 0, again.stderr)
      assert.deepEqual(await cluster.checkReplicas('vm'), [], `round ${round}: in-sync replicas differ`)
      assert.equal((await cluster.dirtyLog('vm')).isEmpty, true)
    }
  })
})

describe('three nodes on etcd', { timeout: 300_000, skip: skipEtcd }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode, C: TestNode

  before(async () => {
    // A writes, B holds the second replica, C holds none and only reads.
    cluster = await Cluster.start({ nodes: 3, nbd: [0, 1, 2], etcd: true, config: { ...LEASE, lease_ttl: 8 } })
    ;[A, B, C] = cluster.nodes as [TestNode, TestNode, TestNode]
    await cliOk(A, 'image', 'create', 'vm', '-s', '8M', '-b', '1M', '-l', A.id, '-l', B.id)
  })
  after(async () => { await cluster?.destroy() })

  const readsFrom = async (n: TestNode): Promise<Record<string, number>> =>
    (await n.api<{ readsFrom: Record<string, number> }>('GET', '/v1/images/vm/stats')).body.readsFrom

  test('a replica marked out of sync by the writer is never read by another node that has the image open', async () => {
    // The writer connects first: an NBD connection to an image nobody
    // writes is its writer (NBD has no read-only open), C's is then read-only.
    const writer = await nbd(A, 'vm')
    const reader = await nbd(C, 'vm')
    assert.equal(reader.readOnly, true)
    try {
      for (let round = 0; round < 3; round++) {
        const block = 1 + round
        await writer.write(block * MB, Buffer.alloc(MB, 0x10 + round))
        await writer.flush()
        // Both replicas in sync: C reads from either.
        const warm = Buffer.alloc(MB)
        await reader.read(block * MB, warm)
        // B stops; the write to its block marks B out of sync, and returns
        // only once C, which has the image open, has seen that.
        process.kill(B.pid!, 'SIGSTOP')
        const fresh = randomBytes(MB)
        try {
          await writer.write(block * MB, fresh)
        } finally {
          process.kill(B.pid!, 'SIGCONT')
        }
        const before = await readsFrom(C)
        for (let i = 0; i < 20; i++) {
          const got = Buffer.alloc(MB)
          await reader.read(block * MB, got)
          assert.ok(got.equals(fresh), `round ${round} read ${i}: C read stale data`)
        }
        const after = await readsFrom(C)
        assert.equal((after[B.id] ?? 0) - (before[B.id] ?? 0), 0, `round ${round}: C read the out-of-sync replica on B`)
        assert.equal((await cluster.image('vm')).locations[B.id]!.out_of_sync.length > 0, true)
        await cliOk(C, 'sync', 'vm')
      }
      assert.deepEqual(await cluster.checkReplicas('vm'), [])
    } finally {
      await reader.close()
      await writer.close()
    }
  })

  test('a location removed through one node is never read again by another node that has the image open', async () => {
    // Image 'pl' on B and C; A holds no replica and reads remotely, from the one it measures closer.
    await cliOk(B, 'image', 'create', 'pl', '-s', '4M', '-b', '1M', '-l', B.id, '-l', C.id)
    const reader = await nbd(A, 'pl')
    try {
      const buf = Buffer.alloc(4 * MB)
      for (let i = 0; i < 10; i++) await reader.read(0, buf)
      const stats = async (): Promise<Record<string, number>> => (await A.api<{ readsFrom: Record<string, number> }>('GET', '/v1/images/pl/stats')).body.readsFrom
      const before = await stats()
      // The location A reads from most goes, through the other node.
      const [gone, stays] = (before[B.id] ?? 0) >= (before[C.id] ?? 0) ? [B, C] : [C, B]
      assert.ok((before[gone.id] ?? 0) >= 20, JSON.stringify(before))
      const r = await stays.api('DELETE', '/v1/images/pl/locations', { location: gone.id })
      assert.equal(r.status, 200, JSON.stringify(r.body))
      // A, which has the image open, applied it before the call returned: its very next read counts.
      for (let i = 0; i < 20; i++) await reader.read(0, buf)
      const end = await stats()
      assert.equal((end[gone.id] ?? 0) - (before[gone.id] ?? 0), 0, 'A read from the removed location')
      assert.equal((end[stays.id] ?? 0) - (before[stays.id] ?? 0), 80)
    } finally { await reader.close() }
    await cliOk(B, 'image', 'destroy', 'pl')
  })

  test('a sync asked of a node that does not write the image runs on the writer\'s node', async () => {
    const writer = await nbd(A, 'vm')
    try {
      await writer.write(0, Buffer.alloc(4096, 1))
      await cliOk(C, 'image', 'add-location', 'vm', C.id, '-s', '0', '-e', '1')
      const out = await cliOk(C, 'sync', 'vm')
      assert.match(out, /synced 2 of 2 block/)
      const info = JSON.parse(await cliOk(C, 'image', 'info', 'vm', '--json')) as InfoDoc
      assert.equal(info.writer?.node, A.id, 'the sync took the lease from the writer')
      await writer.write(4096, Buffer.alloc(4096, 2))
      await writer.flush()
      assert.deepEqual(await cluster.checkReplicas('vm'), [])
    } finally { await writer.close() }
    await cliOk(C, 'image', 'remove-location', 'vm', C.id)
  })

  test('etcd stopped and restarted during writes: no acknowledged write is lost', async () => {
    const SIZE = 8 * MB
    const model = Buffer.from(await nbdRead(A, 'vm', 0, SIZE))
    const c = await nbd(A, 'vm')
    const rnd = prng(11)
    let acked = 0
    let stop = false
    // Each writer has a region of its own: overlapping writes in flight
    // would make the model ambiguous.
    const region = SIZE / 8
    const writers = Array.from({ length: 8 }, async (_, i) => {
      while (!stop) {
        const len = 4096 * (1 + Math.floor(rnd() * 16))
        const off = i * region + 4096 * Math.floor(rnd() * ((region - len) / 4096))
        const data = randomBytes(len)
        await c.write(off, data)
        data.copy(model, off)
        acked++
      }
    })
    try {
      await new Promise((r) => setTimeout(r, 500))
      await cluster.etcd!.stop()
      const during = acked
      await new Promise((r) => setTimeout(r, 2000))
      await cluster.etcd!.launch()
      await new Promise((r) => setTimeout(r, 1500))
      stop = true
      await Promise.all(writers)
      assert.ok(acked > during, 'writes went on during and after the outage')
      await c.flush()
    } finally {
      stop = true
      await c.close()
    }
    assert.ok((await nbdRead(A, 'vm', 0, SIZE)).equals(model), 'an acknowledged write is missing')
    assert.ok((await nbdRead(C, 'vm', 0, SIZE)).equals(model))
    assert.deepEqual(await cluster.checkReplicas('vm', model), [])
  })
})

describe('a node that loses its lease (etcd)', { timeout: 300_000, skip: skipEtcd }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode

  before(async () => {
    cluster = await Cluster.start({ nodes: 2, nbd: [0, 1], etcd: true, config: { lease_ttl: 3, io_timeout: 2, retry_after: 30 } })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
    await cliOk(A, 'image', 'create', 'vm', '-s', '8M', '-b', '1M', '-l', A.id, '-l', B.id)
  })
  after(async () => { await cluster?.destroy() })

  test('its lease ended behind its back: its writer is fenced for good, and it registers again', async () => {
    const c = await nbd(A, 'vm')
    try {
      await c.write(0, Buffer.alloc(4096, 1))
      const store = await cluster.store()
      const alive = (await store.listNodes()).find((n) => n.info.id === A.id)!.alive!
      await store.revokeLease(alive.lease)
      // A notices at its next renewal, and comes back under a new lease.
      const back = await until(async () => {
        const n = (await store.listNodes()).find((x) => x.info.id === A.id)
        return n?.alive !== undefined && n.alive.lease !== alive.lease ? n.alive : undefined
      })
      assert.equal(back.pid, A.pid)
      assert.match(A.output, /lost its lease/)
      // The writer key went with the old lease: this open's session is over.
      await assert.rejects(c.write(4096, Buffer.alloc(4096, 2)))
    } finally { await c.close() }
    // A new open writes under the new lease.
    const again = await nbd(A, 'vm')
    try {
      assert.equal(again.readOnly, false)
      await again.write(4096, Buffer.alloc(4096, 3))
      await again.flush()
    } finally { await again.close() }
    assert.ok((await nbdRead(B, 'vm', 4096, 4096)).equals(Buffer.alloc(4096, 3)))
  })

  test('etcd away for longer than the lease: writes stop rather than risk a second writer, and resume when it is back', async () => {
    // The last test's writer is released after its client has gone; until
    // then a new connection would be served read-only.
    await closedEverywhere(A, 'vm')
    const c = await nbd(A, 'vm')
    assert.equal(c.readOnly, false)
    let failed = 0
    let succeeded = 0
    let stop = false
    const loop = (async () => {
      for (let i = 0; !stop; i++) {
        try {
          await c.write((i % 64) * 4096, Buffer.alloc(4096, i % 251))
          succeeded++
        } catch { failed++ }
        await new Promise((r) => setTimeout(r, 20))
      }
    })()
    try {
      await until(async () => succeeded > 5 ? true : undefined)
      await cluster.etcd!.stop()
      // Longer than the lease (3 s) and the wait a write gives it (io_timeout 2 s).
      await new Promise((r) => setTimeout(r, 7000))
      const failedDuring = failed
      await cluster.etcd!.launch()
      const after = succeeded
      await until(async () => succeeded > after + 5 ? true : undefined)
      stop = true
      await loop
      assert.ok(failedDuring > 0, 'writes went on while the lease could not be renewed')
      assert.equal(c.readOnly, false)
    } finally {
      stop = true
      await loop
      await c.close()
    }
  })
})
