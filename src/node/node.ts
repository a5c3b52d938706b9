/**
 * UkaiNode: everything one `ukai server` process holds. The metadata
 * store and this node's membership of the cluster (its lease), this
 * node's block store and fences, the node error state, the open volumes
 * (one per image, shared by the FUSE mount and the NBD export), and a
 * cache of image metadata kept current by the store's watch.
 *
 * The node is also each of its volumes' view of the cluster
 * (ClusterContext): whether a takeover is allowed, fencing the other
 * nodes after one, and pushing a change to every node that has an image
 * open before the change counts.
 */
import { expectNode, loadNodeTls, type NodeTls } from '../tls/identity.js'
import { EventEmitter } from 'node:events'
import { readdir, statfs } from 'node:fs/promises'
import { BlockStore, type Incarnation } from '../blockstore/block-store.js'
import { isLocalLocation, type Config } from '../config/config.js'
import { UkaiError, imageNotFound, toUkaiError } from '../errors.js'
import type { Watcher } from '../metadata/core.js'
import { EtcdCore } from '../metadata/etcd-core.js'
import { FileCore } from '../metadata/file-core.js'
import type { ImageMeta, LocationState } from '../metadata/image.js'
import { migrateV1 } from '../metadata/migrate-v1.js'
import { canonicalLocation, parseLocation, sameLocation, validateImageName, validateLocation } from '../metadata/names.js'
import { RangeSet } from '../metadata/range-set.js'
import { MetadataStore, type ImageState, type MoveIntent, type NodeInfo, type WriterGrant, type WriterRecord } from '../metadata/store.js'
import { moveImage, type MoveProgress, type MoveRequest, type MoveResult } from './move.js'
import { RemoteReplica } from '../peer/remote-replica.js'
import { LocalReplica, type Replica, type ReplicaProvider } from '../replica/replica.js'
import { NodeErrors } from '../volume/node-errors.js'
import { Volume, newIoStats, type ClusterContext, type IoStats, type SyncProgress } from '../volume/volume.js'
import { DataSessions } from './data-sessions.js'
import { FenceTable } from './fences.js'
import { LeavingReplicas } from './leaving.js'
import { isNotRunning } from '../control/client.js'
import { ImageService, checkRemoval, incarnationOf } from './images.js'
import { NodeMembership } from './membership.js'
import { mkdirDurable } from '../util/durable-fs.js'
import { NodeMetrics } from './metrics.js'
import { imageStats, type ImageStats, type SyncStatus } from './stats.js'

export interface Capacity { total: number, free: number, available: number }

/**
 * The metadata store the config names: etcd when metadata_servers is
 * set, else files under metadata_root (whose first layout is migrated
 * unless `migrate` is false: a node migrates only once it may run).
 */
export async function openStore (config: Config, migrate = true): Promise<MetadataStore> {
  if (config.metadata_servers.length > 0) {
    return new MetadataStore(new EtcdCore({ servers: config.metadata_servers, prefix: config.metadata_prefix }), config.proxy_port)
  }
  const store = new MetadataStore(await FileCore.open(config.metadata_root), config.proxy_port)
  if (migrate) await migrateV1(config.metadata_root, store, config.proxy_port)
  return store
}

/** One open of an image on this node (a FUSE file handle, an NBD connection). */
export interface ImageOpen {
  volume: Volume
  write: boolean
  close: () => Promise<void>
}

/** What a node answers when asked to fence an image: the older sessions it had, and what they cannot vouch for. */
export interface FenceReply {
  sessions: Array<{ session: string, unsafe: Array<[number, number]> }>
}

interface Known { meta: ImageMeta, seen: Date, incarnation: string, headerCreate: number }

/** How long after a location lost blocks their files are removed (see scheduleReclaim). */
export const RECLAIM_DELAY_MS = 5000

export class UkaiNode extends EventEmitter implements ReplicaProvider, ClusterContext {
  readonly config: Config
  readonly store: MetadataStore
  readonly membership: NodeMembership
  readonly blocks: BlockStore
  readonly errors: NodeErrors
  readonly fences = new FenceTable()
  /** Ranges of this node's replicas it serves no reads of, ahead of their removal. */
  readonly leaving = new LeavingReplicas()
  readonly images: ImageService
  /** This node's TLS identity (config key tls_dir), undefined when it speaks plain text on loopback. */
  readonly tls: NodeTls | undefined
  /** Images kept open for control API clients that move their data (import, export). */
  readonly dataSessions: DataSessions
  private readonly local: LocalReplica
  private readonly known = new Map<string, Known>()
  private readonly volumes = new Map<string, { volume: Volume, refs: number, ready: Promise<void> }>()
  private readonly ioStats = new Map<string, IoStats>()
  /** The running (or last) sync of each image on this node. */
  private readonly syncs = new Map<string, SyncStatus>()
  /** `GET /metrics` (a registry of this node's own). */
  readonly metrics: NodeMetrics
  /** Replica per location, this node's own included. */
  private readonly remotes = new Map<string, Replica>()
  /** Per image: the open record being written (one at a time, the latest counts win). */
  private readonly openWrites = new Map<string, Promise<void>>()
  private readonly reloading = new Map<string, { again: boolean, done: Promise<void> }>()
  private watcher: Watcher | undefined
  /** Reclaims waiting for their delay, per image. */
  private readonly reclaims = new Map<string, NodeJS.Timeout>()
  /** Moves running on this node, per image (moveImage). */
  private readonly moves = new Map<string, { request: MoveRequest, listeners: Set<(p: MoveProgress) => void>, done: Promise<MoveResult>, abort: AbortController }>()
  /** Images whose reclaim found them open here: it runs again when they close. */
  private readonly reclaimAtClose = new Set<string>()
  private closed = false

