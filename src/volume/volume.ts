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
  readonly stats: IoStats

  constructor (meta: ImageMeta, ctx: VolumeContext) {
    this.name = meta.name
    this.current = meta
    this.ctx = ctx
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

  /** An in-sync, reachable location of the block: the local one first. */
  private chooseReader (block: number, tried: Set<string>): Replica | undefined {
    let best: Replica | undefined
    for (const { location, inSync } of this.current.replicasOf(block)) {
      if (!inSync || tried.has(location) || this.ctx.errors.isFailed(location)) continue
      const r = this.ctx.replicas.replicaFor(location)
      if (r === undefined) continue
      if (r.isLocal) return r
      best ??= r
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
      await this.fanOut(pieces, async (r, p) =>
        await r.write(this.name, p.block, p.offset, data.subarray(p.bufferOffset, p.bufferOffset + p.length)))
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
      await this.fanOut(pieces, async (r, p) => await r.discard(this.name, p.block, p.offset, p.length, mode))
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
    for (const f of failures) this.ctx.errors.fail(f.location, f.reason)
    this.current = await this.ctx.store.update(this.name, (meta) => {
      for (const f of failures) meta.setSync(f.location, f.block, f.block + 1, false)
      return meta
    })
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

export function newIoStats (): IoStats {
  return { reads: 0, writes: 0, bytesRead: 0, bytesWritten: 0, readsFrom: {} }
}

function checkOffset (offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new UkaiError('UKAI_ERR_OUT_OF_RANGE', `invalid range: offset ${offset}, length ${length}`)
  }
}
