/**
 * Volume: one open image on this node. Every data-path rule lives here,
 * and both frontends (FUSE, NBD) go through it:
 *
 * - reads are served only from a location in sync for the block, the
 *   local one first; a failing location is put in the error state and the
 *   next one is tried (invariant 1). A read never changes sync state: a
 *   replica that cannot be read is unavailable, not stale;
 * - writes need the image's writer lease, cluster-wide: the first write
 *   takes it (writer-lease.ts), and only its holder writes, changes the
 *   dirty-block log, or marks replicas out of sync (invariant 6). Writes
 *   go to every in-sync location of every touched block in parallel and
 *   are acknowledged only when each has the data or has been durably
 *   marked out of sync first, and every node that has the image open has
 *   seen the mark (invariants 2 and 5). A location already out of sync is
 *   not written: it stays out of sync until a resync copies the block;
 * - overlapping writes are ordered by a range lock, so every replica sees
 *   them in the same order;
 * - one writer per image on this node; readers are unlimited.
 */
import { UkaiError, toUkaiError } from '../errors.js'
import { GRANULE, granulesOf, type ImageMeta } from '../metadata/image.js'
import { fenced, type ImageState, type MetadataStore, type WriterGrant, type WriterRecord } from '../metadata/store.js'
import { RangeSet } from '../metadata/range-set.js'
import type { FenceTable } from '../node/fences.js'
import type { DiscardMode, Replica, ReplicaProvider } from '../replica/replica.js'
import { splitRange, type Piece } from './block-math.js'
import type { NodeErrors } from './node-errors.js'
import { DirtyLog, type LogOwner } from './dirty-log.js'
import { UnflushedGranules } from './unflushed-granules.js'
import { allSettledOrThrow } from '../util/settle.js'
import { RangeLock } from './range-lock.js'
import { copyBlock, failure, pacer, syncBlocks, type CopyContext, type Failure, type SyncProgress } from './resync.js'
import { WriterLease } from './writer-lease.js'
import type { WriterSession } from './writer-session.js'

export type { SyncProgress } from './resync.js'

export interface Extent {
  offset: number
  length: number
  /** True when the range is not allocated (a hole). */
  hole: boolean
  /** True when the range reads as zeros. */
  zero: boolean
}

/** What a Volume needs of the cluster: this node's lease, the rules of takeover, fencing, and pushing changes. */
export interface ClusterContext {
  readonly nodeId: string
  readonly fences: FenceTable
  /** The lease writer keys live on (this node's). */
  leaseId: () => string
  /** Resolves once this node's lease is known valid; rejects otherwise (fail-stop). */
  leaseValid: () => Promise<void>
  /** True while this node's lease is known valid (checked again right before a write goes out). */
  leaseIsValid: () => boolean
  /** Until when (ms since the epoch) metadata changes may wait for an unreachable store. */
  changeDeadline: () => number
  /** Whether this node may fence `holder`, a live writer of the image. */
  mayTakeOver: (holder: WriterRecord, state: ImageState) => boolean
  /**
   * After this node was granted the lease: raises the fence of every
   * other node of the image. Returns the blocks the previous holder cannot
   * vouch for, or undefined when it could not tell (dead, unreachable).
   */
  fenceOthers: (image: string, grant: WriterGrant, meta: ImageMeta) => Promise<RangeSet | undefined>
  /** Makes every other node that has the image open apply `revision`; resolves when they have (or cannot be reached). */
  publish: (image: string, revision: number) => Promise<void>
  /** Tells the operator something worth knowing that is not a problem (a takeover). */
  notice: (message: string) => void
}

export interface VolumeContext {
  store: MetadataStore
  replicas: ReplicaProvider
  errors: NodeErrors
  cluster: ClusterContext
  /** I/O counters of the image, kept by the node across opens. */
  stats?: IoStats
}

export interface IoStats {
  reads: number
  writes: number
  bytesRead: number
  bytesWritten: number
  /** Reads served per location. */
  readsFrom: Record<string, number>
  /** Replica requests that succeeded, per location (a piece of one block each). */
  replicas: Record<string, ReplicaIo>
  /** Told each replica request's latency (the node's histogram); set by the node. */
  observe?: (location: string, op: 'read' | 'write', seconds: number) => void
  /** Folds in reads counted elsewhere (the native FUSE plane) before the counters are read. */
  collect?: () => void
  /** Requests other nodes made of this node's replica over the peer protocol (replica-exports.ts). */
  served: ServedIo
}

export interface ServedIo {
  reads: number
  readBytes: number
  writes: number
  writtenBytes: number
  /** Block status requests (copies asking where the data is). */
  statusRequests: number
}

export interface ReplicaIo {
  local: boolean
  reads: number
  readBytes: number
  readSeconds: number
  writes: number
  writtenBytes: number
  writeSeconds: number
}

/**
 * A reader of this volume's local block files that runs outside it (the
 * native FUSE plane, frontends/fuse/read-plane.ts). It is told, in the
 * same tick as every change of what this volume knows, exactly which
 * blocks chooseReader would read from this node's replica (in sync, not
 * being left, the location not in the error state) and the used size. A
 * block that leaves the set must be unreadable to the plane once update
 * returns; the promise it returns (if any) resolves once no read of such
 * a block is under way any more. The volume waits for it before the
 * change counts (a write acknowledged, a removal stored, a refresh
 * answered: readsSettled).
 */
export interface LocalReadPlane {
  update: (readable: RangeSet, usedSize: number) => Promise<void> | undefined
}