  private constructor (config: Config, store: MetadataStore, membership: NodeMembership, tls: NodeTls | undefined) {
    super()
    this.tls = tls
    this.config = config
    this.store = store
    this.membership = membership
    this.blocks = new BlockStore(config.image_root, config.blockname_format)
    this.errors = new NodeErrors(config.retry_after)
    this.images = new ImageService(config, store, this.blocks, (m) => this.emit('warning', m))
    this.local = new LocalReplica(config.id, this.blocks, this.fences)
    this.dataSessions = new DataSessions(this)
    this.metrics = new NodeMetrics({
      nodeId: config.id,
      allStats: () => this.imageNames().map((n) => this.stats(n)),
      errorLocations: () => this.errors.list().map((e) => e.location),
      nodes: async () => await this.store.listNodes()
        .then((list) => list.map((n) => ({ id: n.info.id, alive: n.alive !== undefined })), () => undefined)
    })
  }

  /**
   * Opens the metadata store, joins the cluster (refused, changing
   * nothing, when a live node has this id) and loads every image.
   */
  static async start (config: Config, log?: (m: string) => void): Promise<UkaiNode> {
    // Before anything else: a node serves and writes only as the id in its certificate.
    const tls = config.tls_dir === undefined ? undefined : loadNodeTls(config.tls_dir, config.id)
    const store = await openStore(config, false)
    let membership: NodeMembership
    try {
      membership = await NodeMembership.join(store, config, log)
    } catch (err) {
      await store.close()
      throw err
    }
    try {
      if (store.kind === 'file') await migrateV1(config.metadata_root, store, config.proxy_port)
      await mkdirDurable(config.image_root)
    } catch (err) {
      await membership.close()
      await store.close()
      throw err
    }
    const node = new UkaiNode(config, store, membership, tls)
    if (log !== undefined) {
      // From the start on: what loading the images finds is told too.
      node.on('warning', (m: string) => log(`warning: ${m}`))
      node.on('notice', (m: string) => log(m))
    }
    membership.on('lost', () => node.leaseLost())
    membership.on('rejoined', () => { for (const name of node.volumes.keys()) node.recordOpens(name) })
    try {
      node.watcher = await store.watch({
        onImage: (name) => { void node.reload(name) },
        onReset: () => { void node.reloadAll() }
      })
      await node.reloadAll()
      await node.checkLocalReplicas()
      await node.removeLeftovers()
      node.resumeMoves()
    } catch (err) {
      await node.close()
      throw err
    }
    return node
  }

  /**
   * At start: an image placed on this node whose directory is missing has
   * lost this node's replica (wiped, or never made: the node was down when
   * the image was created). Its blocks here are marked out of sync where
   * another in-sync copy exists (a resync brings them back) and the
   * directory is made. Where this node holds a block's only in-sync copy,
   * nothing is invented: the directory stays missing, so those blocks read
   * as errors rather than zeros, and the operator is told.
   */
  private async checkLocalReplicas (): Promise<void> {
    for (const name of this.imageNames()) {
      const known = this.known.get(name)
      const meta = known?.meta
      const loc = meta === undefined ? undefined : [...meta.locations.keys()].find((l) => isLocalLocation(this.config, l))
      if (known === undefined || meta === undefined) continue
      // Blocks moved away while this node was down: their files go (after the delay).
      if (loc === undefined) {
        if (await this.blocks.has(name)) this.scheduleReclaim(name)
        continue
      }
      if (await this.blocks.has(name)) {
        this.scheduleReclaim(name)
        // Files of an earlier image of this name (destroyed while this node was down) go now.
        await this.images.bindLocal(name, incarnationOf(known), false)
          .catch((err) => this.emit('warning', `image '${name}': binding this node's replica: ${toUkaiError(err).message}`))
        continue
      }
      const mine = meta.locations.get(loc)!
      let sole = 0
      const updated = await this.store.update(name, (m) => {
        const st = m.locations.get(loc)
        sole = 0
        if (st === undefined) return m
        // Range by range: what is in sync here, and of that what no other location has in sync.
        const here = st.blocks.clone().removeSet(st.outOfSync)
        const alone = here.clone()
        for (const [other, o] of m.locations) if (other !== loc) alone.removeSet(o.blocks.clone().removeSet(o.outOfSync))
        sole = alone.size
        for (const [s, e] of here.removeSet(alone).ranges()) m.setSync(loc, s, e, false)
        return m
      }).catch((err) => { this.emit('warning', `image '${name}': marking this node's missing replica out of sync: ${toUkaiError(err).message}`); return undefined })
      if (updated === undefined) continue
      await this.reload(name)
      await this.publish(name, updated.revision)
      if (sole === 0) {
        await this.images.bindLocal(name, incarnationOf(known), false)
        this.emit('warning', `image '${name}': this node's replica was missing (${this.blocks.imageDir(name)}); its ${mine.blocks.size} block(s) are out of sync here until 'ukai sync ${name}'`)
      } else {
        this.emit('warning', `image '${name}': this node's replica is missing (${this.blocks.imageDir(name)}) and holds the only in-sync copy of ${sole} block(s): they read as errors; nothing was made up`)
      }
    }
  }

