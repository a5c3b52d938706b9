/**
 * The image model. An image has a name, a size, a block size, a used size
 * (the file length the hypervisor sees, <= size), the hypervisors allowed
 * to run it, and for each location (node address) the blocks it holds and
 * which of those are out of sync. Placement and sync state are range sets,
 * so the model's size follows the number of placement decisions, not the
 * number of blocks.
 */
import { UkaiError } from '../errors.js'
import { validateImageName, validateLocation } from './names.js'
import { RangeSet, type Range } from './range-set.js'
import { show } from '../util/show.js'

export interface LocationState {
  /** Blocks this location holds a replica of. */
  blocks: RangeSet
  /** Blocks (a subset of `blocks`) whose replica here is out of sync. */
  outOfSync: RangeSet
  /**
   * Out-of-sync blocks (a subset of `outOfSync`) with a fine record: the
   * replica here differs from the in-sync ones only in the granules of
   * `changed`, so a resync copies those alone. An out-of-sync block
   * without one is copied whole.
   */
  fine: RangeSet
  /** Granules (GRANULE bytes of the image each) of `fine` blocks that changed. */
  changed: RangeSet
}

/** Bytes per granule of a fine record: what one resync copy covers at least. */
export const GRANULE = 4096

/** Most ranges of changed granules one location keeps; past it, blocks fall back to whole copies. */
export const MAX_CHANGED_RANGES = 16384

/** The granules [first, end) that bytes [start, end) of the image touch. */
export function granulesOf (start: number, end: number): Range {
  return [Math.floor(start / GRANULE), Math.ceil(end / GRANULE)]
}

export function emptyLocation (): LocationState {
  return { blocks: new RangeSet(), outOfSync: new RangeSet(), fine: new RangeSet(), changed: new RangeSet() }
}

export interface ReplicaState {
  location: string
  inSync: boolean
}

export class ImageMeta {
  name: string
  size: number
  blockSize: number
  usedSize: number
  hypervisors: string[]
  locations: Map<string, LocationState>
  /**
   * The metadata store's revision this copy was read at (or written
   * with): a copy with a higher revision is never older, so nodes drop
   * stale copies. 0 for metadata not from a store.
   */
  revision: number

  constructor (init: {
    name: string
    size: number
    blockSize: number
    usedSize?: number
    hypervisors?: string[]
    locations?: Map<string, LocationState>
    revision?: number
  }) {
    this.name = init.name
    this.size = init.size
    this.blockSize = init.blockSize
    this.usedSize = init.usedSize ?? init.size
    this.hypervisors = init.hypervisors ?? []
    this.locations = init.locations ?? new Map()
    this.revision = init.revision ?? 0
  }

  get blockCount (): number { return Math.ceil(this.size / this.blockSize) }

  /** Length in bytes of block `index` (the last one may be shorter). */
  blockLength (index: number): number {
    return Math.min(this.blockSize, this.size - index * this.blockSize)
  }

  /** The replicas of one block, in the order the locations were added. */
  replicasOf (block: number): ReplicaState[] {
    const out: ReplicaState[] = []
    for (const [location, st] of this.locations) {
      if (st.blocks.has(block)) out.push({ location, inSync: !st.outOfSync.has(block) })
    }
    return out
  }

  clone (): ImageMeta {
    const locations = new Map<string, LocationState>()
    for (const [loc, st] of this.locations) {
      locations.set(loc, { blocks: st.blocks.clone(), outOfSync: st.outOfSync.clone(), fine: st.fine.clone(), changed: st.changed.clone() })
    }
    return new ImageMeta({
      name: this.name,
      size: this.size,
      blockSize: this.blockSize,
      usedSize: this.usedSize,
      hypervisors: this.hypervisors.slice(),
      locations,
      revision: this.revision
    })
  }

  /** Adds `location` for blocks [start, end); new replicas start out of sync unless `inSync`. */
  addLocation (location: string, start: number, end: number, inSync: boolean): void {
    let st = this.locations.get(location)
    if (st === undefined) {
      st = emptyLocation()
      this.locations.set(location, st)
    }
    // Blocks already held keep their state; only the new ones get `inSync`.
    const fresh = RangeSet.of(start, end).removeSet(st.blocks)
    st.blocks.add(start, end)
    if (!inSync) st.outOfSync.addSet(fresh)
  }

  setSync (location: string, start: number, end: number, inSync: boolean): void {
    const st = this.locations.get(location)
    if (st === undefined) return
    if (inSync) {
      st.outOfSync.remove(start, end)
      this.dropFine(location, start, end)
    } else {
      for (const [s, e] of st.blocks.within(start, end)) st.outOfSync.add(s, e)
    }
  }