export class Volume {
  readonly name: string
  private current: ImageMeta
  private readonly ctx: VolumeContext
  private readonly lock = new RangeLock()
  private writer: string | undefined
  private readers = 0
  /** Resyncs and reconciliations running without a writer open. */
  private syncs = 0
  /** Blocks written per location since that location's last flush. */
  private readonly unflushed = new Map<string, RangeSet>()
  /**
   * Granules written per location since its last flush: what a location
   * that died may have lost, for its fine records (undefined once too
   * many to keep: its blocks are then copied whole).
   */
  private readonly unflushedGranules = new Map<string, UnflushedGranules | undefined>()
  /**
   * Per location, granules of writes it missed that its fine records do
   * not hold yet (storeFine stores them). Their blocks stay in the
   * dirty-block log until stored, and a fenced session counts them
   * unsafe: a writer that dies with them unstored leaves whole-block
   * copies behind, never a fine record that misses a write.
   */
  private readonly pendingFine = new Map<string, RangeSet>()
  /** Flushes in progress (see flush). */
  private readonly flushing = new Set<Promise<void>>()
  /** Flush failures not recorded yet (the metadata store was away): the next flush records them first. */
  private unrecorded: Failure[] = []
  private readonly dirty: DirtyLog
  private readonly lease: WriterLease
  /** Out-of-sync replicas being resynced, per block: writes reach them too (resync.ts). */
  private readonly mirrored = new Map<number, Map<string, number>>()
  /** Per block, the resync targets a mirrored write failed on. */
  private readonly mirrorFailures = new Map<number, Set<string>>()
  /** Writes to mirrored blocks (byte ranges in the block), numbered as they took their lock: what a resync's copy leaves out (copyBlock). */
  private readonly mirroredWrites = new Map<number, Array<{ seq: number, start: number, end: number }>>()
  private writeSeq = 0
  /**
   * Replicas this node reads no more, ahead of their removal (leave):
   * block ranges per location, kept until the metadata without them is
   * here (`until`, its revision).
   */
  private readonly leaving: Array<{ location: string, blocks: RangeSet, until?: number }> = []
  readonly stats: IoStats
  /** Readers of the local block files outside this volume (see LocalReadPlane). */
  private readonly planes = new Set<LocalReadPlane>()
  /** Revocations whose reads are still under way. */
  private readonly draining = new Set<Promise<void>>()
  private stopWatchingErrors: (() => void) | undefined

  constructor (meta: ImageMeta, ctx: VolumeContext) {
    const volume = this
    this.name = meta.name
    this.current = meta
    this.ctx = ctx
    this.dirty = new DirtyLog(ctx.store, meta.name)
    this.stats = ctx.stats ?? newIoStats()
    this.lease = new WriterLease({
      name: this.name,
      get meta () { return volume.current },
      idle: () => this.writer === undefined && this.syncs === 0,
      refresh: (m) => this.refresh(m),
      adoptLog: (log) => this.dirty.adopt(log),
      reconcile: async (s, blocks) => await this.reconcile(s, blocks),
      trimLog: async (s) => { await this.storeFine(s); await this.dirty.trim(this.owner(s), 0) },
      flush: async () => await this.flush()
    }, ctx.store, ctx.cluster)
  }

  get meta (): ImageMeta { return this.current }
  get size (): number { return this.current.size }
  get usedSize (): number { return this.current.usedSize }
  get blockSize (): number { return this.current.blockSize }
  get hasWriter (): boolean { return this.writer !== undefined }
  get openCount (): number { return this.readers + (this.writer === undefined ? 0 : 1) }
  get readerCount (): number { return this.readers }
  /** The writer generation this volume writes with, while it holds the lease. */
  get generation (): number | undefined { return this.lease.current?.held === true ? this.lease.current.generation : undefined }
  /** True when this volume's writer was fenced (its open can write no more). */
  get fenced (): boolean { return this.lease.fenced }

  /** True when `session` is one of this volume's writer sessions. */
  ownsSession (session: string): boolean {
    return this.lease.owns(session)
  }

  /** Takes newer metadata from the store (a change made elsewhere). */
  refresh (meta: ImageMeta): void {
    if (meta.revision >= this.current.revision) this.current = meta
    for (let i = this.leaving.length - 1; i >= 0; i--) {
      const until = this.leaving[i]!.until
      if (until !== undefined && until <= this.current.revision) this.leaving.splice(i, 1)
    }
    this.syncPlanes()
  }

  // ---- readers outside the volume (LocalReadPlane) ------------------------------

  /** Lets `plane` read the local replica where chooseReader would; returns its detach. */
  attachReadPlane (plane: LocalReadPlane): () => void {
    this.planes.add(plane)
    this.stopWatchingErrors ??= this.ctx.errors.watch(() => this.syncPlanes())
    this.syncPlanes()
    return () => {
      this.planes.delete(plane)
      if (this.planes.size === 0) {
        this.stopWatchingErrors?.()
        this.stopWatchingErrors = undefined
      }
    }
  }

  /**
   * The blocks chooseReader picks this node's replica for: in sync at a
   * local location that is not in the error state, and not being left.
   */
  localReadable (): RangeSet {
    const out = new RangeSet()
    for (const [location, st] of this.current.locations) {
      if (this.ctx.replicas.replicaFor(location)?.isLocal !== true || this.ctx.errors.isFailed(location)) continue
      const here = st.blocks.clone().removeSet(st.outOfSync)
      for (const l of this.leaving) if (l.location === location) here.removeSet(l.blocks)
      out.addSet(here)
    }
    return out.remove(Math.min(this.current.blockCount, Number.MAX_SAFE_INTEGER), Number.MAX_SAFE_INTEGER)
  }

  /** This node's location of the image, if it has one. */
  localLocation (): string | undefined {
    return this.localReplica()?.location
  }

  /** Tells every plane what it may read now; revocations take effect at once, their drains are kept. */
  private syncPlanes (): void {
    if (this.planes.size === 0) return
    const readable = this.localReadable()
    for (const plane of this.planes) {
      const drained = plane.update(readable, this.current.usedSize)
      if (drained === undefined) continue
      const tracked: Promise<void> = drained.catch(() => {}).finally(() => this.draining.delete(tracked))
      this.draining.add(tracked)
    }
  }

