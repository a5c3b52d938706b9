/**
 * Formats of image metadata:
 *
 * - the stored format (what the metadata store keeps): compact, ranges of
 *   blocks per location, documented in docs/ARCHITECTURE.md;
 * - the seed's JSON, one object per block, `{"synced": true}`;
 * - the later UKAI's JSON, one object per block, `{"sync_status": 0}`
 *   (0 in sync, 1 syncing, 2 out of sync) with `used_size` and
 *   `hypervisors`.
 *
 * The per-block formats are for import and export only. Every decoder
 * validates completely and throws UKAI_ERR_INVALID_METADATA; nothing is
 * stored from a document that fails.
 */
import { UkaiError } from '../errors.js'
import { ImageMeta, emptyLocation, validateImage, type LocationState } from './image.js'
import { validateImageName } from './names.js'
import { RangeSet, type Range } from './range-set.js'
import { show } from '../util/show.js'

export const STORED_FORMAT_VERSION = 1

export interface StoredImage {
  format: typeof STORED_FORMAT_VERSION
  name: string
  size: number
  block_size: number
  used_size: number
  hypervisors: string[]
  /** The store's revision it was read at (informative; ignored on import). */
  revision: number
  locations: Record<string, { blocks: Range[], out_of_sync: Range[], fine?: Range[], changed?: Range[] }>
}

export type ExportFormat = 'seed' | 'ukai'

const invalid = (message: string, details?: Record<string, unknown>): UkaiError =>
  new UkaiError('UKAI_ERR_INVALID_METADATA', message, details)

function isObject (v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

function checkKeys (obj: Record<string, unknown>, allowed: string[], where: string): void {
  for (const k of Object.keys(obj)) {
    if (!allowed.includes(k)) throw invalid(`${where}: unknown key '${k}' (allowed: ${allowed.join(', ')})`, { key: k })
  }
}

function nameOf (doc: Record<string, unknown>): string {
  try {
    return validateImageName(doc.name)
  } catch (err) {
    throw invalid(`metadata: ${(err as Error).message}`, { key: 'name' })
  }
}

export function encodeStored (meta: ImageMeta): StoredImage {
  const locations: StoredImage['locations'] = {}
  for (const [loc, st] of meta.locations) {
    locations[loc] = {
      blocks: st.blocks.toJSON(),
      out_of_sync: st.outOfSync.toJSON(),
      ...(st.fine.isEmpty ? {} : { fine: st.fine.toJSON(), changed: st.changed.toJSON() })
    }
  }
  return {
    format: STORED_FORMAT_VERSION,
    name: meta.name,
    size: meta.size,
    block_size: meta.blockSize,
    used_size: meta.usedSize,
    hypervisors: meta.hypervisors.slice(),
    revision: meta.revision,
    locations
  }
}

function decodeRanges (v: unknown, where: string): RangeSet {
  if (!Array.isArray(v)) throw invalid(`${where}: expected a list of [start, end) ranges`)
  const set = new RangeSet()
  for (const r of v) {
    if (!Array.isArray(r) || r.length !== 2 || !r.every((x) => Number.isSafeInteger(x) && x >= 0) || r[0] >= r[1]) {
      throw invalid(`${where}: ${show(r)} is not a range [start, end) with 0 <= start < end`)
    }
    set.add(r[0], r[1])
  }
  return set
}

export function decodeStored (doc: unknown, defaultPort: number): ImageMeta {
  if (!isObject(doc)) throw invalid('stored metadata must be a JSON object')
  if (doc.format !== STORED_FORMAT_VERSION) {
    throw invalid(`stored metadata format ${show(doc.format)} is not supported (expected ${STORED_FORMAT_VERSION})`)
  }
  // 'generation' is what version 1 of this format called 'revision'.
  checkKeys(doc, ['format', 'name', 'size', 'block_size', 'used_size', 'hypervisors', 'generation', 'revision', 'locations'], 'stored metadata')
  const name = nameOf(doc)
  if (!isObject(doc.locations)) throw invalid(`image '${name}': 'locations' must be an object`)
  const locations = new Map<string, LocationState>()
  for (const [loc, st] of Object.entries(doc.locations)) {
    if (!isObject(st)) throw invalid(`image '${name}': location ${loc} must be an object`)
    checkKeys(st, ['blocks', 'out_of_sync', 'fine', 'changed'], `image '${name}' location ${loc}`)
    const state = {
      blocks: decodeRanges(st.blocks, `image '${name}' location ${loc} blocks`),
      outOfSync: decodeRanges(st.out_of_sync ?? [], `image '${name}' location ${loc} out_of_sync`),
      fine: decodeRanges(st.fine ?? [], `image '${name}' location ${loc} fine`),
      changed: decodeRanges(st.changed ?? [], `image '${name}' location ${loc} changed`)
    }
    locations.set(loc, state)
  }
  for (const key of ['generation', 'revision']) {
    const v = doc[key] ?? 0
    if (!Number.isSafeInteger(v) || (v as number) < 0) throw invalid(`image '${name}': '${key}' must be a non-negative integer`)
  }
  const meta = new ImageMeta({
    name,
    size: doc.size as number,
    blockSize: doc.block_size as number,
    usedSize: doc.used_size as number,
    hypervisors: decodeHypervisors(doc.hypervisors, name),
    locations
  })
  validateImage(meta, defaultPort)
  // A location that holds no block is no location (the per-block formats cannot name it).
  for (const [loc, st] of locations) if (st.blocks.isEmpty) locations.delete(loc)
  return meta
}

function decodeHypervisors (v: unknown, name: string): string[] {
  if (v === undefined) return []
  // The later UKAI kept hypervisors as an object keyed by address.
  if (isObject(v)) return Object.keys(v)
  if (!Array.isArray(v) || !v.every((h) => typeof h === 'string')) {
    throw invalid(`image '${name}': 'hypervisors' must be a list of node addresses`, { key: 'hypervisors' })
  }
  return [...new Set(v as string[])]
}

/** Sync state of one replica in a per-block document: true when in sync. */
function decodeReplicaState (st: unknown, where: string): boolean {
  if (!isObject(st)) throw invalid(`${where}: state must be an object such as {"synced": true} or {"sync_status": 0}`)
  checkKeys(st, ['synced', 'sync_status'], where)
  if ('synced' in st && 'sync_status' in st) throw invalid(`${where}: give either 'synced' or 'sync_status', not both`)
  if ('synced' in st) {
    if (typeof st.synced !== 'boolean') throw invalid(`${where}: 'synced' must be true or false, got ${show(st.synced)}`)
    return st.synced
  }
  if ('sync_status' in st) {
    // 0 = in sync, 1 = syncing (never durable: treated as out of sync), 2 = out of sync.
    if (st.sync_status === 0) return true
    if (st.sync_status === 1 || st.sync_status === 2) return false
    throw invalid(`${where}: unknown sync_status ${show(st.sync_status)} (0 in sync, 1 syncing, 2 out of sync)`)
  }
  throw invalid(`${where}: state has neither 'synced' nor 'sync_status'`)
}

/**
 * Imports the seed's JSON (`"synced": true`) or the later spelling
 * (`"sync_status": 0|1|2`, `used_size`, `hypervisors`).
 */
export function importPerBlock (doc: unknown, defaultPort: number): ImageMeta {
  if (!isObject(doc)) throw invalid('metadata must be a JSON object with name, size, block_size and blocks')
  checkKeys(doc, ['name', 'size', 'block_size', 'used_size', 'hypervisors', 'blocks'], 'metadata')
  const name = nameOf(doc)
  for (const key of ['size', 'block_size'] as const) {
    const v = doc[key]
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) {
      throw invalid(`image '${name}': '${key}' must be a positive integer, got ${show(v)}`, { key })
    }
  }
  const size = doc.size as number
  const blockSize = doc.block_size as number
  if (!Array.isArray(doc.blocks)) throw invalid(`image '${name}': 'blocks' must be a list with one entry per block`, { key: 'blocks' })
  const expected = Math.ceil(size / blockSize)
  if (doc.blocks.length !== expected) {
    throw invalid(`image '${name}': 'blocks' has ${doc.blocks.length} entries but size ${size} / block_size ${blockSize} needs ${expected}`, { key: 'blocks' })
  }
  const locations = new Map<string, LocationState>()
  doc.blocks.forEach((entry: unknown, index: number) => {
    const where = `image '${name}' block ${index}`
    if (!isObject(entry)) throw invalid(`${where}: must be an object mapping locations to states`, { block: index })
    const locs = Object.keys(entry)
    if (locs.length === 0) throw invalid(`${where}: has no location`, { block: index })
    for (const loc of locs) {
      const inSync = decodeReplicaState(entry[loc], `${where} location ${loc}`)
      let st = locations.get(loc)
      if (st === undefined) {
        st = emptyLocation()
        locations.set(loc, st)
      }
      st.blocks.add(index, index + 1)
      if (!inSync) st.outOfSync.add(index, index + 1)
    }
  })
  const used = doc.used_size ?? size
  const meta = new ImageMeta({
    name,
    size,
    blockSize,
    usedSize: used as number,
    hypervisors: decodeHypervisors(doc.hypervisors, name),
    locations
  })
  return validateImage(meta, defaultPort)
}