  /** True when fine records can be kept for this image (its blocks are whole granules). */
  get fineGrained (): boolean { return this.blockSize % GRANULE === 0 }

  /** The granules of block `block`. */
  blockGranules (block: number): Range {
    return granulesOf(block * this.blockSize, block * this.blockSize + this.blockLength(block))
  }

  /**
   * Marks `block` out of sync at `location` after a write it missed. With
   * `changed` (the granules it may differ in) a block that was in sync
   * gets a fine record of them, and one with a fine record already gets
   * them added; without, the block is copied whole when resynced.
   */
  markOutOfSync (location: string, block: number, changed: RangeSet | undefined): void {
    const st = this.locations.get(location)
    if (st === undefined || !st.blocks.has(block)) return
    const wasInSync = !st.outOfSync.has(block)
    st.outOfSync.add(block, block + 1)
    if (changed === undefined || !this.fineGrained || (!wasInSync && !st.fine.has(block))) {
      this.dropFine(location, block, block + 1)
      return
    }
    st.fine.add(block, block + 1)
    this.addChanged(location, changed)
  }

  /**
   * Adds granules that changed to the fine records of `location`; those
   * of blocks without one are dropped (they are copied whole anyway). A
   * location whose record grew past MAX_CHANGED_RANGES has the blocks
   * touched here fall back to whole copies.
   */
  addChanged (location: string, granules: RangeSet): void {
    const st = this.locations.get(location)
    if (st === undefined || st.fine.isEmpty) return
    const touched = new RangeSet()
    const per = this.blockSize / GRANULE
    for (const [s, e] of granules.ranges()) {
      for (const [bs, be] of st.fine.within(Math.floor(s / per), Math.ceil(e / per))) {
        const [g0, g1] = [Math.max(s, bs * per), Math.min(e, be * per)]
        if (g0 >= g1) continue
        st.changed.add(g0, g1)
        touched.add(bs, be)
      }
    }
    if (st.changed.rangeCount > MAX_CHANGED_RANGES) {
      for (const [s, e] of touched.ranges()) this.dropFine(location, s, e)
    }
  }

  /** Blocks [start, end) at `location` (every location without one) lose their fine records: copied whole when resynced. */
  dropFine (location: string | undefined, start: number, end: number): void {
    for (const [loc, st] of this.locations) {
      if (location !== undefined && loc !== location) continue
      if (!st.fine.overlaps(start, end)) continue
      st.fine.remove(start, end)
      const per = this.blockSize / GRANULE
      st.changed.remove(start * per, end * per)
    }
  }

  /**
   * The byte ranges (offsets in the block) that a resync of `block` must
   * copy to `targets`: the changed granules of their fine records, or
   * undefined (the whole block) when one of them has none.
   */
  changedIn (block: number, targets: string[]): RangeSet | undefined {
    const [g0, g1] = this.blockGranules(block)
    const out = new RangeSet()
    for (const t of targets) {
      const st = this.locations.get(t)
      if (st === undefined || !st.fine.has(block)) return undefined
      for (const [s, e] of st.changed.within(g0, g1)) out.add(s, e)
    }
    return out
  }

  /** Removes blocks [start, end) from `location` (placement shrinks). */
  removeBlocks (location: string, start: number, end: number): void {
    const st = this.locations.get(location)
    if (st === undefined) return
    this.dropFine(location, start, end)
    st.blocks.remove(start, end)
    st.outOfSync.remove(start, end)
  }
}

const invalid = (message: string, details?: Record<string, unknown>): UkaiError =>
  new UkaiError('UKAI_ERR_INVALID_METADATA', message, details)

function positiveInteger (v: unknown, key: string, name: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) {
    throw invalid(`image '${name}': '${key}' must be a positive integer, got ${show(v)}`, { key })
  }
  return v
}

/** Largest number of blocks an image may have: keeps seed exports and block names sane. */
export const MAX_BLOCKS = 2 ** 32

/**
 * Smallest block size: a block is a file, and smaller blocks only cost
 * (a 64 KiB write to 1-byte blocks would touch 65,536 files).
 */
export const MIN_BLOCK_SIZE = 4096

/**
 * The rules for an image that comes from outside (an import, the
 * original's metadata): its blocks at least MIN_BLOCK_SIZE (the
 * original's block sizes need not be powers of two: 50,000,000 stays
 * fine), and every block readable, with at least one in-sync replica.
 */