  /** Resolves once no plane has a read under way of a block revoked before this call. */
  async readsSettled (): Promise<void> {
    if (this.draining.size === 0) return
    await Promise.all([...this.draining])
  }

  /**
   * Stops reading `location`'s replica of blocks [start, end) before the
   * metadata that removes it is stored: the writer, wherever it runs,
   * stops writing that replica once it sees the change, and a read here
   * must never find it stale meanwhile. Writes still reach it. `removed`
   * says which revision removed it (the ranges are forgotten once this
   * volume has it); `cancel` undoes it when the removal failed.
   */
  leave (location: string, start: number, end: number): { removed: (revision: number) => void, cancel: () => void, drained: Promise<void> } {
    const entry: { location: string, blocks: RangeSet, until?: number } = { location, blocks: RangeSet.of(start, end) }
    this.leaving.push(entry)
    this.syncPlanes()
    return {
      removed: (revision) => {
        entry.until = revision
        this.refresh(this.current)
      },
      cancel: () => {
        const i = this.leaving.indexOf(entry)
        if (i >= 0) this.leaving.splice(i, 1)
        this.syncPlanes()
      },
      // Reads outside the volume (the native FUSE plane) of the range under way now.
      drained: this.readsSettled()
    }
  }

  private isLeaving (location: string, block: number): boolean {
    return this.leaving.some((l) => l.location === location && l.blocks.has(block))
  }

  /**
   * Registers an opener. A second writer on this node gets UKAI_ERR_BUSY;
   * readers are unlimited. Returns the function that ends the open; the
   * last writer's end gives the writer lease back.
   */
  open (write: boolean, who: string): () => Promise<void> {
    if (write) {
      if (this.writer !== undefined) {
        throw new UkaiError('UKAI_ERR_BUSY', `image '${this.name}' is already open for writing by ${this.writer}`, { image: this.name })
      }
      this.writer = who
    } else {
      this.readers++
    }
    let closed = false
    return async () => {
      if (closed) return
      closed = true
      if (!write) {
        this.readers--
        return
      }
      this.writer = undefined
      await this.releaseIfIdle()
    }
  }

  // ---- the writer lease ---------------------------------------------------

  private owner (s: WriterSession): LogOwner {
    return { guard: s.guard, until: () => this.ctx.cluster.changeDeadline() }
  }

  /**
   * Ends this volume's sessions older than `generation` (all, without
   * one): no write of them lands from now on. Returns each with the blocks
   * it cannot vouch for (undefined: none, see writer-lease.ts).
   */
  fenceSession (generation?: number): Array<{ session: string, unsafe: RangeSet | undefined }> {
    const pending = this.pendingFineBlocks()
    return this.lease.fence(generation).map((f) => ({ session: f.session, unsafe: f.unsafe?.addSet(pending) }))
  }

  private async releaseIfIdle (): Promise<void> {
    await this.lease.releaseIfIdle()
  }

  /**
   * Reconciles what a writer that died left in the dirty-block log, with
   * nobody writing the image: takes the lease for it and gives it back.
   * Returns the number of blocks reconciled.
   */
  async recover (): Promise<number> {
    this.syncs++
    const before = this.reconciled
    try {
      await this.lease.use('sync')
      return this.reconciled - before
    } finally {
      this.syncs--
      await this.releaseIfIdle()
    }
  }

  // ---- reads ------------------------------------------------------------------

  /**
   * Reads into `buf` from `offset`; bytes at or past used_size are not
   * read. Returns the number of bytes read.
   */
  async read (offset: number, buf: Buffer): Promise<number> {
    checkOffset(offset, buf.length)
    const pieces = splitRange(offset, buf.length, this.blockSize, this.usedSize)
    // Every piece done before a failure is thrown: the caller may reuse `buf` then.
    await allSettledOrThrow(pieces.map(async (p) => await this.readPiece(p, buf.subarray(p.bufferOffset, p.bufferOffset + p.length))))
    const n = pieces.reduce((a, p) => a + p.length, 0)
    this.stats.reads++
    this.stats.bytesRead += n
    return n
  }

  private async readPiece (p: Piece, out: Buffer): Promise<void> {
    const tried = new Set<string>()
    for (;;) {
      const replica = this.chooseReader(p.block, tried)
      if (replica === undefined) {
        throw new UkaiError('UKAI_ERR_UNAVAILABLE',
          `image '${this.name}' block ${p.block}: no in-sync location could be read (tried: ${[...tried].join(', ') || 'none reachable'})`,
          { image: this.name, block: p.block })
      }
      tried.add(replica.location)
      try {
        const started = performance.now()
        await replica.read(this.name, p.block, p.offset, out)
        this.stats.readsFrom[replica.location] = (this.stats.readsFrom[replica.location] ?? 0) + 1
        countReplicaIo(this.stats, replica, 'read', p.length, started)
        return
      } catch (err) {
        // A node that does not answer is skipped for a while; a replica
        // that answers with an error (a bad block file) only for this read.
        const f = failure(p.block, replica.location, replica, err)
        if (f.transport === true) this.ctx.errors.fail(replica.location, f.reason)
      }
    }
  }

  /**
   * An in-sync location of the block that is not in the error state nor
   * being left (leave): this node's first, then the remote one with the
   * lowest measured latency (one not measured yet counts as 0, so every
   * node gets measured).
   */
  chooseReader (block: number, tried: Set<string> = new Set()): Replica | undefined {
    let best: Replica | undefined
    for (const { location, inSync } of this.current.replicasOf(block)) {
      if (!inSync || tried.has(location) || this.ctx.errors.isFailed(location) || this.isLeaving(location, block)) continue
      const r = this.ctx.replicas.replicaFor(location)
      if (r === undefined) continue
      if (r.isLocal) return r
      if (best === undefined || (r.rtt ?? 0) < (best.rtt ?? 0)) best = r
    }
    return best
  }

  // ---- writes -----------------------------------------------------------------

