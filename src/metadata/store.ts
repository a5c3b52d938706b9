/**
 * MetadataStore: where image metadata lives. Backends implement the
 * protected `_list/_get/_write/_delete/_watch` operations; the public
 * methods validate names and metadata first and serialise updates of one
 * image, so every backend behaves the same (checked by the conformance
 * suite in store.conformance.ts that each backend runs).
 */
import { UkaiError, imageNotFound } from '../errors.js'
import { ImageMeta, validateImage } from './image.js'
import { validateImageName } from './names.js'
import type { RangeSet } from './range-set.js'

export type WatchListener = (name: string) => void

/**
 * A running node as it registers itself: its id (the address locations
 * name it by) and where its control API listens, so other nodes can ask it
 * to allocate or destroy replicas, for its capacity and for an RTT probe.
 */
export interface NodeRecord {
  id: string
  control_address: string
  control_port: number
  /** ISO time of the node's last start. */
  started: string
}

function validateNodeRecord (r: NodeRecord): NodeRecord {
  if (typeof r.id !== 'string' || !/^[A-Za-z0-9.:_[\]-]{1,300}$/.test(r.id) || typeof r.control_address !== 'string' ||
    !Number.isInteger(r.control_port) || r.control_port < 1 || r.control_port > 65535 || typeof r.started !== 'string') {
    throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', `invalid node record ${JSON.stringify(r)}`)
  }
  return r
}

export abstract class MetadataStore {
  abstract readonly kind: string
  protected readonly defaultPort: number
  private readonly queues = new Map<string, Promise<unknown>>()

  constructor (defaultPort: number) {
    this.defaultPort = defaultPort
  }

  protected abstract _list (): Promise<string[]>
  protected abstract _get (name: string): Promise<ImageMeta | undefined>
  /** Stores `meta` atomically; `create` fails with UKAI_ERR_EXISTS if the image exists. */
  protected abstract _write (meta: ImageMeta, create: boolean): Promise<void>
  protected abstract _delete (name: string): Promise<boolean>
  protected abstract _watch (listener: WatchListener): () => void
  /** The image's dirty-block log (empty when none was stored). */
  protected abstract _getDirty (name: string): Promise<RangeSet>
  /** Replaces the dirty-block log durably; an empty set may remove it. */
  protected abstract _putDirty (name: string, blocks: RangeSet): Promise<void>
  /** Stores (replaces) one node's registration. */
  protected abstract _putNode (node: NodeRecord): Promise<void>
  protected abstract _listNodes (): Promise<NodeRecord[]>
  abstract close (): Promise<void>

  /**
   * Runs a read-modify-write of one image exclusively against other
   * processes using the same store (another node sharing the directory,
   * the offline CLI). Backends without such writers need not override it.
   */
  protected async _exclusive<T> (_name: string, fn: () => Promise<T>): Promise<T> {
    return await fn()
  }

  async list (): Promise<string[]> {
    return (await this._list()).sort()
  }

  async get (name: string): Promise<ImageMeta | undefined> {
    return await this._get(validateImageName(name))
  }

  async require (name: string): Promise<ImageMeta> {
    const meta = await this.get(name)
    if (meta === undefined) throw imageNotFound(name)
    return meta
  }

  /** Stores a new image; fails with UKAI_ERR_EXISTS when the name is taken. */
  async create (meta: ImageMeta): Promise<ImageMeta> {
    validateImage(meta, this.defaultPort)
    return await this.serial(meta.name, async () => {
      const stored = meta.clone()
      stored.generation = 1
      await this._write(stored, true)
      return stored
    })
  }

  /**
   * Read-modify-write of one image: `change` gets a private copy and
   * returns it (or another ImageMeta) to store. Updates of one image in
   * this process never interleave. The result is validated before it is
   * written, so a bad change leaves the stored metadata as it was.
   */
  async update (name: string, change: (meta: ImageMeta) => ImageMeta | Promise<ImageMeta>): Promise<ImageMeta> {
    validateImageName(name)
    return await this.serial(name, async () => await this._exclusive(name, async () => {
      const current = await this._get(name)
      if (current === undefined) throw imageNotFound(name)
      const next = await change(current.clone())
      if (next.name !== name) throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', 'an update may not rename an image')
      validateImage(next, this.defaultPort)
      next.generation = current.generation + 1
      await this._write(next, false)
      return next
    }))
  }

  async delete (name: string): Promise<void> {
    validateImageName(name)
    await this.serial(name, async () => await this._exclusive(name, async () => {
      if (!await this._delete(name)) throw imageNotFound(name)
    }))
  }

  /**
   * The dirty-block log of an image: blocks a writer may have left
   * different on its in-sync replicas (a write in flight when it died).
   * Durable before the writes it covers start; read when the image is
   * next opened (DESIGN.md invariant 4).
   */
  async getDirty (name: string): Promise<RangeSet> {
    return await this._getDirty(validateImageName(name))
  }

  async putDirty (name: string, blocks: RangeSet): Promise<void> {
    await this._putDirty(validateImageName(name), blocks)
  }

  /** Registers (or re-registers) a node. */
  async putNode (node: NodeRecord): Promise<void> {
    await this._putNode(validateNodeRecord(node))
  }

  /** Every registered node, sorted by id; malformed records are skipped. */
  async listNodes (): Promise<NodeRecord[]> {
    const out: NodeRecord[] = []
    for (const r of await this._listNodes()) {
      try { out.push(validateNodeRecord(r)) } catch {}
    }
    return out.sort((a, b) => a.id.localeCompare(b.id))
  }

  /** Calls `listener(name)` after any image is created, changed or deleted, by any process. */
  watch (listener: WatchListener): () => void {
    return this._watch(listener)
  }

  private async serial<T> (name: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.queues.get(name) ?? Promise.resolve()
    const run = prev.then(fn, fn)
    const tail = run.catch(() => {})
    this.queues.set(name, tail)
    void tail.then(() => { if (this.queues.get(name) === tail) this.queues.delete(name) })
    return await run
  }
}
