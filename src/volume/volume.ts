/**
 * Volume: one open image. Every data-path rule lives here, and both
 * frontends (FUSE, NBD) go through it:
 *
 * - reads are served only from a location in sync for the block, the
 *   local one first; a failing location is put in the error state, marked
 *   out of sync, and the next one is tried (invariant 1);
 * - writes go to every in-sync location of every touched block in
 *   parallel and are acknowledged only when each has the data or has been
 *   durably marked out of sync first (invariant 2). A location already
 *   out of sync is not written: it stays out of sync until `ukai sync`
 *   copies the whole block, so the hot path never copies blocks;
 * - overlapping writes are ordered by a range lock, so every replica sees
 *   them in the same order;
 * - one writer per image on this node; readers are unlimited.
 */
import { UkaiError, toUkaiError } from '../errors.js'
import type { ImageMeta } from '../metadata/image.js'
import type { MetadataStore } from '../metadata/store.js'
import { RangeSet } from '../metadata/range-set.js'
import type { DiscardMode, Replica, ReplicaProvider } from '../replica/replica.js'
import { splitRange, type Piece } from './block-math.js'
import type { NodeErrors } from './node-errors.js'
import { DirtyLog } from './dirty-log.js'
import { RangeLock } from './range-lock.js'

export interface Extent {
  offset: number
  length: number
  /** True when the range is not allocated (a hole). */
  hole: boolean
  /** True when the range reads as zeros. */
  zero: boolean
}

export interface VolumeContext {
  store: MetadataStore
  replicas: ReplicaProvider
  errors: NodeErrors
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
}

interface Failure { block: number, location: string, reason: string }

export class Volume {
  readonly name: string
  private current: ImageMeta
  private readonly ctx: VolumeContext
  private readonly lock = new RangeLock()
  private writer: string | undefined
  private readers = 0
  /** Blocks written per location since that location's last flush. */
  private readonly unflushed = new Map<string, RangeSet>()
  /** Flushes in progress (see flush). */
  private readonly flushing = new Set<Promise<void>>()
  private readonly dirty: DirtyLog
  readonly stats: IoStats

  constructor (meta: ImageMeta, ctx: VolumeContext) {
    this.name = meta.name
    this.current = meta
    this.ctx = ctx
    this.dirty = new DirtyLog(ctx.store, meta.name)
    this.stats = ctx.stats ?? newIoStats()
  }

  get meta (): ImageMeta { return this.current }
  get size (): number { return this.current.size }
  get usedSize (): number { return this.current.usedSize }
  get blockSize (): number { return this.current.blockSize }
  get hasWriter (): boolean { return this.writer !== undefined }
  get openCount (): number { return this.readers + (this.writer === undefined ? 0 : 1) }

  /** Takes newer metadata from the store (a change made elsewhere). */
  refresh (meta: ImageMeta): void {
    if (meta.generation >= this.current.generation) this.current = meta
  }

  /**
   * Registers an opener. A second writer on this node gets UKAI_ERR_BUSY;
   * readers are unlimited. Returns the function that ends the open.
   */
  open (write: boolean, who: string): () => void {
    if (write) {
      if (this.writer !== undefined) {
        throw new UkaiError('UKAI_ERR_BUSY', `image '${this.name}' is already open for writing by ${this.writer}`, { image: this.name })
      }
      this.writer = who
    } else {
      this.readers++
    }
    let closed = false
    return () => {
      if (closed) return
      closed = true
      if (write) this.writer = undefined
      else this.readers--
    }
  }