  /**
   * Writes `data` at `offset`. Past used_size (up to size) the image grows;
   * past size is UKAI_ERR_NO_SPACE. `released` is called once nothing reads
   * `data` any more (the NBD server then reuses the buffer): only after a
   * write that every replica request took, since the fan-out waits for
   * every request to settle and a request that succeeded is done with its
   * bytes (a local one wrote them, a peer answered after receiving them
   * all). After any failure it is not called: a request that failed may
   * still have the bytes queued on a connection being closed.
   */
  async write (offset: number, data: Buffer, released?: () => void): Promise<void> {
    checkOffset(offset, data.length)
    if (offset + data.length > this.size) {
      throw new UkaiError('UKAI_ERR_NO_SPACE', `write of ${data.length} bytes at ${offset} passes the end of image '${this.name}' (${this.size} bytes)`)
    }
    if (data.length === 0) return
    let allTook = true
    await this.writeRange(offset, data.length, true, async (r, p, g) => {
      const started = performance.now()
      try {
        await r.write(this.name, p.block, p.offset, data.subarray(p.bufferOffset, p.bufferOffset + p.length), g)
      } catch (err) {
        allTook = false
        throw err
      }
      countReplicaIo(this.stats, r, 'write', p.length, started)
    })
    this.stats.writes++
    this.stats.bytesWritten += data.length
    if (allTook) released?.()
  }

  /**
   * Makes [offset, offset + length) read as zeros. With `mayFree` the space
   * may be given back (holes); without it the range stays allocated.
   */
  async zero (offset: number, length: number, mayFree = true): Promise<void> {
    await this.discardRange(offset, length, mayFree ? 'zero' : 'zero-allocated')
  }

  /** Discard: the range's contents become unspecified (space may be freed). */
  async trim (offset: number, length: number): Promise<void> {
    await this.discardRange(offset, length, 'trim')
  }

  private async discardRange (offset: number, length: number, mode: DiscardMode): Promise<void> {
    checkOffset(offset, length)
    if (offset + length > this.size) {
      throw new UkaiError('UKAI_ERR_NO_SPACE', `range of ${length} bytes at ${offset} passes the end of image '${this.name}' (${this.size} bytes)`)
    }
    if (length === 0) return
    await this.writeRange(offset, length, false, async (r, p, g) => await r.discard(this.name, p.block, p.offset, p.length, mode, g))
  }

  /**
   * The write path: the writer lease (taken before the range lock, since
   * taking it may reconcile blocks), the range lock, the session entered,
   * the dirty-block log, the fan-out, and (for a write, not a discard)
   * used_size grown.
   */
  private async writeRange (offset: number, length: number, grows: boolean, op: (r: Replica, p: Piece, generation: number) => Promise<void>): Promise<void> {
    const s = await this.lease.use(this.writer !== undefined ? 'write' : 'sync')
    await this.lock.with(offset, offset + length, async () => {
      // The wait for the range lock may have outlasted the lease: fail-stop.
      if (!this.ctx.cluster.leaseIsValid()) await this.ctx.cluster.leaseValid()
      const pieces = splitRange(offset, length, this.blockSize, this.size)
      for (const p of pieces) this.mirroredWrites.get(p.block)?.push({ seq: ++this.writeSeq, start: p.offset, end: p.offset + p.length })
      const end = s.begin(pieces.map((p) => p.block))
      try {
        await this.tracked(s, pieces, async () => await this.fanOut(s, pieces, async (r, p) => await op(r, p, s.generation)))
        if (grows) await this.growUsedSize(s, offset + length)
      } finally {
        end()
      }
    })
  }

  /**
   * Runs `op` for every piece on every in-sync location of its block, in
   * parallel. Failed locations are durably marked out of sync before this
   * returns; a piece that reached no location at all fails the call. A
   * replica that refuses the session's generation ends the session.
   */
  private async fanOut (s: WriterSession, pieces: Piece[], op: (r: Replica, p: Piece) => Promise<void>): Promise<void> {
    const failures: Failure[] = []
    const reached = new Map<number, number>()
    const jobs: Array<Promise<void>> = []
    let refused: UkaiError | undefined
    const wrote = (location: string, block: number): void => { this.unflushedAt(location).add(block, block + 1) }
    for (const p of pieces) {
      reached.set(p.block, 0)
      const inSyncHere = new Set<string>()
      const at = p.block * this.blockSize + p.offset
      const granules = granulesOf(at, at + p.length)
      for (const { location, inSync } of this.current.replicasOf(p.block)) {
        if (!inSync) {
          // A location this write misses: its fine record must learn of it.
          if (this.current.locations.get(location)?.fine.has(p.block) === true) addTo(this.pendingFine, location, granules)
          continue
        }
        inSyncHere.add(location)
        let written = this.unflushedGranules.get(location)
        if (written === undefined && !this.unflushedGranules.has(location)) {
          written = new UnflushedGranules(MAX_UNFLUSHED_RANGES)
          this.unflushedGranules.set(location, written)
        }
        if (written !== undefined && !written.add(p.block, granules)) this.unflushedGranules.set(location, undefined)
        const r = this.ctx.errors.isFailed(location) ? undefined : this.ctx.replicas.replicaFor(location)
        if (r === undefined) {
          failures.push({ ...failure(p.block, location, undefined, undefined), granules })
          continue
        }
        jobs.push(op(r, p).then(() => {
          reached.set(p.block, reached.get(p.block)! + 1)
          wrote(location, p.block)
        }, (err) => {
          const f = failure(p.block, location, r, err)
          if (f.fenced === true) refused = toUkaiError(err)
          else failures.push({ ...f, granules })
        }))
      }
      // Replicas being resynced get the write too; one they miss is not
      // marked in sync by that resync (they are out of sync already).
      for (const location of this.mirrored.get(p.block)?.keys() ?? []) {
        if (inSyncHere.has(location)) continue
        const missed = (): void => {
          let set = this.mirrorFailures.get(p.block)
          if (set === undefined) { set = new Set(); this.mirrorFailures.set(p.block, set) }
          set.add(location)
        }
        const r = this.ctx.replicas.replicaFor(location)
        if (r === undefined) { missed(); continue }
        jobs.push(op(r, p).then(() => wrote(location, p.block), (err) => {
          const f = failure(p.block, location, r, err)
          if (f.fenced === true) refused = toUkaiError(err)
          else {
            missed()
            if (f.transport === true) this.ctx.errors.fail(location, f.reason)
          }
        }))
      }
    }
    await Promise.all(jobs)
    if (refused !== undefined) {
      // Another node holds the lease now: nothing of this session may
      // mark anything, and its blocks are the new holder's to reconcile.
      s.fence()
      throw refused
    }
    const lost = [...reached].filter(([, n]) => n === 0).map(([b]) => b)
    // Where some in-sync location took the write, the ones that did not
    // are marked out of sync; where none did, nothing is (below).
    await this.recordFailures(s, failures.filter((f) => !lost.includes(f.block)))
    if (lost.length > 0) {
      // No in-sync location took the write: it fails, and the block keeps
      // its state (its last copies are not given up for a write that was
      // never acknowledged). Copies that may now differ (a write that
      // failed half way) are settled: one keeps the block, the others are
      // marked out of sync.
      await this.settleUnwritten(s, lost).catch(() => {})
      const mine = failures.filter((f) => lost.includes(f.block))
      const codes = new Set(mine.map((f) => f.code))
      const noSpace = codes.size === 1 && codes.has('UKAI_ERR_NO_SPACE')
      throw new UkaiError(noSpace ? 'UKAI_ERR_NO_SPACE' : 'UKAI_ERR_UNAVAILABLE',
        `image '${this.name}': no in-sync location of block ${lost[0]} took the write (${mine.map((f) => `${f.location}: ${f.reason}`).join('; ')})`,
        { image: this.name, block: lost[0] })
    }
  }

