/**
 * UkaiNode: everything one `ukai server` process holds. The metadata
 * store, this node's block store, the node error state, the open volumes
 * (one per image, shared by the FUSE mount and the NBD export), and a
 * cache of image metadata kept current by the store's watch.
 */
import { EventEmitter } from 'node:events'
import { mkdir, statfs } from 'node:fs/promises'
import { BlockStore } from '../blockstore/block-store.js'
import { isLocalLocation, type Config } from '../config/config.js'
import { UkaiError, imageNotFound } from '../errors.js'
import { FileMetadataStore } from '../metadata/file-store.js'
import type { ImageMeta } from '../metadata/image.js'
import type { MetadataStore } from '../metadata/store.js'
import { parseLocation } from '../metadata/names.js'
import { RemoteReplica } from '../peer/remote-replica.js'
import { LocalReplica, type Replica, type ReplicaProvider } from '../replica/replica.js'
import { NodeErrors } from '../volume/node-errors.js'
import { Volume, newIoStats, type IoStats, type SyncProgress } from '../volume/volume.js'
import { ImageService } from './images.js'

export interface Capacity { total: number, free: number, available: number }

export async function openStore (config: Config): Promise<MetadataStore> {
  return await FileMetadataStore.open(config.metadata_root, config.proxy_port)
}

export class UkaiNode extends EventEmitter implements ReplicaProvider {
  readonly config: Config
  readonly store: MetadataStore
  readonly blocks: BlockStore
  readonly errors: NodeErrors
  readonly images: ImageService
  private readonly local: LocalReplica
  private readonly known = new Map<string, { meta: ImageMeta, seen: Date }>()
  private readonly volumes = new Map<string, { volume: Volume, refs: number, ready: Promise<number> }>()
  private readonly ioStats = new Map<string, IoStats>()
  /** Replica per location, this node's own included. */
  private readonly remotes = new Map<string, Replica>()
  private unwatch: (() => void) | undefined
  private closed = false

  private constructor (config: Config, store: MetadataStore) {
    super()
    this.config = config
    this.store = store
    this.blocks = new BlockStore(config.image_root, config.blockname_format)
    this.errors = new NodeErrors(config.retry_after)
    this.images = new ImageService(config, store, this.blocks, (m) => this.emit('warning', m))
    this.local = new LocalReplica(config.id, this.blocks)
  }

  static async start (config: Config): Promise<UkaiNode> {
    await mkdir(config.image_root, { recursive: true })
    const store = await openStore(config)
    const node = new UkaiNode(config, store)
    node.unwatch = store.watch((name) => { void node.reload(name) })
    for (const name of await store.list()) await node.reload(name)
    return node
  }

  // ReplicaProvider: this node's own location is served from its block
  // files; every other location through the peer protocol (NBD to its
  // proxy port), one RemoteReplica per node with pooled connections.
  replicaFor (location: string): Replica | undefined {
    // Called for every piece of every I/O: answered from a cache.
    const r = this.remotes.get(location)
    if (r !== undefined) return r
    if (isLocalLocation(this.config, location)) {
      this.remotes.set(location, this.local)
      return this.local
    }
    let target
    try {
      target = parseLocation(location, this.config.proxy_port)
    } catch { return undefined }
    const remote = new RemoteReplica(location, { host: target.host.replace(/^\[(.*)\]$/, '$1'), port: target.port }, {
      timeoutMs: this.config.io_timeout * 1000,
      blockSizeOf: (image) => this.imageMeta(image)?.blockSize
    })
    this.remotes.set(location, remote)
    return remote
  }

  /** Names of the images this node knows, sorted. */
  imageNames (): string[] {
    return [...this.known.keys()].sort()
  }

  /** Current metadata of an image (the open volume's, when open). */
  imageMeta (name: string): ImageMeta | undefined {
    return this.volumes.get(name)?.volume.meta ?? this.known.get(name)?.meta
  }

  /** When this node first saw the image (a stable mtime for the mount). */
  imageSeen (name: string): Date | undefined {
    return this.known.get(name)?.seen
  }

