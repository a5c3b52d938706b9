/**
 * Image lifecycle: create, import, list, describe, destroy. Used by the
 * running node (behind the control API) and by the CLI when no node is
 * running, so both paths apply the same rules.
 */
import { UkaiError, invalidArgument } from '../errors.js'
import type { BlockStore, Incarnation } from '../blockstore/block-store.js'
import { isLocalLocation, type Config } from '../config/config.js'
import { exportPerBlock, importAny, encodeStored, type ExportFormat } from '../metadata/codec.js'
import { RangeSet } from '../metadata/range-set.js'
import { ImageMeta, MIN_BLOCK_SIZE, validateImage, validateImported } from '../metadata/image.js'
import { validateImageName, validateLocation } from '../metadata/names.js'
import type { ImageState, MetadataStore } from '../metadata/store.js'
import { NodeDirectory } from './directory.js'
import { show } from '../util/show.js'

export interface CreateImageRequest {
  name: string
  size: number
  /** Bytes; the config's default_block_size (capped at size) when absent. */
  block_size?: number
  /** Where every block goes; this node when absent. */
  locations?: string[]
  hypervisors?: string[]
}

export interface ImageSummary {
  name: string
  size: number
  block_size: number
  used_size: number
  blocks: number
  locations: string[]
  hypervisors: string[]
  /** Block replicas out of sync, all locations together. */
  out_of_sync: number
}

export function summarise (meta: ImageMeta): ImageSummary {
  let outOfSync = 0
  for (const st of meta.locations.values()) outOfSync += st.outOfSync.size
  return {
    name: meta.name,
    size: meta.size,
    block_size: meta.blockSize,
    used_size: meta.usedSize,
    blocks: meta.blockCount,
    locations: [...meta.locations.keys()],
    hypervisors: meta.hypervisors.slice(),
    out_of_sync: outOfSync
  }
}

export type InfoFormat = 'stored' | ExportFormat

export function describe (meta: ImageMeta, format: InfoFormat): unknown {
  return format === 'stored' ? encodeStored(meta) : exportPerBlock(meta, format)
}

/** What `image info` shows: the summary, the stored metadata, who has the image open and who writes it. */
export function describeState (st: ImageState): Record<string, unknown> {
  return {
    ...summarise(st.meta),
    ...describe(st.meta, 'stored') as object,
    incarnation: st.incarnation,
    created: st.created,
    open: st.opens.map((o) => ({ node: o.node, readers: o.readers, writers: o.writers, since: o.since })),
    writer: st.writer === undefined ? null : { node: st.writer.node, generation: st.writer.generation, purpose: st.writer.purpose, since: st.writer.since },
    writer_generation: st.generation,
    dirty_blocks: st.dirty.size,
    /** The dirty-block log's blocks, [start, end) ranges. */
    dirty: st.dirty.toJSON()
  }
}

/**
 * The blocks [s, e) that removing location `loc`'s blocks [start, end)
 * of `meta` takes away; refused where a block would be left without an
 * in-sync replica, or when the image has no such location.
 */
export function checkRemoval (meta: ImageMeta, loc: string, start?: number, end?: number): [number, number] {
  const [s, e] = blockRange(meta, start, end)
  const st = meta.locations.get(loc)
  if (st === undefined) throw invalidArgument(`image '${meta.name}' has no location ${loc}`, { location: loc })
  // What only this location holds in sync (range by range: an image may have 2^28 blocks).
  const alone = new RangeSet(st.blocks.within(s, e))
  for (const [other, o] of meta.locations) {
    if (other !== loc) alone.removeSet(o.blocks.clone().removeSet(o.outOfSync))
  }
  const b = alone.first
  if (b !== undefined) {
    throw new UkaiError('UKAI_ERR_PERMISSION',
      `removing ${loc} would leave block ${b} of image '${meta.name}' without an in-sync replica; add and sync another location first`,
      { block: b, location: loc })
  }
  return [s, e]
}

export class ImageService {
  readonly config: Config
  readonly store: MetadataStore
  readonly blocks: BlockStore
  readonly directory: NodeDirectory
  /** Where problems that do not fail the operation are reported. */
  private readonly warn: (message: string) => void

  constructor (config: Config, store: MetadataStore, blocks: BlockStore, warn: (message: string) => void = () => {}) {
    this.config = config
    this.store = store
    this.blocks = blocks
    this.directory = new NodeDirectory(config, store)
    this.warn = warn
  }