  /**
   * Blocks a write reached on none of their in-sync locations: with two or
   * more, the copies may differ now (written half way); all but the one
   * reads would prefer are marked out of sync.
   */
  private async settleUnwritten (s: WriterSession, blocks: number[]): Promise<void> {
    // The copy to keep is chosen now; what is dropped is decided on the
    // stored state itself, in the update: concurrent settlements (and
    // marks) of one block then always leave one in-sync copy, even when
    // they would have kept different ones.
    if (!blocks.some((b) => this.current.replicasOf(b).filter((r) => r.inSync).length >= 2)) return
    const preferred = new Map<number, string | undefined>()
    for (const b of blocks) preferred.set(b, this.chooseReader(b)?.location)
    let dropped = false
    await this.update(s, (meta) => {
      dropped = false
      for (const b of blocks) {
        const inSync = meta.replicasOf(b).filter((r) => r.inSync)
        if (inSync.length < 2) continue
        const want = preferred.get(b)
        const keep = inSync.some((r) => r.location === want) ? want! : inSync[0]!.location
        for (const r of inSync) {
          if (r.location === keep) continue
          meta.setSync(r.location, b, b + 1, false)
          dropped = true
        }
      }
      return meta
    })
    if (dropped) await this.ctx.cluster.publish(this.name, this.current.revision)
  }

  /**
   * Durably marks failed locations out of sync for what they missed (as
   * this session's change), puts the ones that did not answer in the error
   * state, and waits until every node that has the image open has seen the
   * marks. A location that did not answer may have died and lost what it
   * had not flushed: those blocks go too. A block is never marked out of
   * sync on its last in-sync location; such failures are returned.
   */
  private async recordFailures (s: WriterSession, failures: Failure[]): Promise<Failure[]> {
    if (failures.length === 0) return []
    // Per location and block, the granules it may differ in (undefined: not known, the block is copied whole).
    const lost = new Map<string, Map<number, RangeSet | undefined>>()
    for (const f of failures) {
      if (f.transport === true) this.ctx.errors.fail(f.location, f.reason)
      let blocks = lost.get(f.location)
      if (blocks === undefined) {
        blocks = new Map()
        lost.set(f.location, blocks)
        if (f.transport === true) {
          const written = this.unflushedGranules.get(f.location)
          for (const b of this.unflushed.get(f.location)?.values() ?? []) {
            blocks.set(b, written === undefined || !this.current.fineGrained ? undefined : written.of(b))
          }
        }
      }
      const mine = f.granules === undefined ? undefined : RangeSet.of(f.granules[0], f.granules[1])
      if (!blocks.has(f.block)) blocks.set(f.block, mine)
      else {
        const had = blocks.get(f.block)
        blocks.set(f.block, had === undefined || mine === undefined ? undefined : had.addSet(mine))
      }
    }
    const failedAt = (location: string, b: number): boolean => lost.get(location)?.has(b) === true
    const kept: Failure[] = []
    let marked = false
    await this.update(s, (meta) => {
      kept.length = 0
      marked = false
      for (const [location, blocks] of lost) {
        for (const [b, changed] of blocks) {
          const others = meta.replicasOf(b).some((r) => r.inSync && r.location !== location && !failedAt(r.location, b))
          if (others) {
            meta.markOutOfSync(location, b, changed)
            marked = true
          } else {
            const f = failures.find((x) => x.location === location && x.block === b)
            if (f !== undefined) kept.push(f)
          }
        }
      }
      return meta
    })
    // Only once the marks are durable are the unflushed blocks forgotten.
    for (const [location, blocks] of lost) {
      for (const b of blocks.keys()) {
        this.unflushed.get(location)?.remove(b, b + 1)
        this.unflushedGranules.get(location)?.drop(b)
      }
    }
    if (marked) await this.ctx.cluster.publish(this.name, this.current.revision)
    return kept
  }

  /** Blocks with granules in pendingFine. */
  private pendingFineBlocks (): RangeSet {
    const per = this.blockSize / GRANULE
    const out = new RangeSet()
    for (const set of this.pendingFine.values()) {
      for (const [s, e] of set.ranges()) out.add(Math.floor(s / per), Math.ceil(e / per))
    }
    return out
  }

