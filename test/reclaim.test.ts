/**
 * `remove-location` deletes that node's block files (issue 10, item 5),
 * on real processes: the node that held the blocks removes their files a
 * few seconds after the change (RECLAIM_DELAY_MS), while the image keeps
 * being written elsewhere; a node that was down when its blocks were moved
 * away removes them when it is back. Blocks still placed there, in sync or
 * not, keep their files. An image destroyed before that node's reclaim ran
 * loses its files there too.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { stat } from 'node:fs/promises'
import { join } from 'node:path'
import { NbdClient } from '../src/peer/nbd-client.js'
import { RECLAIM_DELAY_MS } from '../src/node/node.js'
import { Cluster } from './helpers/cluster.js'
import type { TestNode } from './helpers/node-process.js'
import { waitUntil } from './helpers/assertions.js'

const MiB = 2 ** 20
const SIZE = 8 * MiB

async function exists (path: string): Promise<boolean> {
  try { await stat(path); return true } catch { return false }
}

/** Which of an image's 8 block files a node holds. */
async function filesOn (n: TestNode, image: string): Promise<number[]> {
  const out: number[] = []
  for (let b = 0; b < SIZE / MiB; b++) if (await exists(join(n.imageRoot, image, String(b).padStart(16, '0')))) out.push(b)
  return out
}

const until = async (what: string, fn: () => Promise<boolean>, ms = RECLAIM_DELAY_MS + 15_000): Promise<void> => await waitUntil(what, fn, ms)

describe('reclaim: remove-location deletes the block files of that node', { timeout: 240_000 }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode

  before(async () => {
    cluster = await Cluster.start({ nodes: 2, nbd: [0, 1], config: { io_timeout: 2, retry_after: 30 } })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
  })
  after(async () => { await cluster?.destroy() })

  test('blocks 0-3 removed from B while A writes: B drops those four files, keeps the rest; nothing is lost', async () => {
    await A.cliOk('image', 'create', 'vm', '-s', '8M', '-b', '1M', '-l', A.id, '-l', B.id)
    const model = randomBytes(SIZE)
    const c = await NbdClient.connect({ path: A.nbdSocket! }, 'vm', { timeoutMs: 30_000 })
    let stop = false
    let failures = 0
    let writes = 0
    try {
      await c.write(0, model)
      await c.flush()
      assert.deepEqual(await filesOn(B, 'vm'), [0, 1, 2, 3, 4, 5, 6, 7])
      // The guest keeps writing (the same bytes, all over the image) through the change.
      const writer = (async () => {
        for (let i = 0; !stop; i++) {
          const at = (i * 7 % (SIZE / 4096)) * 4096
          try { await c.write(at, model.subarray(at, at + 4096)); writes++ } catch { failures++ }
          await new Promise((r) => setTimeout(r, 5))
        }
      })()
      await A.cliOk('image', 'remove-location', 'vm', B.id, '-s', '0', '-e', '3')
      await until('B removes the files of blocks 0-3', async () => (await filesOn(B, 'vm')).join() === '4,5,6,7')
      // And nothing brings them back.
      await new Promise((r) => setTimeout(r, 1000))
      stop = true
      await writer
      await c.flush()
      assert.equal(failures, 0, 'a guest write failed')
      assert.ok(writes > 50, `only ${writes} writes ran`)
      assert.deepEqual(await filesOn(B, 'vm'), [4, 5, 6, 7])
    } finally {
      stop = true
      await c.close()
    }
    assert.match(B.output, /removed 4 block file\(s\) of blocks no longer placed on this node/)
    assert.deepEqual(await cluster.checkReplicas('vm', model), [])
    const back = Buffer.alloc(SIZE)
    const r = await NbdClient.connect({ path: B.nbdSocket! }, 'vm', { timeoutMs: 30_000 })
    try { await r.read(0, back) } finally { await r.close() }
    assert.ok(back.equals(model), 'B reads other bytes than were written')
  })

  test('a node that was down when its blocks moved away removes them when it is back', async () => {
    await B.stop()
    await A.cliOk('image', 'remove-location', 'vm', B.id)
    assert.ok(await exists(join(B.imageRoot, 'vm')))
    await B.launch()
    await until("B removes its replica of 'vm'", async () => !await exists(join(B.imageRoot, 'vm')))
    assert.match(B.output, /image 'vm' places no block on this node any more/)
    // A still holds every block, in sync.
    assert.deepEqual(await filesOn(A, 'vm'), [0, 1, 2, 3, 4, 5, 6, 7])
    assert.deepEqual(await cluster.checkReplicas('vm'), [])
  })

  test('an image destroyed while its former location still waits to reclaim: that node removes the files too', async () => {
    await A.cliOk('image', 'create', 'gone', '-s', '8M', '-b', '1M', '-l', A.id, '-l', B.id)
    const c = await NbdClient.connect({ path: A.nbdSocket! }, 'gone', { timeoutMs: 30_000 })
    try {
      await c.write(0, randomBytes(SIZE))
      await c.flush()
    } finally { await c.close() }
    assert.deepEqual(await filesOn(B, 'gone'), [0, 1, 2, 3, 4, 5, 6, 7])
    // Destroyed before B's reclaim of the removed location ran: no current location names B.
    await A.cliOk('image', 'remove-location', 'gone', B.id)
    await A.cliOk('image', 'destroy', 'gone')
    await until("B removes its former replica of the destroyed 'gone'", async () => !await exists(join(B.imageRoot, 'gone')))
    assert.ok(!await exists(join(A.imageRoot, 'gone')))
    assert.match(B.output, /image 'gone' was destroyed: the block files its former replica here still had were removed/)
  })

  test('placed again, a removed block comes back out of sync and sync copies it whole', async () => {
    await A.cliOk('image', 'add-location', 'vm', B.id, '-s', '2', '-e', '5')
    await A.cliOk('sync', 'vm')
    assert.deepEqual(await filesOn(B, 'vm'), [2, 3, 4, 5])
    assert.deepEqual(await cluster.checkReplicas('vm'), [])
  })
})
