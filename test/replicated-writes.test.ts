/**
 * Issue 12 (replicated writes): large writes through a node's NBD export,
 * many in flight at once, reach both replicas intact. Their payloads are
 * assembled from socket chunks on both nodes into buffers of the payload
 * pool, which are reused from write to write (ioBuffers in transmission.ts): a buffer
 * handed to a new write while an earlier one still read it would leave a
 * replica different from the model.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { Cluster } from './helpers/cluster.js'
import type { TestNode } from './helpers/node-process.js'
import { NbdClient } from '../src/peer/nbd-client.js'
import { prng } from './helpers/assertions.js'

const MB = 2 ** 20
const SIZE = 8 * MB
const BLOCK = 64 * 1024

describe('replicated writes through NBD (issue 12)', { timeout: 300_000 }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode

  before(async () => {
    cluster = await Cluster.start({ nodes: 2, nbd: [0], config: { io_timeout: 10 } })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
    // Small blocks, and flushes between the writes: the dirty-block log is
    // trimmed and written again and again, so writes wait (for the log)
    // between taking their payload and sending it, while later payloads
    // arrive.
    const r = await A.cli('image', 'create', 'rw', '-s', String(SIZE), '-b', String(BLOCK), '-l', A.id, '-l', B.id)
    assert.equal(r.code, 0, r.stderr)
  })
  after(async () => { await cluster?.destroy() })

  test('pipelined writes of 64 KiB to 1.5 MiB over 64 KiB blocks, 8 in flight, flushed now and then, equal the model on both replicas', async () => {
    const model = Buffer.alloc(SIZE)
    const rnd = prng(12)
    const c = await NbdClient.connect({ path: A.nbdSocket! }, 'rw', { timeoutMs: 30_000 })
    try {
      const inflight = new Map<Promise<void>, [number, number]>()
      for (let i = 0; i < 300; i++) {
        const len = 4096 * (16 + Math.floor(rnd() * 368))
        const off = 4096 * Math.floor(rnd() * ((SIZE - len) / 4096))
        // In flight at once only writes that do not overlap: the model
        // cannot know the order of overlapping ones.
        while ([...inflight.values()].some(([s, e]) => off < e && off + len > s)) await Promise.race(inflight.keys())
        while (inflight.size >= 8) await Promise.race(inflight.keys())
        const data = randomBytes(len)
        data.copy(model, off)
        const p: Promise<void> = c.write(off, data).then(() => { inflight.delete(p) })
        inflight.set(p, [off, off + len])
        if (i % 16 === 15) await c.flush()
      }
      await Promise.all(inflight.keys())
      await c.flush()
      const got = Buffer.alloc(SIZE)
      await c.read(0, got)
      assert.ok(got.equals(model), 'what the export reads back is the model')
    } finally { await c.close() }
    const doc = await cluster.image('rw')
    for (const st of Object.values(doc.locations)) assert.deepEqual(st.out_of_sync, [], 'no replica went out of sync')
    assert.deepEqual(await cluster.checkReplicas('rw', model), [], 'both replicas\' block files equal the model')
  })
})
