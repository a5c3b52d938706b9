/**
 * The embedded store's first layout (`<name>.json` per image, dirty-block
 * logs under `dirty/`) is moved into the metadata core when a store opens
 * on it, and nothing is lost: the image, its sync states, its log.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdir, readdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { tmpDir } from '../../test/helpers/tmp.js'
import { encodeStored } from './codec.js'
import { FileCore } from './file-core.js'
import { migrateV1 } from './migrate-v1.js'
import { MetadataStore } from './store.js'
import { sampleImage } from './store.conformance.js'

test('the first layout of the embedded store is moved in, its files kept under v1/; a second run changes nothing', async (t) => {
  const root = join(await tmpDir(t), 'metadata')
  await mkdir(join(root, 'dirty'), { recursive: true })
  await mkdir(join(root, 'nodes'), { recursive: true })
  const meta = sampleImage('image01')
  const doc = { ...encodeStored(meta), generation: 7 } as Record<string, unknown>
  delete doc.revision
  await writeFile(join(root, 'image01.json'), JSON.stringify(doc) + '\n')
  await writeFile(join(root, 'dirty', 'image01.json'), JSON.stringify({ dirty: [[2, 4]] }) + '\n')
  await writeFile(join(root, 'nodes', '127.0.0.1:22222.json'), '{}')
  await writeFile(join(root, '.image01.lock'), '123')

  const store = new MetadataStore(await FileCore.open(root), 22222)
  t.after(async () => await store.close())
  assert.deepEqual(await migrateV1(root, store, 22222), ['image01'])
  const st = (await store.state('image01'))!
  const { revision: _a, ...want } = encodeStored(meta)
  const { revision: _b, ...got } = encodeStored(st.meta)
  assert.deepEqual(got, want)
  assert.deepEqual(st.dirty.toJSON(), [[2, 4]])
  assert.deepEqual((await readdir(root)).sort(), ['shards', 'v1'])
  assert.deepEqual((await readdir(join(root, 'v1'))).sort(), ['dirty-image01.json', 'image01.json'])
  // Again: nothing left to move, nothing changed.
  assert.deepEqual(await migrateV1(root, store, 22222), [])
  assert.deepEqual((await store.state('image01'))!.dirty.toJSON(), [[2, 4]])
})

test('an invalid v1 file stops the move with the reason and moves nothing of it', async (t) => {
  const root = join(await tmpDir(t), 'metadata')
  await mkdir(root, { recursive: true })
  await writeFile(join(root, 'bad.json'), '{"format": 1, "name": "bad"')
  const store = new MetadataStore(await FileCore.open(root), 22222)
  t.after(async () => await store.close())
  await assert.rejects(migrateV1(root, store, 22222), /bad\.json/)
  assert.deepEqual(await store.list(), [])
  assert.ok((await readdir(root)).includes('bad.json'))
})