export function validateImported (meta: ImageMeta): ImageMeta {
  if (meta.blockSize < MIN_BLOCK_SIZE) {
    throw invalid(`image '${meta.name}': 'block_size' ${meta.blockSize} is smaller than ${MIN_BLOCK_SIZE}`, { key: 'block_size' })
  }
  for (let b = 0; b < meta.blockCount;) {
    const inSync = meta.replicasOf(b).some((r) => r.inSync)
    if (!inSync) throw invalid(`image '${meta.name}': block ${b} has no in-sync replica: its data is nowhere`, { key: 'blocks', block: b })
    b = nextBoundary(meta, b)
  }
  return meta
}

/** The next block after `b` where some location's state may change (ranges make this fast on large images). */
export function nextBoundary (meta: ImageMeta, b: number): number {
  let next = meta.blockCount
  for (const st of meta.locations.values()) {
    for (const set of [st.blocks, st.outOfSync]) {
      for (const [s, e] of set.ranges()) {
        if (s > b && s < next) next = s
        if (e > b && e < next) next = e
      }
    }
  }
  return next
}

/**
 * Checks every rule of the model; throws UKAI_ERR_INVALID_METADATA with the
 * first broken rule. Called before anything is stored.
 */
export function validateImage (meta: ImageMeta, defaultPort: number): ImageMeta {
  validateImageName(meta.name)
  const name = meta.name
  positiveInteger(meta.size, 'size', name)
  positiveInteger(meta.blockSize, 'block_size', name)
  if (typeof meta.usedSize !== 'number' || !Number.isSafeInteger(meta.usedSize) || meta.usedSize < 0) {
    throw invalid(`image '${name}': 'used_size' must be a non-negative integer, got ${show(meta.usedSize)}`, { key: 'used_size' })
  }
  if (meta.usedSize > meta.size) {
    throw invalid(`image '${name}': 'used_size' ${meta.usedSize} is larger than 'size' ${meta.size}`, { key: 'used_size' })
  }
  if (meta.blockSize > meta.size) {
    throw invalid(`image '${name}': 'block_size' ${meta.blockSize} is larger than 'size' ${meta.size}`, { key: 'block_size' })
  }
  if (meta.blockCount > MAX_BLOCKS) {
    throw invalid(`image '${name}': ${meta.blockCount} blocks is more than ${MAX_BLOCKS}; use a larger block_size`, { key: 'block_size' })
  }
  for (const h of meta.hypervisors) {
    try { validateLocation(h, defaultPort) } catch (err) {
      throw invalid(`image '${name}': hypervisor: ${(err as Error).message}`, { key: 'hypervisors' })
    }
  }
  const count = meta.blockCount
  const placed = new RangeSet()
  for (const [loc, st] of meta.locations) {
    try { validateLocation(loc, defaultPort) } catch (err) {
      throw invalid(`image '${name}': ${(err as Error).message}`, { key: 'locations' })
    }
    if (st.blocks.end !== undefined && st.blocks.end > count) {
      throw invalid(`image '${name}': location ${loc} holds block ${st.blocks.end - 1} but the image has ${count} blocks`, { key: 'locations' })
    }
    for (const [s, e] of st.outOfSync.ranges()) {
      if (!st.blocks.covers(s, e)) {
        throw invalid(`image '${name}': location ${loc} marks blocks [${s}, ${e}) out of sync but does not hold them all`, { key: 'locations' })
      }
    }
    for (const [s, e] of st.fine.ranges()) {
      if (!st.outOfSync.covers(s, e)) {
        throw invalid(`image '${name}': location ${loc} keeps a fine record of blocks [${s}, ${e}) that are not all out of sync`, { key: 'locations' })
      }
    }
    if (!st.fine.isEmpty && !meta.fineGrained) {
      throw invalid(`image '${name}': location ${loc} keeps fine records, but block_size is not a multiple of ${GRANULE}`, { key: 'locations' })
    }
    for (const [s, e] of st.changed.ranges()) {
      const per = meta.blockSize / GRANULE
      if (!st.fine.covers(Math.floor(s / per), Math.ceil(e / per))) {
        throw invalid(`image '${name}': location ${loc} records changed granules [${s}, ${e}) outside its fine records`, { key: 'locations' })
      }
    }
    placed.addSet(st.blocks)
  }
  if (!placed.covers(0, count)) {
    const missing = RangeSet.of(0, count).removeSet(placed).first
    throw invalid(`image '${name}': block ${missing} has no location`, { key: 'blocks', block: missing })
  }
  return meta
}