  /** Validates a create request from any source (CLI, API body). */
  buildImage (req: unknown): ImageMeta {
    if (typeof req !== 'object' || req === null || Array.isArray(req)) throw invalidArgument('create request must be an object')
    const r = req as Record<string, unknown>
    for (const k of Object.keys(r)) {
      if (!['name', 'size', 'block_size', 'locations', 'hypervisors'].includes(k)) throw invalidArgument(`unknown field '${k}'`, { key: k })
    }
    const name = validateImageName(r.name)
    const size = r.size
    if (typeof size !== 'number' || !Number.isSafeInteger(size) || size <= 0) {
      throw invalidArgument(`size must be a positive integer number of bytes, got ${show(size)}`, { key: 'size' })
    }
    let blockSize = r.block_size
    if (blockSize === undefined) {
      // The default, halved until it fits a small image.
      blockSize = this.config.default_block_size
      while ((blockSize as number) > size && (blockSize as number) > MIN_BLOCK_SIZE) blockSize = (blockSize as number) / 2
    }
    if (typeof blockSize !== 'number' || !Number.isSafeInteger(blockSize) || blockSize <= 0) {
      throw invalidArgument(`block_size must be a positive integer number of bytes, got ${show(blockSize)}`, { key: 'block_size' })
    }
    if (blockSize > size) throw invalidArgument(`block_size ${blockSize} is larger than size ${size}`, { key: 'block_size' })
    if (blockSize < MIN_BLOCK_SIZE || !Number.isInteger(Math.log2(blockSize)) || blockSize > 2 ** 30) {
      throw invalidArgument(`block_size ${blockSize} must be a power of two from ${MIN_BLOCK_SIZE} (4K) to 1G`, { key: 'block_size' })
    }
    const list = (v: unknown, key: string, dflt: string[]): string[] => {
      if (v === undefined) return dflt
      if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) throw invalidArgument(`${key} must be a list of node addresses`, { key })
      for (const x of v) validateLocation(x, this.config.proxy_port)
      return [...new Set(v as string[])]
    }
    const locations = list(r.locations, 'locations', [this.config.id])
    if (locations.length === 0) throw invalidArgument('an image needs at least one location', { key: 'locations' })
    const meta = new ImageMeta({ name, size, blockSize, hypervisors: list(r.hypervisors, 'hypervisors', []) })
    // A new image reads as zeros everywhere, so every replica starts in sync.
    for (const loc of locations) meta.addLocation(loc, 0, meta.blockCount, true)
    return validateImage(meta, this.config.proxy_port)
  }

  async create (req: unknown): Promise<ImageMeta> {
    const meta = this.buildImage(req)
    // The name is claimed in the store before any block directory is made,
    // so a losing creator never touches the winner's data.
    const stored = await this.store.create(meta)
    try {
      await this.allocateLocal(stored, false)
    } catch (err) {
      await this.store.delete(meta.name).catch(() => {})
      throw err
    }
    return stored
  }

  /** The seed's way: metadata for block files that may already exist. */
  async importMetadata (doc: unknown): Promise<ImageMeta> {
    const meta = validateImported(importAny(doc, this.config.proxy_port))
    const stored = await this.store.create(meta)
    // The block files here are taken as this image's, whatever they were.
    await this.allocateLocal(stored, true)
    return stored
  }

  /**
   * Allocates the image's replicas: here directly, bound to the image's
   * incarnation (`adopt`: with the files already there), on other nodes
   * over their control API.
   */
  private async allocateLocal (meta: ImageMeta, adopt: boolean): Promise<void> {
    const st = await this.store.requireState(meta.name)
    for (const loc of meta.locations.keys()) {
      if (isLocalLocation(this.config, loc)) await this.bindLocal(meta.name, incarnationOf(st), adopt)
      else {
        const warning = await this.directory.replicaCall(loc, 'POST', meta.name)
        if (warning !== undefined) this.warn(warning)
      }
    }
  }

  /**
   * Allocates this node's replica of an image whose metadata places one
   * here (a call from the node that created or extended the image).
   */
  async allocateReplica (name: string): Promise<void> {
    const st = await this.store.requireState(validateImageName(name))
    if (![...st.meta.locations.keys()].some((l) => isLocalLocation(this.config, l))) {
      throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', `image '${name}' places no block on this node (${this.config.id})`)
    }
    await this.bindLocal(name, incarnationOf(st), false)
  }

  /**
   * This node's replica of an image, bound to its incarnation (block
   * store `bind`): block files of an earlier image of the same name go
   * first, and the operator is told.
   */
  async bindLocal (name: string, incarnation: Incarnation, adopt: boolean): Promise<void> {
    if (await this.blocks.bind(name, incarnation, { adopt }) === 'wiped') {
      this.warn(`image '${name}': this node held block files of an earlier image of that name (destroyed while the node was away); they were removed`)
    }
  }

  /** Removes this node's block files of an image that no longer places blocks here. */
  async destroyReplica (name: string): Promise<void> {
    const meta = await this.store.get(validateImageName(name))
    if (meta !== undefined && [...meta.locations.keys()].some((l) => isLocalLocation(this.config, l))) {
      throw new UkaiError('UKAI_ERR_BUSY', `image '${name}' still places blocks on this node; remove the location or destroy the image first`)
    }
    await this.blocks.destroy(name)
  }

  /**
   * Places blocks [start, end) of an image on another location too. The
   * new replicas start out of sync; `ukai sync` fills them (while the image
   * is in use), which is how an image's blocks move to the nodes near its VM.
   */
  async addLocation (name: string, location: unknown, start?: number, end?: number): Promise<ImageMeta> {
    const loc = validateLocation(location, this.config.proxy_port)
    const updated = await this.store.update(validateImageName(name), (meta) => {
      const [s, e] = blockRange(meta, start, end)
      meta.addLocation(loc, s, e, false)
      return meta
    })
    if (isLocalLocation(this.config, loc)) await this.bindLocal(name, incarnationOf(await this.store.requireState(name)), false)
    else {
      const warning = await this.directory.replicaCall(loc, 'POST', name)
      if (warning !== undefined) this.warn(warning)
    }
    return updated
  }

  /**
   * Removes blocks [start, end) from a location. Refused, changing
   * nothing, where a block would be left with no in-sync replica, and
   * while another node of that location has the image open (its users
   * read from the replica being removed, and would read it stale between
   * the writer's applying the removal and their own): UkaiNode.removeLocation
   * asks that node to remove it itself. This node's own location may go
   * while the image is open here: its reads leave the replica before the
   * removal is stored (UkaiNode.removeLocation, Volume.leave).
   */
  async removeLocation (name: string, location: unknown, start?: number, end?: number): Promise<ImageMeta> {
    const loc = validateLocation(location, this.config.proxy_port)
    return await this.store.update(validateImageName(name), (meta) => {
      const [s, e] = checkRemoval(meta, loc, start, end)
      const st = meta.locations.get(loc)!
      meta.removeBlocks(loc, s, e)
      if (st.blocks.isEmpty) meta.locations.delete(loc)
      return meta
    }, { notOpenOn: isLocalLocation(this.config, loc) ? undefined : loc })
  }

  async setHypervisor (name: string, hypervisor: unknown, present: boolean): Promise<ImageMeta> {
    const hv = validateLocation(hypervisor, this.config.proxy_port)
    return await this.store.update(validateImageName(name), (meta) => {
      const has = meta.hypervisors.includes(hv)
      if (present && !has) meta.hypervisors.push(hv)
      if (!present) {
        if (!has) throw invalidArgument(`image '${name}' has no hypervisor ${hv}`)
        meta.hypervisors = meta.hypervisors.filter((h) => h !== hv)
      }
      return meta
    })
  }

  async list (): Promise<ImageSummary[]> {
    const out: ImageSummary[] = []
    for (const name of await this.store.list()) {
      const meta = await this.store.get(name).catch(() => undefined)
      if (meta !== undefined) out.push(summarise(meta))
    }
    return out
  }

  async info (name: string): Promise<ImageMeta> {
    return await this.store.require(validateImageName(name))
  }

  async state (name: string): Promise<ImageState> {
    return await this.store.requireState(validateImageName(name))
  }

  /**
   * Removes the metadata, then this node's block files and the other
   * nodes' replicas. Refused (UKAI_ERR_BUSY) while any node has the image
   * open: the metadata store knows who does, whichever node asks.
   */
  async destroy (name: string): Promise<void> {
    const meta = await this.store.require(validateImageName(name))
    await this.store.delete(name)
    const local = [...meta.locations.keys()].some((l) => isLocalLocation(this.config, l))
    if (local || await this.blocks.has(name)) await this.blocks.destroy(name)
    for (const loc of meta.locations.keys()) {
      if (isLocalLocation(this.config, loc)) continue
      const warning = await this.directory.replicaCall(loc, 'DELETE', name)
      if (warning !== undefined) this.warn(warning)
    }
  }
}

/** The incarnation of an image as the store gives it (block-store.ts `bind`). */
export function incarnationOf (st: { incarnation: string, headerCreate: number }): Incarnation {
  return { id: st.incarnation, created: st.headerCreate }
}

/** Blocks [start, end) of an image; the whole image when both are absent. */
function blockRange (meta: ImageMeta, start?: number, end?: number): [number, number] {
  const s = start ?? 0
  const e = end ?? meta.blockCount
  if (!Number.isSafeInteger(s) || !Number.isSafeInteger(e) || s < 0 || e > meta.blockCount || s >= e) {
    throw new UkaiError('UKAI_ERR_OUT_OF_RANGE', `block range ${s}..${e - 1} is not within image '${meta.name}' (blocks 0..${meta.blockCount - 1})`)
  }
  return [s, e]
}

export function parseInfoFormat (v: unknown): InfoFormat {
  if (v === undefined) return 'stored'
  if (v === 'stored' || v === 'seed' || v === 'ukai') return v
  throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', `unknown format ${show(v)} (stored, seed or ukai)`)
}
