/**
 * A replica whose block files are gone is never served as zeros (issue 9):
 * a peer asking a node for a replica it lost is refused while the node
 * runs, and a node that starts without a replica the metadata places on
 * it marks it out of sync where another copy exists.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { rm } from 'node:fs/promises'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { Cluster } from './helpers/cluster.js'
import type { TestNode } from './helpers/node-process.js'
import { NbdClient } from '../src/peer/nbd-client.js'

const MiB = 2 ** 20

describe('a lost replica', { timeout: 120_000 }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode
  const data = randomBytes(4 * MiB)

  before(async () => {
    cluster = await Cluster.start({ nodes: 2, nbd: [0, 1], config: { io_timeout: 2, retry_after: 30 } })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
    const r = await A.cli('image', 'create', 'vm', '-s', '4M', '-b', '1M', '-l', A.id, '-l', B.id)
    assert.equal(r.code, 0, r.stderr)
    const c = await NbdClient.connect({ path: A.nbdSocket! }, 'vm', { timeoutMs: 30_000 })
    await c.write(0, data)
    await c.flush()
    await c.close()
    assert.deepEqual(await cluster.checkReplicas('vm', data), [])
  })
  after(async () => { await cluster?.destroy() })

  test('a running node whose replica was wiped refuses it to its peers instead of serving zeros', async () => {
    await rm(join(B.imageRoot, 'vm'), { recursive: true, force: true })
    await assert.rejects(NbdClient.connect({ host: '127.0.0.1', port: B.config.proxy_port as number }, 'replica/vm', { timeoutMs: 5000 }))
  })

  test('a node that starts without its replica marks it out of sync where another copy exists; a sync brings it back', async () => {
    await B.stop()
    await rm(join(B.imageRoot, 'vm'), { recursive: true, force: true })
    await B.launch()
    assert.match(B.output, /this node's replica was missing/)
    const doc = await cluster.image('vm')
    assert.deepEqual(doc.locations[B.id]!.out_of_sync, [[0, 4]])
    assert.deepEqual(doc.locations[A.id]!.out_of_sync, [])
    // Reads through B come from A now.
    const c = await NbdClient.connect({ path: B.nbdSocket! }, 'vm', { timeoutMs: 30_000 })
    const got = Buffer.alloc(4 * MiB)
    await c.read(0, got)
    await c.close()
    assert.ok(got.equals(data), 'B served something else than the data')
    const s = await A.cli('sync', 'vm')
    assert.equal(s.code, 0, s.stderr)
    assert.deepEqual(await cluster.checkReplicas('vm', data, { includeOutOfSync: true }), [])
  })
})