  /**
   * At start: replica directories of images destroyed while this node was
   * away go. Only a directory bound to an incarnation (a replica this
   * node made) whose image the store no longer has, read again just before
   * (an image created meanwhile has its metadata before its directory).
   * Directories without a marker are left alone.
   */
  private async removeLeftovers (): Promise<void> {
    let names: string[]
    try { names = await readdir(this.config.image_root) } catch { return }
    for (const name of names) {
      if (this.known.has(name)) continue
      try { validateImageName(name) } catch { continue }
      const incarnation = await this.blocks.incarnationOf(name).catch(() => null)
      if (incarnation === null || incarnation === undefined) continue
      const st = await this.store.state(name).catch(() => null)
      if (st !== undefined) continue
      await this.blocks.destroy(name)
        .then(() => this.notice(`image '${name}' was destroyed while this node was away: its replica here (${this.blocks.imageDir(name)}) was removed`))
        .catch((err) => this.emit('warning', `image '${name}': removing the replica of a destroyed image: ${toUkaiError(err).message}`))
    }
  }

  // ---- ClusterContext -------------------------------------------------------------

  get nodeId (): string { return this.config.id }
  leaseId (): string { return this.membership.leaseId }

  async leaseValid (): Promise<void> {
    await this.membership.waitValid(this.config.io_timeout * 1000)
  }

  leaseIsValid (): boolean {
    return this.membership.valid
  }

  changeDeadline (): number {
    return Math.min(this.membership.validUntil, Date.now() + 60_000)
  }

  private isMe (node: string): boolean {
    // Asked for every location of an image on every request a peer makes
    // of a replica here (placedHere): parsed once per name. The config
    // does not change while the node runs.
    let me = this.meCache.get(node)
    if (me === undefined) {
      try { me = isLocalLocation(this.config, node) } catch { me = false }
      if (this.meCache.size >= 1024) this.meCache.clear()
      this.meCache.set(node, me)
    }
    return me
  }

  private readonly meCache = new Map<string, boolean>()

  /** True when two node ids (locations) name the same node. */
  sameNode (a: string, b: string): boolean {
    return sameLocation(a, b, this.config.proxy_port)
  }

  /**
   * A live writer may be fenced by this node when this node is one of the
   * image's hypervisors (a VM migrating here), when the holder is this
   * node (an earlier session), or when the holder only resyncs or
   * reconciles and has no writer open.
   */
  mayTakeOver (holder: WriterRecord, st: ImageState): boolean {
    if (this.isMe(holder.node)) return true
    if (st.meta.hypervisors.some((h) => this.isMe(h))) return true
    return holder.purpose === 'sync' && !st.opens.some((o) => this.sameNode(o.node, holder.node) && o.writers > 0)
  }

  async fenceOthers (image: string, grant: WriterGrant, meta: ImageMeta): Promise<RangeSet | undefined> {
    const targets = new Map<string, string>()
    for (const loc of meta.locations.keys()) targets.set(canonicalLocation(loc, this.config.proxy_port), loc)
    const prev = grant.previous
    if (prev !== undefined) targets.set(canonicalLocation(prev.node, this.config.proxy_port), prev.node)
    const replies = new Map<string, FenceReply | undefined>()
    await Promise.all([...targets].map(async ([key, loc]) => {
      if (this.isMe(loc)) {
        replies.set(key, await this.handleFence(image, grant.generation))
        return
      }
      try {
        replies.set(key, await this.images.directory.fence(loc, image, grant.generation, this.config.io_timeout * 1000))
      } catch (err) {
        this.emit('warning', `image '${image}': node ${loc} could not be fenced for writer generation ${grant.generation}: ${toUkaiError(err).message}`)
        replies.set(key, undefined)
      }
    }))
    if (prev === undefined) return undefined
    const reply = replies.get(canonicalLocation(prev.node, this.config.proxy_port))
    const s = reply?.sessions.find((x) => x.session === prev.session)
    return s === undefined ? undefined : new RangeSet(s.unsafe)
  }

  async publish (image: string, revision: number): Promise<void> {
    const st = await this.store.state(image).catch(() => undefined)
    if (st === undefined) return
    await Promise.all(st.opens.filter((o) => !this.isMe(o.node)).map(async (o) => {
      try {
        await this.images.directory.refresh(o.node, image, revision, this.config.io_timeout * 1000)
      } catch (err) {
        this.emit('warning', `image '${image}': node ${o.node}, which has it open, did not confirm revision ${revision}: ${toUkaiError(err).message}`)
      }
    }))
  }

  notice (message: string): void {
    this.emit('notice', message)
  }

  // ---- requests from other nodes ----------------------------------------------------

