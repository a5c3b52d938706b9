/**
 * The first layout of the embedded store, `<metadata_root>/<name>.json`
 * per image (stored format 1) and `dirty/<name>.json` per dirty-block log,
 * is moved into the metadata core when a store opens there: each image is
 * created from its file, its dirty-block log merged in, and the old files
 * are kept under `v1/`. Safe to run again after a crash, and by two
 * processes at once: an image already moved is left as it is, and logs
 * are merged (a block logged twice is reconciled once).
 */
import { promises as fsp } from 'node:fs'
import { join } from 'node:path'
import { UkaiError } from '../errors.js'
import { decodeStored } from './codec.js'
import { RangeSet } from './range-set.js'
import type { MetadataStore } from './store.js'
import { fsyncDir, mkdirDurable } from '../util/durable-fs.js'

const V1_IMAGE = /^([A-Za-z0-9][A-Za-z0-9._-]{0,127})\.json$/

async function readJson (path: string): Promise<unknown> {
  try {
    return JSON.parse(await fsp.readFile(path, 'utf8'))
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw new UkaiError('UKAI_ERR_INVALID_METADATA', `${path}: ${(err as Error).message}`)
  }
}

/** Moves v1 files under `root` into `store`; returns the names of the images moved. */
export async function migrateV1 (root: string, store: MetadataStore, defaultPort: number): Promise<string[]> {
  const files = (await fsp.readdir(root).catch(() => [] as string[])).filter((f) => V1_IMAGE.test(f))
  if (files.length === 0) return []
  const backup = join(root, 'v1')
  await mkdirDurable(backup)
  const moved: string[] = []
  for (const f of files) {
    const name = V1_IMAGE.exec(f)![1]!
    const doc = await readJson(join(root, f))
    if (doc === undefined) continue
    const meta = decodeStored(doc, defaultPort)
    try {
      await store.create(meta)
    } catch (err) {
      if (!(err instanceof UkaiError) || err.code !== 'UKAI_ERR_EXISTS') throw err
    }
    const dirtyFile = join(root, 'dirty', f)
    const dirty = await readJson(dirtyFile) as { dirty?: Array<[number, number]> } | undefined
    if (dirty?.dirty !== undefined && dirty.dirty.length > 0) {
      const merged = (await store.getDirty(name)).addSet(new RangeSet(dirty.dirty))
      await store.putDirty(name, merged)
    }
    await fsp.rename(dirtyFile, join(backup, `dirty-${f}`)).catch(() => {})
    await fsp.rename(join(root, f), join(backup, f)).catch(() => {})
    moved.push(name)
  }
  // Old node registrations and lock files mean nothing to the new layout.
  await fsp.rm(join(root, 'nodes'), { recursive: true, force: true })
  await fsp.rmdir(join(root, 'dirty')).catch(() => {})
  for (const f of await fsp.readdir(root)) if (/^\..*\.lock$/.test(f)) await fsp.rm(join(root, f), { force: true })
  // The moves are durable before anything relies on them: a power loss
  // must not bring an old file back to be imported again.
  await fsyncDir(backup)
  await fsyncDir(root)
  return moved
}
