/**
 * The native FUSE plane (fuse_engine "native") on a two-node cluster:
 * node A mounts the image and holds a replica of every block, node B the
 * other. Reads through A's mount are compared with a model while the
 * state of A's replica changes under them: a block marked out of sync by
 * a write of another node (A's block file refuses it), a block whose local
 * write fails (an immutable block file) while reads and writes go on,
 * `ukai sync` bringing them back, and `remove-location` of A for a
 * range. After every acknowledged write, a read of its bytes must return
 * them: a native read of a revoked block would return the old ones.
 *
 * The mount is only ever touched from this process, never from the
 * servers'.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { constants as fsConstants } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { join } from 'node:path'
import { Cluster } from './helpers/cluster.js'
import { run, type TestNode } from './helpers/node-process.js'
import { prng } from './helpers/assertions.js'

const MB = 2 ** 20
const BLOCK = MB
const BLOCKS = 16
const SIZE = BLOCKS * BLOCK
const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))

interface Stats {
  reads: number
  readsFrom: Record<string, number>
  locations: Record<string, { out_of_sync_blocks: number }>
}

describe('native FUSE plane: reads across sync state changes', () => {
  let cluster: Cluster
  let A: TestNode
  let B: TestNode
  const model = Buffer.alloc(SIZE)
  const rnd = prng(20261204)
  let path: string
  /** O_DIRECT: every read reaches the mount's daemon, none is answered by the kernel's page cache of the file. */
  let reader: FileHandle

  const stats = async (): Promise<Stats> => (await A.api<Stats>('GET', '/v1/images/plane/stats')).body
  const readBack = async (off: number, len: number): Promise<Buffer> => {
    const buf = Buffer.alloc(len)
    const { bytesRead } = await reader.read(buf, 0, len, off)
    assert.equal(bytesRead, len)
    return buf
  }
  /** Until A's own view (what its volume reads by) has `n` or more of its blocks out of sync. */
  const untilOutOfSyncOnA = async (n: number): Promise<void> => {
    const until = Date.now() + 15_000
    while ((await stats()).locations[A.id]!.out_of_sync_blocks < n) {
      if (Date.now() > until) throw new Error(`A never saw ${n} of its blocks out of sync`)
      await sleep(50)
    }
  }

  before(async () => {
    cluster = await Cluster.start({ nodes: 2, mount: [0], nbd: [0, 1], tls: false, config: { io_timeout: 2, retry_after: 2 } })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
    const r = await A.api('POST', '/v1/images/import', {
      format: 1, name: 'plane', size: SIZE, block_size: BLOCK, used_size: SIZE, hypervisors: [A.id, B.id], generation: 0,
      locations: { [A.id]: { blocks: [[0, BLOCKS]], out_of_sync: [] }, [B.id]: { blocks: [[0, BLOCKS]], out_of_sync: [] } }
    })
    assert.equal(r.status, 201, JSON.stringify(r.body))
    path = join(A.mountpoint!, 'plane')
    reader = await open(path, fsConstants.O_RDONLY | fsConstants.O_DIRECT)
  })
  after(async () => {
    await reader?.close()
    await cluster?.destroy()
  })

  test('random writes through the mount read back equal to the model; local reads are counted in the image statistics', async () => {
    const fh = await open(path, 'r+')
    try {
      // Every block file exists, with data, so every block is on the fast path.
      const all = randomBytes(SIZE)
      await fh.write(all, 0, SIZE, 0)
      all.copy(model)
      for (let i = 0; i < 60; i++) {
        const len = 1 + Math.floor(rnd() * 1.5 * BLOCK)
        const off = Math.floor(rnd() * (SIZE - len))
        const data = randomBytes(len)
        assert.equal((await fh.write(data, 0, len, off)).bytesWritten, len)
        data.copy(model, off)
      }
      await fh.sync()
    } finally { await fh.close() }
    const before = await stats()
    const reads = 50
    for (let i = 0; i < reads; i++) {
      const len = 1 + Math.floor(rnd() * BLOCK / 2)
      const off = Math.floor(rnd() * (SIZE - len))
      assert.ok((await readBack(off, len)).equals(model.subarray(off, off + len)), `read of ${len} at ${off} differs from the model`)
    }
    const now = await stats()
    assert.ok(now.reads - before.reads >= reads, `hypervisor reads counted: ${now.reads - before.reads} of ${reads}`)
    assert.ok((now.readsFrom[A.id] ?? 0) - (before.readsFrom[A.id] ?? 0) >= reads, 'local replica reads counted')
    assert.equal((now.readsFrom[B.id] ?? 0) - (before.readsFrom[B.id] ?? 0), 0, 'nothing read from B')
  })

  test('a block another node marks out of sync here is read from that node, not from the stale local copy', async (t) => {
    const off = 5 * BLOCK + 4096
    const len = 65536
    assert.ok((await readBack(off, len)).equals(model.subarray(off, off + len)), 'read locally first')
    // The FUSE release of the writer's file (sent after close returns) has given the writer lease back.
    for (const until = Date.now() + 10_000; (await cluster.state('plane')).writer !== undefined;) {
      if (Date.now() > until) throw new Error('A kept the writer lease')
      await sleep(50)
    }
    // A's block file of block 5 refuses writes: B's write of it (B the
    // writer now) fails on A's replica and reaches B's, and B marks A's
    // copy out of sync, pushing the mark to A before it acknowledges.
    const file5 = join(A.imageRoot, 'plane', String(5).padStart(16, '0'))
    const chattr = await run('chattr', ['+i', file5]).catch(() => undefined)
    if (chattr?.code !== 0) return t.skip(`chattr +i is not available here: ${chattr?.stderr ?? 'no chattr'}`)
    try {
      const w = await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5c ${off} ${len}`, `nbd+unix:///plane?socket=${B.nbdSocket!}`])
      assert.equal(w.code, 0, w.stderr)
    } finally {
      assert.equal((await run('chattr', ['-i', file5])).code, 0)
    }
    model.fill(0x5c, off, off + len)
    assert.equal((await cluster.outOfSync('plane'))[A.id], 1)
    // Pushed before the acknowledgement: A reads by it already.
    await untilOutOfSyncOnA(1)
    const before = await stats()
    assert.ok((await readBack(off, len)).equals(model.subarray(off, off + len)), 'the stale local copy was read')
    assert.ok((await readBack(5 * BLOCK, BLOCK)).equals(model.subarray(5 * BLOCK, 6 * BLOCK)))
    const mid = await stats()
    assert.ok((mid.readsFrom[B.id] ?? 0) - (before.readsFrom[B.id] ?? 0) >= 2, 'block 5 is read from B')
    assert.equal((mid.readsFrom[A.id] ?? 0) - (before.readsFrom[A.id] ?? 0), 0, 'and not from A')
    // Its neighbours stay local.
    assert.ok((await readBack(6 * BLOCK, 4096)).equals(model.subarray(6 * BLOCK, 6 * BLOCK + 4096)))
    assert.equal(((await stats()).readsFrom[A.id] ?? 0) - (mid.readsFrom[A.id] ?? 0), 1)
  })

  test('reads and writes go on, equal to the model, while a local write fails, `ukai sync` runs and a range leaves this node', async (t) => {
    const file14 = join(A.imageRoot, 'plane', String(14).padStart(16, '0'))
    const chattr = await run('chattr', ['+i', file14]).catch(() => undefined)
    if (chattr?.code !== 0) return t.skip(`chattr +i is not available here: ${chattr?.stderr ?? 'no chattr'}`)
    let immutable = true
    const mutable = async (): Promise<void> => {
      if (!immutable) return
      immutable = false
      assert.equal((await run('chattr', ['-i', file14])).code, 0)
    }
    let stop = false
    let reads = 0
    let writes = 0
    // Reads of odd blocks, whose bytes do not change in this test.
    const readLoop = (async () => {
      while (!stop) {
        const block = 1 + 2 * Math.floor(rnd() * BLOCKS / 2)
        const len = 1 + Math.floor(rnd() * BLOCK / 4)
        const off = block * BLOCK + Math.floor(rnd() * (BLOCK - len))
        assert.ok((await readBack(off, len)).equals(model.subarray(off, off + len)), `read of ${len} at ${off} (block ${block}) differs from the model`)
        reads++
      }
    })()
    // Writes to even blocks, block 14 first; each read back once acknowledged.
    const writeLoop = (async () => {
      const fh = await open(path, 'r+')
      try {
        while (!stop) {
          const block = writes === 0 ? 14 : 2 * Math.floor(rnd() * BLOCKS / 2)
          const len = 1 + Math.floor(rnd() * BLOCK / 4)
          const off = block * BLOCK + Math.floor(rnd() * (BLOCK - len))
          const data = randomBytes(len)
          assert.equal((await fh.write(data, 0, len, off)).bytesWritten, len)
          data.copy(model, off)
          assert.ok((await readBack(off, len)).equals(data), `the write of ${len} at ${off} (block ${block}) was acknowledged, and a read after it returned other bytes`)
          writes++
        }
        await fh.sync()
      } finally { await fh.close() }
    })()
    const loops = Promise.all([readLoop, writeLoop])
    loops.catch(() => { stop = true })
    try {
      // The local write to block 14 failed, B took it: A's copy is out of sync (with block 5's).
      await untilOutOfSyncOnA(2)
      await sleep(300)
      await mutable()
      const sync = await A.cli('sync', 'plane')
      assert.equal(sync.code, 0, sync.stderr)
      assert.equal((await cluster.outOfSync('plane'))[A.id], 0)
      await sleep(300)
      const rm = await A.cli('image', 'remove-location', 'plane', A.id, '-s', '12', '-e', '13')
      assert.equal(rm.code, 0, rm.stderr)
      await sleep(500)
    } finally {
      stop = true
      await loops.finally(mutable)
    }
    assert.ok(reads > 20 && writes > 5, `reads ${reads}, writes ${writes}`)
    // The whole image, and every in-sync replica, equal the model.
    assert.ok((await readBack(0, SIZE)).equals(model), 'the image read through the mount differs from the model')
    assert.deepEqual(await cluster.checkReplicas('plane', model), [])
    const before = await stats()
    assert.ok((await readBack(12 * BLOCK, 2 * BLOCK)).equals(model.subarray(12 * BLOCK, 14 * BLOCK)))
    assert.ok((await readBack(14 * BLOCK, BLOCK)).equals(model.subarray(14 * BLOCK, 15 * BLOCK)))
    const now = await stats()
    assert.ok((now.readsFrom[B.id] ?? 0) - (before.readsFrom[B.id] ?? 0) >= 2, 'blocks 12-13 are read from B once A left them')
    assert.ok((now.readsFrom[A.id] ?? 0) - (before.readsFrom[A.id] ?? 0) >= 1, 'block 14 is local again after the sync')
  })
})