  /** Re-reads one image's metadata from the store after a change. */
  async reload (name: string): Promise<void> {
    if (this.closed) return
    let meta: ImageMeta | undefined
    try {
      meta = await this.store.get(name)
    } catch (err) {
      this.emit('warning', `metadata of image '${name}' could not be read: ${(err as Error).message}`)
      return
    }
    const had = this.known.get(name)
    if (meta === undefined) {
      if (had !== undefined) {
        this.known.delete(name)
        this.ioStats.delete(name)
        this.emit('images')
        // Destroyed by another node: this node's replica goes too.
        if ([...had.meta.locations.keys()].some((l) => isLocalLocation(this.config, l)) && !this.isOpen(name)) {
          await this.blocks.destroy(name).catch((err) => this.emit('warning', `removing the block files of destroyed image '${name}': ${(err as Error).message}`))
        }
        for (const r of this.remotes.values()) if (r instanceof RemoteReplica) await r.closeImage(name)
      }
      return
    }
    if (had !== undefined && had.meta.generation > meta.generation) return
    this.known.set(name, { meta, seen: had?.seen ?? new Date() })
    this.volumes.get(name)?.volume.refresh(meta)
    if (had === undefined) this.emit('images')
  }

  /** The shared volume of an image; each call must be paired with releaseVolume. */
  async acquireVolume (name: string): Promise<Volume> {
    const open = this.volumes.get(name)
    if (open !== undefined) {
      open.refs++
      // Another opener may still be reconciling the image.
      await open.ready.catch(() => {})
      return open.volume
    }
    const meta = await this.store.get(name)
    if (meta === undefined) throw imageNotFound(name)
    const again = this.volumes.get(name)
    if (again !== undefined) {
      again.refs++
      await again.ready.catch(() => {})
      return again.volume
    }
    let stats = this.ioStats.get(name)
    if (stats === undefined) { stats = newIoStats(); this.ioStats.set(name, stats) }
    const volume = new Volume(meta, { store: this.store, replicas: this, errors: this.errors, stats })
    const entry = { volume, refs: 1, ready: volume.reconcile() }
    this.volumes.set(name, entry)
    try {
      const n = await entry.ready
      if (n > 0) this.emit('warning', `image '${name}': reconciled ${n} block(s) left dirty by a writer that stopped`)
    } catch (err) {
      this.volumes.delete(name)
      throw err
    }
    return volume
  }

  async releaseVolume (volume: Volume): Promise<void> {
    const open = this.volumes.get(volume.name)
    if (open === undefined || open.volume !== volume) return
    if (--open.refs > 0) return
    this.volumes.delete(volume.name)
    await volume.flush().catch(() => {})
    // Everything is flushed and nothing is in flight: the log can go.
    await volume.trimDirtyLog().catch(() => {})
    await this.blocks.closeImage(volume.name).catch(() => {})
  }

  /** I/O counters of an image since this node started (zeros when never opened). */
  stats (name: string): IoStats {
    return this.ioStats.get(name) ?? newIoStats()
  }

  isOpen (name: string): boolean {
    return (this.volumes.get(name)?.volume.openCount ?? 0) > 0
  }

  openVolumes (): Volume[] {
    return [...this.volumes.values()].map((v) => v.volume)
  }

  async createImage (req: unknown): Promise<ImageMeta> {
    const meta = await this.images.create(req)
    await this.reload(meta.name)
    return meta
  }

  async importImage (doc: unknown): Promise<ImageMeta> {
    const meta = await this.images.importMetadata(doc)
    await this.reload(meta.name)
    return meta
  }

  async destroyImage (name: string): Promise<void> {
    if (this.isOpen(name)) {
      throw new UkaiError('UKAI_ERR_BUSY', `image '${name}' is open; stop its users before destroying it`, { image: name })
    }
    await this.images.destroy(name)
    await this.reload(name)
  }

  /**
   * Re-synchronises blocks [start, end) of an image (all when absent):
   * every out-of-sync replica is copied from an in-sync one.
   */
  async syncImage (name: string, start?: number, end?: number, onProgress?: (p: SyncProgress) => void): Promise<SyncProgress> {
    const volume = await this.acquireVolume(name)
    try {
      return await volume.sync(start ?? 0, end ?? volume.meta.blockCount, onProgress)
    } finally {
      await this.releaseVolume(volume)
    }
  }

  async capacity (): Promise<Capacity> {
    const st = await statfs(this.config.image_root)
    return { total: st.blocks * st.bsize, free: st.bfree * st.bsize, available: st.bavail * st.bsize }
  }

  async close (): Promise<void> {
    if (this.closed) return
    this.closed = true
    this.unwatch?.()
    for (const { volume } of this.volumes.values()) {
      await volume.flush().catch(() => {})
      await volume.trimDirtyLog().catch(() => {})
    }
    this.volumes.clear()
    for (const r of this.remotes.values()) if (r instanceof RemoteReplica) await r.close()
    await this.blocks.close()
    await this.store.close()
  }
}
