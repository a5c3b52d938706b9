/**
 * Regression: a flush that starts while an earlier one is still syncing
 * must not answer first. The earlier flush took the written blocks (it
 * cleared the volume's unflushed set and the block files' dirty marks), so
 * the later one found nothing to sync and returned at once, before the
 * data it had to cover was durable (NBD: "All write commands ... that the
 * server completes prior to processing a NBD_CMD_FLUSH MUST be written to
 * non-volatile storage prior to replying to that NBD_CMD_FLUSH").
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { join } from 'node:path'
import { BlockStore } from '../blockstore/block-store.js'
import { FileCore } from '../metadata/file-core.js'
import { ImageMeta } from '../metadata/image.js'
import { MetadataStore } from '../metadata/store.js'
import { FenceTable } from '../node/fences.js'
import { LocalReplica, type Replica } from '../replica/replica.js'
import { testCluster } from '../../test/helpers/cluster-context.js'
import { makeTmpDir } from '../../test/helpers/tmp.js'
import { NodeErrors } from './node-errors.js'
import { Volume } from './volume.js'

test('a flush waits for an earlier flush still syncing the writes it covers', async (t) => {
  const dir = await makeTmpDir('ukai-flush-')
  t.after(dir.cleanup)
  const store = new MetadataStore(await FileCore.open(join(dir.path, 'metadata')), 22222)
  const blocks = new BlockStore(join(dir.path, 'blocks'), '%016d')
  t.after(async () => { await blocks.close(); await store.close() })
  await blocks.allocate('img')
  const meta = new ImageMeta({ name: 'img', size: 1 << 20, blockSize: 1 << 16 })
  meta.addLocation('127.0.0.1:1', 0, meta.blockCount, true)
  await store.create(meta)

  // The first flush's sync is slow: it has taken the dirty files, and
  // finishes only when the gate opens.
  const events: string[] = []
  let open!: () => void
  const gate = new Promise<void>((resolve) => { open = resolve })
  const fences = new FenceTable()
  const real = new LocalReplica('127.0.0.1:1', blocks, fences)
  let calls = 0
  const slow: Replica = Object.create(real, {
    flush: {
      value: async (image: string) => {
        const first = ++calls === 1
        await real.flush(image)
        if (first) {
          await gate
          events.push('first sync done')
        }
      }
    }
  }) as Replica
  const vol = new Volume(await store.require('img'), { store, replicas: { replicaFor: () => slow }, errors: new NodeErrors(60), cluster: await testCluster(store, '127.0.0.1:1', fences) })

  await vol.write(0, Buffer.alloc(4096, 1))
  const first = vol.flush()
  const second = vol.flush().then(() => events.push('second flush answered'))
  // Give the second flush every chance to (wrongly) answer first.
  for (let i = 0; i < 50; i++) await new Promise((resolve) => setImmediate(resolve))
  open()
  await Promise.all([first, second])
  assert.deepEqual(events, ['first sync done', 'second flush answered'])
})
