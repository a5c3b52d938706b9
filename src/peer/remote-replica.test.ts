/**
 * RemoteReplica's pool against a real node's replica exports served in
 * this process: which connection carries a writer's requests.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { startReplicaPeer } from '../../test/helpers/nbd.js'
import { NbdClient } from './nbd-client.js'
import { RemoteReplica } from './remote-replica.js'

test('a tick\'s writes go on one pooled connection (one socket write), the next tick\'s on the other, and all land', async (t) => {
  const { fx, node, grant } = await startReplicaPeer((fn) => t.after(fn), 64 * 4096, 16 * 4096)

  const carriers: NbdClient[] = []
  const realWrite = NbdClient.prototype.write
  NbdClient.prototype.write = async function (this: NbdClient, offset: number, data: Buffer, fua?: boolean): Promise<void> {
    carriers.push(this)
    return await realWrite.call(this, offset, data, fua)
  }
  t.after(() => { NbdClient.prototype.write = realWrite })
  const peer = new RemoteReplica(node.config.id, { path: fx.socket }, { timeoutMs: 5000, connections: 2, blockSizeOf: () => 16 * 4096 })
  t.after(async () => await peer.close())

  const model = Buffer.alloc(64 * 4096)
  const write = async (granule: number): Promise<void> => {
    const data = randomBytes(4096)
    data.copy(model, granule * 4096)
    await peer.write('img', Math.floor(granule / 16), (granule % 16) * 4096, data, grant.generation)
  }
  // One at a time until the pool holds both connections.
  for (let i = 0; i < 4; i++) await write(i)
  assert.equal(new Set(carriers).size, 2, 'the pool opened its two connections')

  carriers.length = 0
  await Promise.all([4, 5, 6, 7, 8, 9, 10, 11].map(write))
  const first = carriers.slice()
  carriers.length = 0
  await Promise.all([20, 21, 22, 23, 40, 41, 42, 43].map(write))
  assert.equal(new Set(first).size, 1, 'the writes of one tick share a connection')
  assert.equal(new Set(carriers).size, 1, 'and so do the next tick\'s')
  assert.notEqual(carriers[0], first[0], 'each tick takes the next connection')

  const got = Buffer.alloc(model.length)
  for (let b = 0; b < 4; b++) await node.blocks.read('img', b, 0, got.subarray(b * 16 * 4096, (b + 1) * 16 * 4096))
  assert.ok(got.equals(model), 'every write landed where it was sent')
})
