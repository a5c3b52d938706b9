/**
 * Regression: a write the writer gave up on (its peer did not answer in
 * time) must never land on the peer after what the writer did next. The
 * peer here is a real node's replica exports served in-process; its block
 * store holds the first write back, as a peer stopped with SIGSTOP would.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { startReplicaPeer } from '../../test/helpers/nbd.js'
import { RemoteReplica } from './remote-replica.js'

test('a write the writer timed out on is refused, or lands first, once the writer has moved on to a new epoch', async (t) => {
  const { fx, node, grant } = await startReplicaPeer((fn) => t.after(fn), 4 * 4096, 4096)

  // The peer takes the first write in, and sits on it.
  const realWrite = node.blocks.write.bind(node.blocks)
  let release!: () => void
  const held = new Promise<void>((resolve) => { release = resolve })
  let first = true
  node.blocks.write = async (image, block, offset, data) => {
    if (first) {
      first = false
      await held
    }
    await realWrite(image, block, offset, data)
  }
  const peer = new RemoteReplica(node.config.id, { path: fx.socket }, { timeoutMs: 300, blockSizeOf: () => 4096 })
  t.after(async () => await peer.close())
  await assert.rejects(peer.write('img', 0, 0, Buffer.alloc(4096, 0x11), grant.generation), /no reply from the NBD server/)
  // The writer goes on: the same block, newer bytes (a resync would do the same).
  const next = peer.write('img', 0, 0, Buffer.alloc(4096, 0x22), grant.generation)
  await new Promise((resolve) => setTimeout(resolve, 200))
  release()
  await next
  const got = Buffer.alloc(4096)
  await node.blocks.read('img', 0, 0, got)
  assert.ok(got.equals(Buffer.alloc(4096, 0x22)), `the block holds ${got[0]!.toString(16)}: the write given up on landed last`)
})