  /**
   * Another node holds the writer lease of `image` at `generation` now:
   * this node's replica refuses older generations (once the writes
   * already inside have finished), and this node's older sessions end.
   */
  async handleFence (image: string, generation: number): Promise<FenceReply> {
    const st = await this.store.requireState(image)
    if (!Number.isSafeInteger(generation) || generation < 1 || generation > st.generation) {
      throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', `image '${image}' has no writer generation ${generation} (the latest is ${st.generation})`)
    }
    await this.fences.raise(image, generation)
    const sessions = this.fenceVolume(image, generation, `writer generation ${generation} took the image over`)
    // A session that cannot vouch for anything is not listed: the new
    // holder then reconciles the whole dirty-block log.
    return { sessions: sessions.flatMap((s) => s.unsafe === undefined ? [] : [{ session: s.session, unsafe: s.unsafe.toJSON() }]) }
  }

  /** Resolves once this node's view of `image` is at `revision` or newer. */
  async handleRefresh (image: string, revision: number): Promise<{ revision: number }> {
    if ((this.imageMeta(image)?.revision ?? 0) < revision) await this.reload(image)
    const now = this.imageMeta(image)?.revision ?? 0
    if (now < revision && this.known.has(image)) {
      // Read from the store just now: no writer has reached that revision.
      throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', `image '${image}' is at revision ${now}; revision ${revision} was never written`,
        { image, revision: now })
    }
    // Reads outside the volume (the native FUSE plane) of blocks this
    // revision made unreadable here are over before the writer goes on.
    await this.volumes.get(image)?.volume.readsSettled()
    return { revision: now }
  }

  /** Fences this node's sessions of `image` older than `generation` (all without one), saying so. */
  private fenceVolume (image: string, generation: number | undefined, why: string): Array<{ session: string, unsafe: RangeSet | undefined }> {
    const sessions = this.volumes.get(image)?.volume.fenceSession(generation) ?? []
    if (sessions.length > 0) {
      const left = sessions.some((s) => s.unsafe === undefined)
        ? 'every block of the dirty-block log'
        : `${sessions.reduce((n, s) => n + (s.unsafe?.size ?? 0), 0)} block(s)`
      this.notice(`image '${image}': this node's writer is fenced (${why}); its writes are refused from now on, ${left} left for the new writer to reconcile`)
    }
    return sessions
  }

  /** This node's lease ended: every writer session on it is gone. */
  private leaseLost (): void {
    this.emit('warning', `node ${this.config.id} lost its lease with the metadata store; its writers are fenced`)
    for (const name of this.volumes.keys()) this.fenceVolume(name, undefined, 'this node lost its lease')
  }

  // ---- ReplicaProvider ----------------------------------------------------------------

  // This node's own location is served from its block files; every other
  // location through the peer protocol (NBD to its proxy port), one
  // RemoteReplica per node with pooled connections.
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
      blockSizeOf: (image) => this.imageMeta(image)?.blockSize,
      // Over TLS the peer must prove it is the node this location names.
      tls: this.tls === undefined
        ? undefined
        : { context: this.tls.context, checkServerIdentity: expectNode(location, this.config.proxy_port) }
    })
    this.remotes.set(location, remote)
    return remote
  }

  // ---- image metadata ----------------------------------------------------------------

  /** The incarnation of an image as this node last read it (block-store.ts `bind`). */
  incarnationOf (name: string): Incarnation | undefined {
    const k = this.known.get(name)
    return k === undefined ? undefined : incarnationOf(k)
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

  private async reloadAll (): Promise<void> {
    const names = new Set([...await this.store.list(), ...this.known.keys()])
    await Promise.all([...names].map(async (n) => await this.reload(n)))
  }

  /** Re-reads one image's state from the store after a change; calls for one image are coalesced. */
  async reload (name: string): Promise<void> {
    const busy = this.reloading.get(name)
    if (busy !== undefined) {
      busy.again = true
      return await busy.done
    }
    const entry = { again: false, done: Promise.resolve() }
    entry.done = (async () => {
      do {
        entry.again = false
        await this.reloadOnce(name)
      } while (entry.again)
    })().finally(() => this.reloading.delete(name))
    this.reloading.set(name, entry)
    await entry.done
  }

  private async reloadOnce (name: string): Promise<void> {
    if (this.closed) return
    let st: ImageState | undefined
    try {
      st = await this.store.state(name)
    } catch (err) {
      this.emit('warning', `metadata of image '${name}' could not be read: ${(err as Error).message}`)
      return
    }
    const had = this.known.get(name)
    if (st === undefined) {
      if (had !== undefined) {
        this.known.delete(name)
        this.ioStats.delete(name)
        this.syncs.delete(name)
        this.fences.drop(name)
        this.emit('images')
        // Destroyed: this node's replica goes too, also when the image no
        // longer placed blocks here and their reclaim was still waiting (a
        // former location). Only the directory of that image: bound to its
        // incarnation, or (no marker) placed here in the last view.
        const timer = this.reclaims.get(name)
        if (timer !== undefined) { clearTimeout(timer); this.reclaims.delete(name) }
        const marker = await this.blocks.incarnationOf(name).catch(() => null)
        const ours = marker === undefined ? this.placedHere(had.meta) !== undefined : marker !== null && marker.id === had.incarnation
        if (ours && !this.isOpen(name)) {
          await this.blocks.destroy(name)
            .then(() => { if (this.placedHere(had.meta) === undefined) this.notice(`image '${name}' was destroyed: the block files its former replica here still had were removed`) })
            .catch((err) => this.emit('warning', `removing the block files of destroyed image '${name}': ${(err as Error).message}`))
        }
        for (const r of this.remotes.values()) if (r instanceof RemoteReplica) await r.closeImage(name)
      }
      return
    }
    if (had !== undefined && had.incarnation === st.incarnation && had.meta.revision > st.meta.revision) return
    if (had !== undefined && had.incarnation !== st.incarnation) this.fences.drop(name)
    this.known.set(name, { meta: st.meta, seen: had?.seen ?? new Date(), incarnation: st.incarnation, headerCreate: st.headerCreate })
    if (had !== undefined && had.incarnation === st.incarnation && this.placementShrank(had.meta, st.meta)) this.scheduleReclaim(name)
    const volume = this.volumes.get(name)?.volume
    volume?.refresh(st.meta)
    // Another session holds the writer lease: older generations are fenced here.
    const w = st.writer
    if (w !== undefined && w.generation > this.fences.fenceOf(name)) {
      void this.fences.raise(name, w.generation)
      if (volume !== undefined && !volume.ownsSession(w.session)) this.fenceVolume(name, w.generation, `node ${w.node} took the image over, generation ${w.generation}`)
    }
    if (had === undefined) this.emit('images')
  }

  /** True when `after` places fewer blocks on this node than `before`. */
  private placementShrank (before: ImageMeta, after: ImageMeta): boolean {
    const b = this.placedHere(before)
    if (b === undefined) return false
    const a = this.placedHere(after)
    return a === undefined || b.blocks.clone().removeSet(a.blocks).size > 0
  }

  /** This node's location state in `meta` (the blocks placed here), if it has one. */
  placedHere (meta: ImageMeta): LocationState | undefined {
    for (const [loc, st] of meta.locations) if (this.isMe(loc)) return st
    return undefined
  }

  /**
   * Reclaim (remove-location, or a location gone while this node was
   * down): the block files of blocks no longer placed on this node are
   * removed, RECLAIM_DELAY_MS after the change, so that a node whose view
   * was a moment older reads elsewhere by then. Out-of-sync blocks still
   * placed here are kept (a resync starts from them). Nothing is removed
   * while the image is open on this node; its close does it then.
   */
  private scheduleReclaim (name: string): void {
    if (this.closed || this.reclaims.has(name)) return
    const timer = setTimeout(() => {
      this.reclaims.delete(name)
      void this.reclaim(name).catch((err) => this.emit('warning', `image '${name}': removing block files no longer placed on this node: ${toUkaiError(err).message}`))
    }, RECLAIM_DELAY_MS)
    timer.unref()
    this.reclaims.set(name, timer)
  }

  private async reclaim (name: string): Promise<void> {
    const k = this.known.get(name)
    if (this.closed || k === undefined) return
    // While the image is open here, its close does it (releaseVolume).
    if (this.isOpen(name)) { this.reclaimAtClose.add(name); return }
    const placed = this.placedHere(k.meta)?.blocks
    const removed = await this.blocks.removeBlocks(name, (b) => placed !== undefined && placed.has(b))
    if (placed === undefined && await this.blocks.has(name)) {
      await this.blocks.destroy(name)
      this.notice(`image '${name}' places no block on this node any more: its replica here (${removed} block file(s)) was removed`)
    } else if (removed > 0) {
      this.notice(`image '${name}': removed ${removed} block file(s) of blocks no longer placed on this node`)
    }
  }

  // ---- volumes and opens ----------------------------------------------------------------

  /** The shared volume of an image; each call must be paired with releaseVolume. */
  async acquireVolume (name: string): Promise<Volume> {
    const open = this.volumes.get(name)
    if (open !== undefined) {
      open.refs++
      // Another opener may still be recovering the image.
      await open.ready
      return open.volume
    }
    const st = await this.store.state(name)
    if (st === undefined) throw imageNotFound(name)
    const meta = st.meta
    // This node's replica serves this image's data only: files of an earlier image of the name go first.
    if ([...meta.locations.keys()].some((l) => isLocalLocation(this.config, l)) && await this.blocks.has(name)) {
      await this.images.bindLocal(name, incarnationOf(st), false)
    }
    const again = this.volumes.get(name)
    if (again !== undefined) {
      again.refs++
      await again.ready
      return again.volume
    }
    const stats = this.ioStatsOf(name)
    const volume = new Volume(meta, { store: this.store, replicas: this, errors: this.errors, cluster: this, stats })
    const entry = { volume, refs: 1, ready: this.recover(volume) }
    this.volumes.set(name, entry)
    await entry.ready
    return volume
  }

  /**
   * A writer that died left blocks in the dirty-block log and nobody
   * writes the image now: they are reconciled before anyone reads them.
   * (A live writer's log is its own business.)
   */
  private async recover (volume: Volume): Promise<void> {
    try {
      const st = await this.store.state(volume.name)
      if (st === undefined || st.dirty.isEmpty || st.writer !== undefined) return
      const n = await volume.recover()
      if (n > 0) this.emit('warning', `image '${volume.name}': reconciled ${n} block(s) left dirty by a writer that stopped`)
    } catch (err) {
      this.emit('warning', `image '${volume.name}': the blocks a stopped writer left dirty were not reconciled: ${toUkaiError(err).message}`)
    }
  }

  async releaseVolume (volume: Volume): Promise<void> {
    const open = this.volumes.get(volume.name)
    if (open === undefined || open.volume !== volume) return
    if (--open.refs > 0) return
    this.volumes.delete(volume.name)
    // Everything flushed, the dirty-block log emptied, the lease given back.
    await volume.close().catch(() => {})
    await this.blocks.closeImage(volume.name).catch(() => {})
    if (this.reclaimAtClose.delete(volume.name)) this.scheduleReclaim(volume.name)
  }

  /**
   * Opens an image for a hypervisor (a FUSE open, an NBD connection). An
   * open for writing is refused (UKAI_ERR_BUSY) while another node has the
   * image open for writing or holds its writer lease, unless this node is
   * one of the image's hypervisors (a live migration's destination: it
   * takes the lease over at its first write); on this node a second
   * writer is refused as well. Every open is recorded in the metadata
   * store (who has the image open, cluster-wide).
   */
  async openImage (name: string, write: boolean, who: string): Promise<ImageOpen> {
    if (this.imageMeta(name) === undefined && await this.store.get(name) === undefined) throw imageNotFound(name)
    const volume = await this.acquireVolume(name)
    let end: () => Promise<void>
    try {
      if (write) {
        const st = await this.store.requireState(name)
        const other = this.otherWriter(st)
        if (other !== undefined && !st.meta.hypervisors.some((h) => this.isMe(h))) {
          throw new UkaiError('UKAI_ERR_BUSY',
            `image '${name}' is open for writing on node ${other}; a second writer is refused (add this node to the image's hypervisors to let a VM migrate here)`,
            { image: name, writer: other })
        }
      }
      end = volume.open(write, who)
    } catch (err) {
      await this.releaseVolume(volume)
      throw err
    }
    try {
      await this.recordOpens(name)
    } catch (err) {
      await end()
      await this.releaseVolume(volume)
      throw err
    }
    let closed = false
    return {
      volume,
      write,
      close: async () => {
        if (closed) return
        closed = true
        await end()
        await this.releaseVolume(volume)
        await this.recordOpens(name).catch((err) => this.emit('warning', `image '${name}': recording its close: ${toUkaiError(err).message}`))
      }
    }
  }

  /** The registration of the node that writes the image, when that is not this node. */
  async writerElsewhere (name: string): Promise<NodeInfo | undefined> {
    const other = this.otherWriter(await this.store.requireState(name))
    if (other === undefined) return undefined
    const info = await this.images.directory.find(other)
    if (info === undefined) throw new UkaiError('UKAI_ERR_UNAVAILABLE', `image '${name}' is written by node ${other}, which has not registered`)
    return info
  }

  /** Another node that writes the image (an open for writing, or the writer lease of a writer). */
  private otherWriter (st: ImageState): string | undefined {
    const open = st.opens.find((o) => o.writers > 0 && !this.isMe(o.node))
    if (open !== undefined) return open.node
    const w = st.writer
    if (w !== undefined && !this.isMe(w.node) && w.purpose === 'write') return w.node
    return undefined
  }

  /** Stores how many readers and writers this node has of `name`; the latest counts win. */
  private recordOpens (name: string): Promise<void> {
    const prev = this.openWrites.get(name) ?? Promise.resolve()
    const run = prev.catch(() => {}).then(async () => {
      const v = this.volumes.get(name)?.volume
      const counts = { readers: v?.readerCount ?? 0, writers: v?.hasWriter === true ? 1 : 0 }
      await this.store.putOpen(name, this.config.id, counts, this.membership.leaseId, { until: this.changeDeadline() })
    })
    this.openWrites.set(name, run)
    void run.finally(() => { if (this.openWrites.get(name) === run) this.openWrites.delete(name) }).catch(() => {})
    return run
  }

  /** The I/O counters of an image on this node, made (and fed to the latency histogram) on first use. */
  ioStatsOf (name: string): IoStats {
    let stats = this.ioStats.get(name)
    if (stats === undefined) {
      stats = newIoStats()
      stats.observe = this.metrics.observer(name)
      this.ioStats.set(name, stats)
    }
    return stats
  }

  /**
   * An image's I/O on this node since it started (zeros when never
   * opened), its locations' state from the metadata, and its sync.
   */
  stats (name: string): ImageStats {
    this.ioStats.get(name)?.collect?.()
    return imageStats(this.config.id, name, this.ioStats.get(name) ?? newIoStats(), this.imageMeta(name), this.syncs.get(name), (l) => this.isMe(l))
  }

  isOpen (name: string): boolean {
    return (this.volumes.get(name)?.volume.openCount ?? 0) > 0
  }

  openVolumes (): Volume[] {
    return [...this.volumes.values()].map((v) => v.volume)
  }

  // ---- image lifecycle ----------------------------------------------------------------

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
      throw new UkaiError('UKAI_ERR_BUSY', `image '${name}' is open on this node; stop its users before destroying it`, { image: name })
    }
    await this.images.destroy(name)
    await this.reload(name)
  }

  /**
   * Removes a location's blocks; every node that has the image open
   * applies it before this returns. The node of the location removes it
   * itself whenever it runs (asked through its control API when that is
   * another node): before the removal is stored, it stops reading that
   * replica for the range and stops serving reads of it to other nodes
   * (LeavingReplicas), so no reader anywhere finds it stale once the
   * writer, wherever it runs, stops writing it.
   */
  async removeLocation (name: string, location: unknown, start?: number, end?: number): Promise<ImageMeta> {
    validateImageName(name)
    const loc = validateLocation(location, this.config.proxy_port)
    if (!this.isMe(loc)) {
      if (await this.removeThere(name, loc, start, end)) {
        await this.reload(name)
        return await this.store.require(name)
      }
    } else {
      // Refused before any read leaves the replica: a removal that cannot
      // be stored must not make the range unreadable meanwhile.
      checkRemoval(await this.store.require(name), loc, start, end)
    }
    const volume = this.isMe(loc) ? this.volumes.get(name)?.volume : undefined
    const leaving = volume?.leave(loc, start ?? 0, end ?? Number.MAX_SAFE_INTEGER)
    const served = this.isMe(loc) ? this.leaving.leave(name, start ?? 0, end ?? Number.MAX_SAFE_INTEGER) : undefined
    let meta: ImageMeta
    try {
      await leaving?.drained
      meta = await this.images.removeLocation(name, loc, start, end)
    } catch (err) {
      leaving?.cancel()
      served?.cancel()
      throw err
    }
    leaving?.removed(meta.revision)
    served?.removed(meta.revision)
    await this.reload(name)
    await this.publish(name, meta.revision)
    return meta
  }

  /**
   * Asks the node of `loc` to remove its location itself (removeLocation).
   * False when that node is down (no lease and no open of the image, or
   * nothing listening on its control port): nothing can read its replica
   * then, and this node stores the removal.
   */
  private async removeThere (name: string, loc: string, start: number | undefined, end: number | undefined): Promise<boolean> {
    const st = await this.store.requireState(name)
    const open = st.opens.some((o) => this.sameNode(o.node, loc))
    const alive = (await this.store.listNodes()).some((n) => n.alive !== undefined && this.sameNode(n.info.id, loc))
    if (!open && !alive) return false
    try {
      await this.images.directory.removeOwnLocation(loc, name, start, end, this.config.io_timeout * 1000)
      return true
    } catch (err) {
      if (!open && isNotRunning(err)) return false
      const e = toUkaiError(err)
      const why = open ? 'has the image open' : 'holds the replica'
      throw new UkaiError(e.code, `node ${loc} ${why}, and removes its own location itself (it stops serving reads of it first): ${e.message}`, { ...e.details, image: name, node: loc })
    }
  }

  /**
   * Re-synchronises blocks [start, end) of an image (all when absent):
   * every out-of-sync replica is copied from an in-sync one.
   */
  async syncImage (name: string, start?: number, end?: number, onProgress?: (p: SyncProgress) => void, rate?: number, signal?: AbortSignal): Promise<SyncProgress> {
    const volume = await this.acquireVolume(name)
    // Followed for `ukai stats` and the metrics (ukai_sync_*).
    const started = new Date().toISOString()
    const follow = (p: SyncProgress, running: boolean): void => {
      this.syncs.set(name, { running, blocks: p.blocks, done: p.done, bytes: p.bytes, failed: p.failed.length, started, ...(running ? {} : { ended: new Date().toISOString() }) })
    }
    let last: SyncProgress = { blocks: 0, done: 0, bytes: 0, failed: [] }
    try {
      const result = await volume.sync(start ?? 0, end ?? volume.meta.blockCount, (p) => {
        last = p
        follow(p, true)
        onProgress?.(p)
      }, { ...(rate === undefined ? {} : { rate }), ...(signal === undefined ? {} : { signal }) })
      last = result
      return result
    } finally {
      follow(last, false)
      await this.releaseVolume(volume)
    }
  }

  /**
   * Relocates blocks of an image to another node while it is in use
   * (move.ts). The move is recorded in the metadata store while it runs
   * (MoveIntent), so that this node resumes it when it starts again after
   * dying in the middle (resumeMoves); it is forgotten when the move ends,
   * however it ends, while this node runs. A request for a move of the
   * same image while one runs here follows that one (the same blocks to
   * the same place) or is refused (another).
   */
  async moveImage (name: string, req: MoveRequest, emit: (p: MoveProgress) => void): Promise<MoveResult> {
    const running = this.moves.get(name)
    if (running !== undefined) {
      if (!this.sameMove(running.request, req)) {
        throw new UkaiError('UKAI_ERR_BUSY', `image '${name}': another move of it runs on this node (to ${running.request.to}); wait for it to end`, { image: name })
      }
      running.listeners.add(emit)
      try { return await running.done } finally { running.listeners.delete(emit) }
    }
    const listeners = new Set([emit])
    const abort = new AbortController()
    const run = async (): Promise<MoveResult> => {
      validateLocation(req.to, this.config.proxy_port)
      await this.store.putMove(name, { node: this.config.id, request: moveKeyOf(req), since: new Date().toISOString() })
      try {
        return await moveImage({
          defaultPort: this.config.proxy_port,
          meta: async (n) => await this.store.require(n),
          addLocation: async (n, loc, s, e) => await this.images.addLocation(n, loc, s, e),
          removeLocation: async (n, loc, s, e) => await this.removeLocation(n, loc, s, e),
          sync: async (n, s, e, onProgress, rate, signal) => await this.syncImage(n, s, e, onProgress, rate, signal)
        }, name, req, (p) => { for (const l of listeners) l(p) }, abort.signal)
      } finally {
        // A node that is shutting down keeps the record: it resumes the move when it starts again.
        if (!this.closed) await this.store.putMove(name, undefined).catch(() => {})
      }
    }
    const entry = { request: req, listeners, done: run(), abort }
    this.moves.set(name, entry)
    try { return await entry.done } finally { this.moves.delete(name) }
  }

  /**
   * Cancels the move of an image: the one running here stops between two
   * chunks of its copy (resolves once it has stopped, consistent: run
   * again, it resumes), and its record goes. A move recorded for another
   * node is cancelled there, through its control API; a record of a node
   * that is not running (it would resume the move when it starts) is
   * dropped. UKAI_ERR_NOT_FOUND when no move of the image runs.
   */
  async cancelMove (name: string): Promise<{ node: string, result?: MoveResult }> {
    validateImageName(name)
    const running = this.moves.get(name)
    if (running !== undefined) {
      running.abort.abort(new UkaiError('UKAI_ERR_BUSY', `the move of image '${name}' was cancelled`, { image: name }))
      return { node: this.config.id, result: await running.done }
    }
    const intent = (await this.store.state(name))?.move
    if (intent === undefined) throw new UkaiError('UKAI_ERR_NOT_FOUND', `no move of image '${name}' runs`, { image: name })
    if (!this.isMe(intent.node)) {
      try {
        return await this.images.directory.cancelMove(intent.node, name, this.config.io_timeout * 1000)
      } catch (err) {
        if (!isNotRunning(err)) throw err
      }
    }
    // Its node does not run it now (it is down, or has not resumed it yet): it will not.
    await this.store.putMove(name, undefined)
    return { node: intent.node }
  }

  /** True when two move requests move the same blocks to the same place (the source and the pace may differ). */
  private sameMove (a: MoveRequest, b: MoveRequest): boolean {
    const to = (r: MoveRequest): string | undefined => { try { return validateLocation(r.to, this.config.proxy_port) } catch { return undefined } }
    return to(a) !== undefined && to(a) === to(b) && a.start === b.start && a.end === b.end
  }

  /** At start: the moves this node was running when it stopped go on (see moveImage). */
  private resumeMoves (): void {
    for (const name of this.imageNames()) {
      void (async () => {
        const st = await this.store.state(name)
        const intent = st?.move
        if (st === undefined || intent === undefined || !this.isMe(intent.node)) return
        const other = this.otherWriter(st)
        if (other !== undefined) {
          this.emit('warning', `image '${name}': the move to ${intent.request.to} this node ran is not resumed here, node ${other} writes the image now; run 'ukai image move' again`)
          await this.store.putMove(name, undefined)
          return
        }
        this.notice(`image '${name}': resuming the move to ${intent.request.to} that was under way when this node stopped`)
        const result = await this.moveImage(name, intent.request, () => {})
        if (result.failed.length > 0) this.emit('warning', `image '${name}': the resumed move stopped: ${result.failed.length} block(s) could not be copied (${result.failed[0]!.reason}); run 'ukai image move' again`)
        else this.notice(`image '${name}': the resumed move to ${intent.request.to} is done (${result.done} block(s))`)
      })().catch((err) => { if (!this.closed) this.emit('warning', `image '${name}': resuming its move: ${toUkaiError(err).message}`) })
    }
  }

  async capacity (): Promise<Capacity> {
    const st = await statfs(this.config.image_root)
    return { total: st.blocks * st.bsize, free: st.bfree * st.bsize, available: st.bavail * st.bsize }
  }

  async close (): Promise<void> {
    if (this.closed) return
    this.closed = true
    for (const t of this.reclaims.values()) clearTimeout(t)
    this.reclaims.clear()
    await this.dataSessions.closeAll()
    await this.watcher?.close()
    for (const { volume } of this.volumes.values()) await volume.close().catch(() => {})
    this.volumes.clear()
    for (const r of this.remotes.values()) if (r instanceof RemoteReplica) await r.close()
    await this.blocks.close()
    // The lease ends: this node's registration, opens and writer leases go with it.
    await this.membership.close()
    await this.store.close()
  }
}

/** What is recorded of a move request. */
function moveKeyOf (req: MoveRequest): MoveIntent['request'] {
  return {
    to: req.to,
    ...(req.from !== undefined ? { from: req.from } : {}),
    ...(req.start !== undefined ? { start: req.start } : {}),
    ...(req.end !== undefined ? { end: req.end } : {}),
    ...(req.rate !== undefined ? { rate: req.rate } : {})
  }
}