/**
 * Blocks beyond which an image has no per-block document (one entry per
 * block: 2^20 blocks are tens of MiB of JSON); the stored format, which
 * keeps ranges, describes any image.
 */
export const MAX_PER_BLOCK_EXPORT = 2 ** 20

/** Exports the per-block JSON: 'seed' ({"synced": bool}) or 'ukai' (sync_status, used_size, hypervisors). */
export function exportPerBlock (meta: ImageMeta, format: ExportFormat): Record<string, unknown> {
  if (meta.blockCount > MAX_PER_BLOCK_EXPORT) {
    throw new UkaiError('UKAI_ERR_TOO_BIG',
      `image '${meta.name}' has ${meta.blockCount} blocks; the '${format}' format lists every block and is limited to ${MAX_PER_BLOCK_EXPORT} (use the stored format)`,
      { image: meta.name, blocks: meta.blockCount })
  }
  const blocks: Array<Record<string, unknown>> = []
  for (let i = 0; i < meta.blockCount; i++) {
    const entry: Record<string, unknown> = {}
    for (const { location, inSync } of meta.replicasOf(i)) {
      entry[location] = format === 'seed' ? { synced: inSync } : { sync_status: inSync ? 0 : 2 }
    }
    blocks.push(entry)
  }
  if (format === 'seed') {
    return { name: meta.name, size: meta.size, block_size: meta.blockSize, blocks }
  }
  return {
    name: meta.name,
    size: meta.size,
    block_size: meta.blockSize,
    used_size: meta.usedSize,
    hypervisors: meta.hypervisors.slice(),
    blocks
  }
}

/** Accepts any of the three formats: stored (has "format"), or per-block. */
export function importAny (doc: unknown, defaultPort: number): ImageMeta {
  if (isObject(doc) && 'format' in doc) return decodeStored(doc, defaultPort)
  return importPerBlock(doc, defaultPort)
}