  /**
   * Stores pendingFine in the fine records, as the session's change;
   * what was stored leaves pendingFine once durable (a fence meanwhile
   * still counts it unsafe).
   */
  private async storeFine (s: WriterSession): Promise<void> {
    if (this.pendingFine.size === 0) return
    const taken = [...this.pendingFine].map(([loc, set]) => [loc, set.clone()] as const)
    await this.update(s, (meta) => {
      for (const [loc, set] of taken) meta.addChanged(loc, set)
      return meta
    })
    for (const [loc, set] of taken) {
      const now = this.pendingFine.get(loc)
      if (now === undefined) continue
      now.removeSet(set)
      if (now.isEmpty) this.pendingFine.delete(loc)
    }
  }

  /** Granules in pendingFine, all locations together. */
  private pendingFineRanges (): number {
    let n = 0
    for (const set of this.pendingFine.values()) n += set.rangeCount
    return n
  }

  /** A metadata change of the session: guarded by its lease; a refusal ends the session. */
  private async update (s: WriterSession, change: (meta: ImageMeta) => ImageMeta): Promise<void> {
    try {
      this.current = await this.ctx.store.update(this.name, change, { guard: s.guard, until: this.ctx.cluster.changeDeadline() })
    } catch (err) {
      if (toUkaiError(err).code === 'UKAI_ERR_FENCED') s.fence()
      throw err
    }
    // A block this change makes unreadable here (marked out of sync) is
    // revoked from the planes now, and the change returns (the write it
    // records is acknowledged) only once no read of it is under way.
    this.syncPlanes()
    await this.readsSettled()
  }

  /**
   * Runs a write-like operation with its blocks in the dirty-block log. A
   * block with one in-sync location cannot diverge and is not logged, so
   * single-replica images pay nothing.
   */
  private async tracked<T> (s: WriterSession, pieces: Piece[], fn: () => Promise<T>): Promise<T> {
    const blocks = pieces.map((p) => p.block).filter((b) => this.inSyncCount(b) > 1 || this.hasFine(b))
    if (blocks.length === 0) return await fn()
    try {
      return await this.dirty.around(this.owner(s), blocks, fn)
    } catch (err) {
      if (toUkaiError(err).code === 'UKAI_ERR_FENCED') s.fence()
      throw err
    }
  }

  /** True when some location keeps a fine record of the block (its writes must be remembered: see pendingFine). */
  private hasFine (block: number): boolean {
    for (const st of this.current.locations.values()) if (st.fine.has(block)) return true
    return false
  }

  private inSyncCount (block: number): number {
    let n = 0
    for (const r of this.current.replicasOf(block)) if (r.inSync) n++
    return n
  }

  private async growUsedSize (s: WriterSession, end: number): Promise<void> {
    if (end <= this.current.usedSize) return
    await this.update(s, (meta) => {
      meta.usedSize = Math.max(meta.usedSize, end)
      return meta
    })
  }

  // ---- reconciliation and resync --------------------------------------------------

  /**
   * Reconciles `blocks` (what a writer may have left different between
   * replicas): for each, one in-sync replica (this node's first) is copied
   * to the other in-sync ones; a replica that cannot be written is marked
   * out of sync instead. Afterwards no two in-sync replicas of those
   * blocks differ.
   */
  private async reconcile (s: WriterSession, blocks: RangeSet): Promise<void> {
    // A writer that died may have written what fine records of these
    // blocks do not hold: they are copied whole from now on.
    if ([...blocks.ranges()].some(([b, e]) => [...this.current.locations.values()].some((st) => st.fine.overlaps(b, e)))) {
      await this.update(s, (meta) => {
        for (const [b, e] of blocks.ranges()) meta.dropFine(undefined, b, e)
        return meta
      })
    }
    for (const block of [...blocks.values()]) {
      if (block >= this.current.blockCount) { s.unsafe.remove(block, block + 1); continue }
      const start = block * this.blockSize
      await this.lock.with(start, start + this.current.blockLength(block), async () => {
        const inSync = this.current.replicasOf(block).filter((r) => r.inSync).map((r) => r.location)
        const source = inSync.length < 2 ? undefined : this.chooseReader(block)
        if (source !== undefined) {
          const end = s.begin([block])
          try {
            const failed = await copyBlock(this.copyContext(s), block, source, inSync.filter((l) => l !== source.location))
            if (failed.some((f) => f.fenced === true)) { s.fence(); s.check() }
            await this.recordFailures(s, failed)
          } finally { end() }
        }
        s.unsafe.remove(block, block + 1)
      })
    }
    const n = blocks.size
    if (n > 0) this.reconciled += n
  }

  /** Blocks reconciled by this volume since it opened (for the node's warning). */
  reconciled = 0

  private copyContext (s: WriterSession): CopyContext {
    return { image: this.name, meta: this.current, replicas: this.ctx.replicas, generation: s.generation }
  }

