import { test, describe } from 'node:test'
import assert from 'node:assert/strict'
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { UkaiError } from '../errors.js'
import { makeTmpDir, tmpDir } from '../../test/helpers/tmp.js'
import { encodeStored, STORED_FORMAT_VERSION } from './codec.js'
import { FileMetadataStore, atomicWriteFile } from './file-store.js'
import { runStoreConformance, sampleImage } from './store.conformance.js'

const PORT = 22222

runStoreConformance('file', async () => {
  const dir = await makeTmpDir('ukai-file-store-')
  const root = join(dir.path, 'metadata')
  return {
    store: await FileMetadataStore.open(root, PORT),
    cleanup: dir.cleanup,
    openPeer: async () => await FileMetadataStore.open(root, PORT)
  }
})

describe('FileMetadataStore on disk', () => {
  test('open makes the directory; each image is <name>.json in the stored format', async (t) => {
    const root = join(await tmpDir(t), 'a', 'b')
    const store = await FileMetadataStore.open(root, PORT)
    t.after(async () => await store.close())
    assert.equal(store.kind, 'file')
    assert.equal(store.root, root)
    const created = await store.create(sampleImage('image01'))
    assert.deepEqual(await readdir(root), ['image01.json'])
    const doc = JSON.parse(await readFile(join(root, 'image01.json'), 'utf8')) as Record<string, unknown>
    assert.equal(doc.format, STORED_FORMAT_VERSION)
    assert.deepEqual(doc, encodeStored(created))
    await store.update('image01', (m) => { m.usedSize = 10; return m })
    const after = JSON.parse(await readFile(join(root, 'image01.json'), 'utf8')) as Record<string, unknown>
    assert.equal(after.used_size, 10)
    assert.equal(after.generation, 2)
    // Nothing but the image file is left behind by create and update.
    assert.deepEqual(await readdir(root), ['image01.json'])
  })

  test('open removes temp files left by writers that died; list ignores other files', async (t) => {
    const root = await tmpDir(t)
    const first = await FileMetadataStore.open(root, PORT)
    await first.create(sampleImage('img'))
    await first.close()
    const leftovers = ['.img.json.123.4.tmp', '.other.json.9.9.tmp']
    for (const f of leftovers) await writeFile(join(root, f), '{"half": ')
    await writeFile(join(root, 'README'), 'not an image')
    await writeFile(join(root, '.hidden.json'), '{}')
    await writeFile(join(root, 'bad name.json'), '{}')
    await mkdir(join(root, 'subdir'))
    const store = await FileMetadataStore.open(root, PORT)
    t.after(async () => await store.close())
    const files = await readdir(root)
    for (const f of leftovers) assert.ok(!files.includes(f), `${f} was not removed`)
    assert.ok(files.includes('README') && files.includes('.hidden.json'), 'open removed files that are not temp files')
    assert.deepEqual(await store.list(), ['img'])
    assert.equal((await store.get('img'))!.generation, 1)
  })

  test('a corrupt or misnamed file is UKAI_ERR_INVALID_METADATA, never a missing image', async (t) => {
    const root = await tmpDir(t)
    const store = await FileMetadataStore.open(root, PORT)
    t.after(async () => await store.close())
    await writeFile(join(root, 'torn.json'), '{"format": 1, "name": "to')
    await assert.rejects(store.get('torn'), (err: unknown) => {
      assert.ok(err instanceof UkaiError)
      assert.equal(err.code, 'UKAI_ERR_INVALID_METADATA')
      assert.match(err.message, /torn\.json is not valid JSON/)
      return true
    })
    await store.create(sampleImage('real'))
    await writeFile(join(root, 'alias.json'), await readFile(join(root, 'real.json')))
    await assert.rejects(store.get('alias'), /alias\.json names image 'real'/)
    await writeFile(join(root, 'broken.json'), JSON.stringify({ ...encodeStored(sampleImage('broken')), used_size: 1e9 }))
    await assert.rejects(store.get('broken'), (err: unknown) => err instanceof UkaiError && err.code === 'UKAI_ERR_INVALID_METADATA')
    // An update of a corrupt image fails and leaves the file as it was.
    await assert.rejects(store.update('torn', (m) => m), (err: unknown) => err instanceof UkaiError && err.code === 'UKAI_ERR_INVALID_METADATA')
    assert.equal(await readFile(join(root, 'torn.json'), 'utf8'), '{"format": 1, "name": "to')
  })

  test('create does not overwrite a file another process wrote first', async (t) => {
    const root = await tmpDir(t)
    const a = await FileMetadataStore.open(root, PORT)
    const b = await FileMetadataStore.open(root, PORT)
    t.after(async () => { await a.close(); await b.close() })
    const results = await Promise.allSettled([a.create(sampleImage('img')), b.create(sampleImage('img'))])
    assert.deepEqual(results.map((r) => r.status).sort(), ['fulfilled', 'rejected'])
    const lost = results.find((r) => r.status === 'rejected') as PromiseRejectedResult
    assert.equal((lost.reason as UkaiError).code, 'UKAI_ERR_EXISTS')
    assert.deepEqual(await readdir(root), ['img.json'])
  })

  test('atomicWriteFile replaces the file and leaves no temp file', async (t) => {
    const dir = await tmpDir(t)
    await atomicWriteFile(dir, 'x.json', 'one')
    await atomicWriteFile(dir, 'x.json', Buffer.from('two'))
    assert.equal(await readFile(join(dir, 'x.json'), 'utf8'), 'two')
    assert.deepEqual(await readdir(dir), ['x.json'])
    await assert.rejects(atomicWriteFile(join(dir, 'missing'), 'x.json', 'three'), /ENOENT/)
  })
})