  /**
   * Reads into `buf` from `offset`; bytes at or past used_size are not
   * read. Returns the number of bytes read.
   */
  async read (offset: number, buf: Buffer): Promise<number> {
    checkOffset(offset, buf.length)
    const pieces = splitRange(offset, buf.length, this.blockSize, this.usedSize)
    await Promise.all(pieces.map(async (p) => await this.readPiece(p, buf.subarray(p.bufferOffset, p.bufferOffset + p.length))))
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
        await replica.read(this.name, p.block, p.offset, out)
        this.stats.readsFrom[replica.location] = (this.stats.readsFrom[replica.location] ?? 0) + 1
        return
      } catch (err) {
        await this.recordFailures([{ block: p.block, location: replica.location, reason: toUkaiError(err).message }])
      }
    }
  }

  /**
   * An in-sync location of the block that is not in the error state: this
   * node's first, then the remote one with the lowest measured latency
   * (one not measured yet counts as 0, so every node gets measured).
   */
  private chooseReader (block: number, tried: Set<string>): Replica | undefined {
    let best: Replica | undefined
    for (const { location, inSync } of this.current.replicasOf(block)) {
      if (!inSync || tried.has(location) || this.ctx.errors.isFailed(location)) continue
      const r = this.ctx.replicas.replicaFor(location)
      if (r === undefined) continue
      if (r.isLocal) return r
      if (best === undefined || (r.rtt ?? 0) < (best.rtt ?? 0)) best = r
    }
    return best
  }

  /**
   * Writes `data` at `offset`. Past used_size (up to size) the image grows;
   * past size is UKAI_ERR_NO_SPACE.
   */
  async write (offset: number, data: Buffer): Promise<void> {
    checkOffset(offset, data.length)
    if (offset + data.length > this.size) {
      throw new UkaiError('UKAI_ERR_NO_SPACE', `write of ${data.length} bytes at ${offset} passes the end of image '${this.name}' (${this.size} bytes)`)
    }
    if (data.length === 0) return
    await this.lock.with(offset, offset + data.length, async () => {
      const pieces = splitRange(offset, data.length, this.blockSize, this.size)
      await this.tracked(pieces, async () => await this.fanOut(pieces, async (r, p) =>
        await r.write(this.name, p.block, p.offset, data.subarray(p.bufferOffset, p.bufferOffset + p.length))))
      await this.growUsedSize(offset + data.length)
    })
    this.stats.writes++
    this.stats.bytesWritten += data.length
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
    await this.lock.with(offset, offset + length, async () => {
      const pieces = splitRange(offset, length, this.blockSize, this.size)
      await this.tracked(pieces, async () => await this.fanOut(pieces, async (r, p) => await r.discard(this.name, p.block, p.offset, p.length, mode)))
    })
  }

  /**
   * Runs `op` for every piece on every in-sync location of its block, in
   * parallel. Failed locations are durably marked out of sync before this
   * returns; a piece that reached no location at all fails the call.
   */
  private async fanOut (pieces: Piece[], op: (r: Replica, p: Piece) => Promise<void>): Promise<void> {
    const failures: Failure[] = []
    const reached = new Map<number, number>()
    const jobs: Array<Promise<void>> = []
    for (const p of pieces) {
      reached.set(p.block, 0)
      for (const { location, inSync } of this.current.replicasOf(p.block)) {
        if (!inSync) continue
        const r = this.ctx.errors.isFailed(location) ? undefined : this.ctx.replicas.replicaFor(location)
        if (r === undefined) {
          failures.push({ block: p.block, location, reason: 'location unreachable or in the error state' })
          continue
        }
        jobs.push(op(r, p).then(() => {
          reached.set(p.block, reached.get(p.block)! + 1)
          let set = this.unflushed.get(location)
          if (set === undefined) { set = new RangeSet(); this.unflushed.set(location, set) }
          set.add(p.block, p.block + 1)
        }, (err) => {
          failures.push({ block: p.block, location, reason: toUkaiError(err).message })
        }))
      }
    }
    await Promise.all(jobs)
    const lost = [...reached].filter(([, n]) => n === 0).map(([b]) => b)
    if (lost.length > 0) {
      // Nothing has the data: the write fails. Locations that did not get
      // it are still marked, they may hold part of it.
      await this.recordFailures(failures).catch(() => {})
      throw new UkaiError('UKAI_ERR_UNAVAILABLE',
        `image '${this.name}': no in-sync location of block ${lost[0]} took the write (${failures.map((f) => `${f.location}: ${f.reason}`).join('; ')})`,
        { image: this.name, block: lost[0] })
    }
    await this.recordFailures(failures)
  }

  /** Puts failed locations in the error state and durably marks their blocks out of sync. */
  private async recordFailures (failures: Failure[]): Promise<void> {
    if (failures.length === 0) return
    // A location that failed may also have lost what it had not flushed
    // yet (a node that died loses its page cache): those blocks go too.
    const lost = new Map<string, RangeSet>()
    for (const f of failures) {
      this.ctx.errors.fail(f.location, f.reason)
      let set = lost.get(f.location)
      if (set === undefined) {
        set = this.unflushed.get(f.location) ?? new RangeSet()
        this.unflushed.delete(f.location)
        lost.set(f.location, set)
      }
      set.add(f.block, f.block + 1)
    }
    this.current = await this.ctx.store.update(this.name, (meta) => {
      for (const [location, blocks] of lost) {
        for (const [s, e] of blocks.ranges()) meta.setSync(location, s, e, false)
      }
      return meta
    })
  }

  /**
   * Runs a write-like operation with its blocks in the dirty-block log. A
   * block with one in-sync location cannot diverge and is not logged, so
   * single-replica images pay nothing.
   */
  private async tracked<T> (pieces: Piece[], fn: () => Promise<T>): Promise<T> {
    const blocks = pieces.map((p) => p.block).filter((b) => this.inSyncCount(b) > 1)
    return blocks.length === 0 ? await fn() : await this.dirty.around(blocks, fn)
  }

  private inSyncCount (block: number): number {
    let n = 0
    for (const r of this.current.replicasOf(block)) if (r.inSync) n++
    return n
  }

  /** Empties the dirty-block log; for the last close, after a flush. */
  async trimDirtyLog (): Promise<void> {
    await this.dirty.trim(0)
  }

  /**
   * Reconciles the blocks a writer left in the dirty-block log: for each,
   * one in-sync replica (this node's first) is copied to the other in-sync
   * ones; a replica that cannot be written is marked out of sync instead.
   * Afterwards no two in-sync replicas of those blocks differ.
   */
  async reconcile (): Promise<number> {
    const logged = await this.dirty.load()
    if (logged.isEmpty) return 0
    let copied = 0
    for (const block of logged.values()) {
      if (block >= this.current.blockCount) continue
      const start = block * this.blockSize
      await this.lock.with(start, start + this.current.blockLength(block), async () => {
        const inSync = this.current.replicasOf(block).filter((r) => r.inSync).map((r) => r.location)
        if (inSync.length < 2) return
        const source = this.pickSource(block)
        if (source === undefined) return
        const targets = inSync.filter((l) => l !== source.location)
        const failed = await this.copyBlock(block, source, targets)
        if (failed.length > 0) await this.recordFailures(failed)
        copied++
      })
    }
    await this.dirty.clear()
    return copied
  }

  /** An in-sync, reachable source for copying a block: this node first. */
  private pickSource (block: number): Replica | undefined {
    return this.chooseReader(block, new Set())
  }

  /**
   * Copies block `block` from `source` to `targets` so they end byte-for-
   * byte equal (holes stay holes past the source's allocated length), and
   * flushes the targets unless `flush` is false (the caller flushes a batch).
   * Returns the targets that failed.
   */
  private async copyBlock (block: number, source: Replica, targets: string[], onBytes?: (n: number) => void, flush = true): Promise<Failure[]> {
    const failures: Failure[] = []
    const live = new Map<string, Replica>()
    for (const t of targets) {
      const r = this.ctx.replicas.replicaFor(t)
      if (r === undefined) failures.push({ block, location: t, reason: 'location unreachable' })
      else live.set(t, r)
    }
    if (live.size === 0) return failures
    const length = this.current.blockLength(block)
    const allocated = Math.min(length, await source.allocatedLength(this.name, block))
    const fail = (location: string, err: unknown): void => {
      live.delete(location)
      failures.push({ block, location, reason: toUkaiError(err).message })
    }
    // Read the next chunk while the previous one is being written.
    let next: Promise<Buffer> | undefined
    const readChunk = async (off: number): Promise<Buffer> => {
      const buf = Buffer.allocUnsafe(Math.min(COPY_CHUNK, allocated - off))
      await source.read(this.name, block, off, buf)
      return buf
    }
    if (allocated > 0) next = readChunk(0)
    for (let off = 0; off < allocated; off += COPY_CHUNK) {
      const buf = await next!
      next = off + COPY_CHUNK < allocated ? readChunk(off + COPY_CHUNK) : undefined
      await Promise.all([...live].map(async ([loc, r]) => await r.write(this.name, block, off, buf).catch((err) => fail(loc, err))))
      onBytes?.(buf.length)
    }
    await Promise.all([...live].map(async ([loc, r]) => {
      try {
        if (allocated < length) await r.discard(this.name, block, allocated, length - allocated, 'zero')
        if (flush) await r.flush(this.name)
      } catch (err) { fail(loc, err) }
    }))
    return failures
  }

  /**
   * Brings every out-of-sync replica of blocks [start, end) back in sync
   * from an in-sync one, block by block, while the image stays in use: a
   * block being copied holds the write lock of its whole byte range, so a
   * write to it waits and then reaches the re-synced replica too. Each
   * block's new state is stored as soon as it is copied, so an
   * interrupted sync resumes where it stopped.
   */
  async sync (start: number, end: number, onProgress?: (p: SyncProgress) => void): Promise<SyncProgress> {
    const count = this.current.blockCount
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end > count || start > end) {
      throw new UkaiError('UKAI_ERR_OUT_OF_RANGE', `block range [${start}, ${end}) is not within the image's ${count} blocks`)
    }
    const todo = new RangeSet()
    for (const st of this.current.locations.values()) {
      for (const [s, e] of st.outOfSync.within(start, end)) todo.add(s, e)
    }
    const blocks = [...todo.values()]
    const progress: SyncProgress = { blocks: blocks.length, done: 0, bytes: 0, failed: [] }
    onProgress?.({ ...progress })
    // Blocks go in batches: copied SYNC_PARALLEL at a time, then one flush
    // per target and one metadata update for the whole batch, instead of
    // an fsync and a metadata write per block.
    const perBatch = Math.max(1, Math.min(SYNC_BATCH_BLOCKS, Math.floor(SYNC_BATCH_BYTES / this.blockSize)))
    for (let i = 0; i < blocks.length; i += perBatch) {
      await this.syncBatch(blocks.slice(i, i + perBatch), progress, onProgress)
    }
    return progress
  }

  private async syncBatch (batch: number[], progress: SyncProgress, onProgress?: (p: SyncProgress) => void): Promise<void> {
    // Every block of the batch holds its write lock until its new state is
    // stored: a write waits, then reaches the re-synced replica too.
    const releases: Array<() => void> = []
    try {
      for (const block of batch) {
        const bstart = block * this.blockSize
        releases.push(await this.lock.acquire(bstart, bstart + this.current.blockLength(block)))
      }
      const copied: Array<{ block: number, targets: string[] }> = []
      const failures: Failure[] = []
      const queue = batch.slice()
      const worker = async (): Promise<void> => {
        for (let block = queue.shift(); block !== undefined; block = queue.shift()) {
          const targets = this.current.replicasOf(block).filter((r) => !r.inSync).map((r) => r.location)
          if (targets.length > 0) {
            const source = this.pickSource(block)
            if (source === undefined) {
              progress.failed.push({ block, reason: 'no in-sync location reachable' })
            } else {
              const failed = await this.copyBlock(block, source, targets, (n) => { progress.bytes += n }, false)
              failures.push(...failed)
              copied.push({ block, targets: targets.filter((t) => !failed.some((f) => f.location === t)) })
            }
          }
          progress.done++
          onProgress?.({ ...progress, failed: progress.failed.slice() })
        }
      }
      await Promise.all(Array.from({ length: SYNC_PARALLEL }, worker))
      // One flush per target location covers every block copied to it.
      const flushFailed = new Set<string>()
      await Promise.all([...new Set(copied.flatMap((c) => c.targets))].map(async (loc) => {
        try {
          const r = this.ctx.replicas.replicaFor(loc)
          if (r === undefined) throw new Error('location unreachable')
          await r.flush(this.name)
        } catch (err) {
          flushFailed.add(loc)
          for (const c of copied) if (c.targets.includes(loc)) failures.push({ block: c.block, location: loc, reason: `flush failed: ${toUkaiError(err).message}` })
        }
      }))
      for (const f of failures) {
        this.ctx.errors.fail(f.location, f.reason)
        progress.failed.push({ block: f.block, location: f.location, reason: f.reason })
      }
      const done = copied.map((c) => ({ block: c.block, targets: c.targets.filter((t) => !flushFailed.has(t)) })).filter((c) => c.targets.length > 0)
      for (const c of done) for (const loc of c.targets) this.ctx.errors.succeed(loc)
      if (done.length > 0) {
        this.current = await this.ctx.store.update(this.name, (meta) => {
          for (const c of done) for (const loc of c.targets) meta.setSync(loc, c.block, c.block + 1, true)
          return meta
        })
      }
    } finally {
      for (const release of releases) release()
    }
  }

  private async growUsedSize (end: number): Promise<void> {
    if (end <= this.current.usedSize) return
    this.current = await this.ctx.store.update(this.name, (meta) => {
      meta.usedSize = Math.max(meta.usedSize, end)
      return meta
    })
  }

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
    const failures: Failure[] = []
    await Promise.all(pending.map(async ([location, blocks]) => {
      const r = this.ctx.replicas.replicaFor(location)
      try {
        if (r === undefined) throw new Error('location unreachable')
        await r.flush(this.name)
      } catch (err) {
        for (const b of blocks.values()) failures.push({ block: b, location, reason: `flush failed: ${toUkaiError(err).message}` })
      }
    }))
    // Local block files are synced even when nothing was written through
    // this volume since it opened: an fsync must cover earlier writers too.
    const local = this.localReplica()
    if (local !== undefined && !pending.some(([l]) => l === local.location)) await local.flush(this.name)
    await this.recordFailures(failures)
    // The dirty-block log is an activity log: hot blocks stay in it, so a
    // steady writer does not pay a metadata write per flush.
    await this.dirty.trim(DIRTY_KEEP, mark)
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
    this.current = await this.ctx.store.update(this.name, (meta) => {
      meta.usedSize = Math.min(meta.usedSize, newSize)
      return meta
    })
  }

  /**
   * True when zero(offset, length, true) would write no data: a block
   * store zeroes a range that reaches the end of a block file by cutting
   * the file short (or does nothing past its end), and writes zeros only
   * where data follows the range inside a block. Only the last block of
   * the range can have data after it; that is checked on this node's
   * replica. Without a local in-sync replica the answer is false (the
   * cost cannot be known cheaply). Serves NBD_CMD_FLAG_FAST_ZERO.
   */
  async zeroIsFast (offset: number, length: number): Promise<boolean> {
    checkOffset(offset, length)
    if (length === 0) return true
    const block = Math.floor((offset + length - 1) / this.blockSize)
    const end = offset + length - block * this.blockSize
    if (end >= this.current.blockLength(block)) return true
    const local = this.localReplica()
    if (local === undefined || !this.current.replicasOf(block).some((r) => r.location === local.location && r.inSync)) return false
    return await local.allocatedLength(this.name, block) <= end
  }

  /**
   * Allocation of [offset, offset + length) as extents, from the local
   * replica's block files. Without a local in-sync replica everything is
   * reported as data (always safe).
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
      const base = offset + p.bufferOffset
      const inSyncHere = local !== undefined && this.current.replicasOf(p.block).some((r) => r.location === local.location && r.inSync)
      if (!inSyncHere) { push(base, p.length, false); continue }
      const allocated = await local.allocatedLength(this.name, p.block)
      const dataLen = Math.max(0, Math.min(p.length, allocated - p.offset))
      push(base, dataLen, false)
      push(base + dataLen, p.length - dataLen, true)
    }
    return out
  }
}

/** Blocks the dirty-block log may keep after a flush before it is trimmed. */
const DIRTY_KEEP = 64

/** Blocks a sync copies at once, and how many (or bytes) go between two flushes. */
const SYNC_PARALLEL = 2
const SYNC_BATCH_BLOCKS = 64
const SYNC_BATCH_BYTES = 512 * 2 ** 20

/** Bytes read and written at a time when a block is copied. */
const COPY_CHUNK = 4 * 2 ** 20

export interface SyncProgress {
  /** Blocks with an out-of-sync replica in the range when the sync began. */
  blocks: number
  done: number
  bytes: number
  failed: Array<{ block: number, location?: string, reason: string }>
}

export function newIoStats (): IoStats {
  return { reads: 0, writes: 0, bytesRead: 0, bytesWritten: 0, readsFrom: {} }
}

function checkOffset (offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new UkaiError('UKAI_ERR_OUT_OF_RANGE', `invalid range: offset ${offset}, length ${length}`)
  }
}