  /**
   * Brings every out-of-sync replica of blocks [start, end) back in sync
   * from an in-sync one while the image stays in use (resync.ts). Runs as
   * the image's writer: on the node that writes it, or taking the lease
   * for itself when nobody does.
   */
  async sync (start: number, end: number, onProgress?: (p: SyncProgress) => void, options: { rate?: number, signal?: AbortSignal } = {}): Promise<SyncProgress> {
    const count = this.current.blockCount
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end > count || start > end) {
      throw new UkaiError('UKAI_ERR_OUT_OF_RANGE', `block range [${start}, ${end}) is not within the image's ${count} blocks`)
    }
    this.syncs++
    try {
      const s = await this.lease.use(this.writer !== undefined ? 'write' : 'sync')
      return await syncBlocks({
        image: this.name,
        replicas: this.ctx.replicas,
        generation: s.generation,
        ...(options.rate !== undefined || options.signal !== undefined ? { pace: stoppablePace(options.rate, options.signal) } : {}),
        meta: () => this.current,
        lock: this.lock,
        errors: this.ctx.errors,
        chooseSource: (block) => this.chooseReader(block),
        begin: (blocks) => s.begin(blocks),
        mirror: (block, targets) => this.mirror(block, targets),
        mirrorFailed: (block) => this.mirrorFailures.get(block) ?? new Set(),
        writeMark: () => this.writeSeq,
        writing: () => this.writer !== undefined,
        writtenSince: (block, mark) => {
          const out = new RangeSet()
          for (const w of this.mirroredWrites.get(block) ?? []) if (w.seq > mark) out.add(w.start, w.end)
          return out
        },
        changedIn: (block, targets) => this.changedIn(block, targets),
        // Blocks about to have two in-sync copies while the image is
        // written are logged first, all at once (before their locks are
        // taken): otherwise the first write to each waits for a metadata
        // write of its own.
        beforeMark: async (blocks) => {
          if (this.writer !== undefined) await this.dirty.add(this.owner(s), blocks)
        },
        markInSync: async (done) => {
          await this.update(s, (meta) => {
            for (const c of done) for (const loc of c.targets) meta.setSync(loc, c.block, c.block + 1, true)
            return meta
          })
          for (const c of done) for (const loc of c.targets) this.pendingFine.get(loc)?.remove(...this.current.blockGranules(c.block))
        },
        fenced: () => { s.fence(); return fenced(this.name) }
      }, start, end, onProgress)
    } finally {
      this.syncs--
      await this.releaseIfIdle()
    }
  }

  /**
   * The byte ranges of `block` (offsets in it) that `targets` may differ
   * in: their fine records and what is pending for them; undefined when
   * one of them has none (the block is copied whole).
   */
  private changedIn (block: number, targets: string[]): RangeSet | undefined {
    const granules = this.current.changedIn(block, targets)
    if (granules === undefined) return undefined
    const [g0, g1] = this.current.blockGranules(block)
    for (const t of targets) for (const [s, e] of this.pendingFine.get(t)?.within(g0, g1) ?? []) granules.add(s, e)
    const base = block * this.blockSize
    const out = new RangeSet()
    for (const [s, e] of granules.ranges()) out.add(s * GRANULE - base, Math.min(e * GRANULE - base, this.current.blockLength(block)))
    return out
  }

  /** The blocks written to `location` since its last flush (made empty when there are none). */
  private unflushedAt (location: string): RangeSet {
    let set = this.unflushed.get(location)
    if (set === undefined) { set = new RangeSet(); this.unflushed.set(location, set) }
    return set
  }

  /** Writes to `block` reach `targets` too until the returned function is called (see resync.ts). */
  private mirror (block: number, targets: string[]): () => void {
    let m = this.mirrored.get(block)
    if (m === undefined) { m = new Map(); this.mirrored.set(block, m); this.mirroredWrites.set(block, []) }
    for (const t of targets) m.set(t, (m.get(t) ?? 0) + 1)
    let ended = false
    return () => {
      if (ended) return
      ended = true
      const now = this.mirrored.get(block)
      if (now === undefined) return
      for (const t of targets) {
        const n = (now.get(t) ?? 1) - 1
        if (n === 0) now.delete(t)
        else now.set(t, n)
      }
      if (now.size === 0) {
        this.mirrored.delete(block)
        this.mirrorFailures.delete(block)
        this.mirroredWrites.delete(block)
      }
    }
  }

  // ---- flush, truncate, extents -------------------------------------------------

  /**
   * Flushes every location written since its last flush. A location that
   * fails to flush is marked out of sync for the blocks it may have lost.
   */
  async flush (): Promise<void> {
    // A flush covers every write acknowledged before it began, including
    // writes whose sync an earlier flush has taken over (it cleared
    // `unflushed` and the block files' dirty marks) and not finished yet:
    // wait for those flushes too, or this one could answer first.
    const earlier = [...this.flushing]
    const own = this.flushOnce()
    this.flushing.add(own)
    try {
      await Promise.all([own, ...earlier])
    } finally {
      this.flushing.delete(own)
    }
  }

  private async flushOnce (): Promise<void> {
    // Writes that start from here on, or were in flight now, may not be
    // covered by this flush: their blocks stay in the dirty-block log.
    const mark = this.dirty.markFlush()
    const pending = [...this.unflushed]
    this.unflushed.clear()
    for (const [location] of pending) this.unflushedGranules.delete(location)
    const failures: Failure[] = this.unrecorded
    this.unrecorded = []
    await Promise.all(pending.map(async ([location, blocks]) => {
      const r = this.ctx.replicas.replicaFor(location)
      try {
        if (r === undefined) throw new Error('location unreachable')
        await r.flush(this.name)
      } catch (err) {
        for (const b of blocks.values()) failures.push(failure(b, location, r, err, 'flush failed: '))
      }
    }))
    const s = this.lease.current
    let recorded = false
    try {
      // Local block files are synced even when nothing was written through
      // this volume since it opened: an fsync must cover earlier writers too.
      const local = this.localReplica()
      if (local !== undefined && !pending.some(([l]) => l === local.location)) await local.flush(this.name)
      if (failures.length > 0) {
        // Only a writer flushes what it wrote; without its lease it can mark nothing.
        if (s === undefined) throw new UkaiError('UKAI_ERR_FENCED', `image '${this.name}': a flush failed and this node no longer writes the image`)
        const kept = await this.recordFailures(s, failures)
        recorded = true
        if (kept.length > 0) {
          throw new UkaiError('UKAI_ERR_IO', `image '${this.name}': the only in-sync copy of block ${kept[0]!.block} could not be flushed (${kept[0]!.reason}); what it held may be lost`,
            { image: this.name, block: kept[0]!.block })
        }
      }
    } catch (err) {
      // Not recorded: the next flush records these first, whatever the
      // replicas answer then (a peer that lost writes may answer well).
      if (!recorded) this.unrecorded.push(...failures)
      else {
        // A sole copy that could not be synced: its flush is tried (and fails) again.
        for (const [location, blocks] of pending) {
          if (!failures.some((f) => f.location === location)) continue
          this.unflushedAt(location).addSet(blocks)
        }
      }
      throw err
    }
    // The dirty-block log is an activity log: hot blocks stay in it, so a
    // steady writer does not pay a metadata write per flush.
    if (s?.held === true) {
      // Blocks leave the log only once their fine records are stored.
      if (this.dirty.size > DIRTY_KEEP || this.pendingFineRanges() > PENDING_FINE_RANGES) await this.storeFine(s)
      await this.dirty.trim(this.owner(s), DIRTY_KEEP, mark)
    }
  }

  private localReplica (): Replica | undefined {
    for (const loc of this.current.locations.keys()) {
      const r = this.ctx.replicas.replicaFor(loc)
      if (r?.isLocal === true) return r
    }
    return undefined
  }

  /**
   * Shrinks used_size (growth is refused: the image grows by writing). The
   * bytes past the new end are zeroed first, so a later growth reads zeros.
   */
  async truncate (newSize: number): Promise<void> {
    checkOffset(newSize, 0)
    const old = this.usedSize
    if (newSize === old) return
    if (newSize > old) {
      throw new UkaiError('UKAI_ERR_PERMISSION', `image '${this.name}': truncate may only shrink used_size (${old}), not grow it to ${newSize}`)
    }
    await this.zero(newSize, old - newSize, true)
    const s = await this.lease.use('write')
    await this.update(s, (meta) => {
      meta.usedSize = Math.min(meta.usedSize, newSize)
      return meta
    })
  }

  /**
   * True when zero(offset, length, true) would write no data: every block
   * store punches a hole for it (block-store.ts), so it always is. Serves
   * NBD_CMD_FLAG_FAST_ZERO.
   */
  async zeroIsFast (offset: number, length: number): Promise<boolean> {
    checkOffset(offset, length)
    return true
  }

  /**
   * Allocation of [offset, offset + length) as extents, from the local
   * replica's block files (their data extents). Without a local in-sync
   * replica everything is reported as data (always safe).
   */
  async extents (offset: number, length: number): Promise<Extent[]> {
    checkOffset(offset, length)
    const pieces = splitRange(offset, length, this.blockSize, this.usedSize)
    const local = this.localReplica()
    const out: Extent[] = []
    const push = (off: number, len: number, hole: boolean): void => {
      if (len <= 0) return
      const last = out[out.length - 1]
      if (last !== undefined && last.hole === hole && last.offset + last.length === off) last.length += len
      else out.push({ offset: off, length: len, hole, zero: hole })
    }
    for (const p of pieces) {
      const base = offset + p.bufferOffset - p.offset
      const inSyncHere = local !== undefined && !this.isLeaving(local.location, p.block) &&
        this.current.replicasOf(p.block).some((r) => r.location === local.location && r.inSync)
      if (!inSyncHere) { push(base + p.offset, p.length, false); continue }
      let at = p.offset
      for (const [s, e] of await local.dataExtents(this.name, p.block, p.offset, p.offset + p.length)) {
        push(base + at, s - at, true)
        push(base + s, e - s, false)
        at = e
      }
      push(base + at, p.offset + p.length - at, true)
    }
    return out
  }

  /** Ends the volume (the node closes): everything flushed, the lease given back. */
  async close (): Promise<void> {
    this.writer = undefined
    this.syncs = 0
    await this.releaseIfIdle()
  }
}

