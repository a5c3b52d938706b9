/**
 * Resync at write granularity (issue 11): while a location is out of
 * sync, the writer keeps a fine record of what it missed (4 KiB
 * granules), so the resync copies those alone. A writer that dies with
 * part of that record unstored leaves those blocks to be copied whole,
 * and the replicas still end identical.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { Cluster } from './helpers/cluster.js'
import type { TestNode } from './helpers/node-process.js'
import { NbdClient } from '../src/peer/nbd-client.js'
import { prng } from './helpers/assertions.js'

const MiB = 2 ** 20
const SIZE = 64 * MiB
const GRANULE = 4096

interface SyncLine { result?: { blocks: number, done: number, bytes: number, failed: unknown[] }, error?: { message: string } }

describe('resync at write granularity', { timeout: 300_000 }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode
  const model = randomBytes(SIZE)
  const random = prng(11)

  before(async () => {
    cluster = await Cluster.start({ nodes: 2, nbd: [0], config: { io_timeout: 2, retry_after: 1 } })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
    await A.cliOk('image', 'create', 'vm', '-s', '64M', '-b', '4M', '-l', A.id, '-l', B.id)
    const c = await NbdClient.connect({ path: A.nbdSocket! }, 'vm', { timeoutMs: 30_000 })
    for (let off = 0; off < SIZE; off += 4 * MiB) await c.write(off, model.subarray(off, off + 4 * MiB))
    await c.flush()
    await c.close()
    assert.deepEqual(await cluster.checkReplicas('vm', model), [])
  })
  after(async () => { await cluster?.destroy() })

  /** `count` scattered 4 KiB writes through A, flushed every 32; returns the bytes written. */
  async function scattered (c: NbdClient, count: number): Promise<number> {
    for (let i = 0; i < count; i++) {
      const off = Math.floor(random() * (SIZE / GRANULE)) * GRANULE
      const data = randomBytes(GRANULE)
      await c.write(off, data)
      data.copy(model, off)
      if (i % 32 === 31) await c.flush()
    }
    await c.flush()
    return count * GRANULE
  }

  async function sync (): Promise<NonNullable<SyncLine['result']>> {
    const r = await A.api<SyncLine[]>('POST', '/v1/images/vm/sync', {})
    const last = r.body[r.body.length - 1]!
    assert.equal(last.error, undefined, last.error?.message)
    return last.result!
  }

  test('an outage with scattered 4 KiB writes: the resync copies at most 1.1x the bytes written, and the replicas end identical', async () => {
    await B.stop('SIGKILL')
    const c = await NbdClient.connect({ path: A.nbdSocket! }, 'vm', { timeoutMs: 30_000 })
    const written = await scattered(c, 400)
    await c.close()
    await B.launch()
    const doc = await cluster.image('vm')
    const st = doc.locations[B.id] as { out_of_sync: unknown[], fine?: unknown[] }
    assert.ok(st.out_of_sync.length > 0, 'B was not marked out of sync')
    assert.ok((st.fine ?? []).length > 0, 'B has no fine record')
    const result = await sync()
    assert.deepEqual(result.failed, [])
    assert.ok(result.bytes <= 1.1 * written, `the resync copied ${result.bytes} bytes for ${written} written`)
    assert.ok(result.bytes > 0)
    assert.deepEqual(await cluster.outOfSync('vm'), { [A.id]: 0, [B.id]: 0 })
    assert.deepEqual(await cluster.checkReplicas('vm', model), [])
  })

  test('a writer killed with part of its fine record unstored: those blocks are copied whole, and the replicas end identical', async () => {
    await B.stop('SIGKILL')
    const c = await NbdClient.connect({ path: A.nbdSocket! }, 'vm', { timeoutMs: 30_000 })
    const written = await scattered(c, 100)
    // The writer dies with its image open: what it missed since the
    // marks is in memory only (the blocks are in the dirty-block log).
    await A.stop('SIGKILL')
    await c.close().catch(() => {})
    assert.ok((await cluster.dirtyLog('vm')).size > 0, 'the dirty-block log is empty')
    await A.launch()
    await B.launch()
    const result = await sync()
    assert.deepEqual(result.failed, [])
    assert.ok(result.bytes > written, `only ${result.bytes} bytes were copied for ${written} written: no block fell back to a whole copy`)
    assert.deepEqual(await cluster.outOfSync('vm'), { [A.id]: 0, [B.id]: 0 })
    assert.deepEqual(await cluster.checkReplicas('vm', model), [])
  })
})