/** Blocks the dirty-block log may keep after a flush before it is trimmed. */
const DIRTY_KEEP = 64
/** Ranges of granules pendingFine may hold before a flush stores them. */
const PENDING_FINE_RANGES = 4096
/** Ranges of granules kept per location in unflushedGranules. */
const MAX_UNFLUSHED_RANGES = 65536

/** Adds `range` to the set of `key` (made when missing); returns the set. */
function addTo (map: Map<string, RangeSet>, key: string, [s, e]: [number, number]): RangeSet {
  let set = map.get(key)
  if (set === undefined) { set = new RangeSet(); map.set(key, set) }
  return set.add(s, e)
}

/**
 * A copy's pace (CopyContext.pace): the rate's, and a stop once `signal`
 * is aborted (the copy rejects with its reason, between two chunks, never
 * inside one's lock).
 */
function stoppablePace (rate: number | undefined, signal: AbortSignal | undefined): (bytes: number) => Promise<void> {
  const pace = rate === undefined ? undefined : pacer(rate)
  return async (bytes) => {
    signal?.throwIfAborted()
    await pace?.(bytes)
    signal?.throwIfAborted()
  }
}

export function newIoStats (): IoStats {
  return { reads: 0, writes: 0, bytesRead: 0, bytesWritten: 0, readsFrom: {}, replicas: {}, served: { reads: 0, readBytes: 0, writes: 0, writtenBytes: 0, statusRequests: 0 } }
}

/** Counts one replica request that succeeded, `started` its performance.now() (the node's metrics). */
function countReplicaIo (stats: IoStats, replica: Replica, op: 'read' | 'write', bytes: number, started: number): void {
  const seconds = (performance.now() - started) / 1000
  const io = stats.replicas[replica.location] ??= { local: replica.isLocal, reads: 0, readBytes: 0, readSeconds: 0, writes: 0, writtenBytes: 0, writeSeconds: 0 }
  if (op === 'read') { io.reads++; io.readBytes += bytes; io.readSeconds += seconds } else { io.writes++; io.writtenBytes += bytes; io.writeSeconds += seconds }
  stats.observe?.(replica.location, op, seconds)
}

function checkOffset (offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new UkaiError('UKAI_ERR_OUT_OF_RANGE', `invalid range: offset ${offset}, length ${length}`)
  }
}
