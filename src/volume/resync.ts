/**
 * Copying blocks between replicas: reconciliation (one in-sync replica to
 * the others) and resynchronisation (out-of-sync replicas brought back
 * from an in-sync one while the image is in use). Both run as the
 * image's writer session and write with its generation, so a node that
 * lost the lease cannot copy stale data over a newer writer's.
 */
import { toUkaiError, type ErrorCode } from '../errors.js'
import type { ImageMeta } from '../metadata/image.js'
import { RangeSet, type Range } from '../metadata/range-set.js'
import type { Replica, ReplicaProvider } from '../replica/replica.js'
import type { NodeErrors } from './node-errors.js'
import type { RangeLock } from './range-lock.js'
import { BufferPool } from '../util/buffer-pool.js'
import { allSettledOrThrow } from '../util/settle.js'

export interface Failure {
  block: number
  location: string
  reason: string
  /** The replica refused the writer's generation: another node writes the image now. */
  fenced?: boolean
  /**
   * The location could not be reached (no answer, a lost connection, a
   * timeout), as opposed to answering with an error (ENOSPC, EIO): it may
   * have died, and lost what it had not flushed.
   */
  transport?: boolean
  code?: ErrorCode
  /** The granules of the image the failed request covered (see GRANULE in image.ts), when it was a write. */
  granules?: Range
}

/** The failure of `location` for `block`, classified (see Failure). */
export function failure (block: number, location: string, replica: Replica | undefined, err: unknown, prefix = ''): Failure {
  if (replica === undefined) return { block, location, reason: `${prefix}location unreachable or in the error state`, transport: true }
  const e = toUkaiError(err)
  return {
    block,
    location,
    reason: prefix + e.message,
    code: e.code,
    ...(e.code === 'UKAI_ERR_FENCED' ? { fenced: true } : {}),
    // A peer's answer carries its NBD error; anything else from a peer is the connection's.
    ...(!replica.isLocal && e.details?.nbdError === undefined && e.code !== 'UKAI_ERR_FENCED' ? { transport: true } : {})
  }
}

export interface CopyContext {
  image: string
  meta: ImageMeta
  replicas: ReplicaProvider
  generation: number
  /** Called after each chunk with the bytes it wrote, outside its lock: resolves when the copy may go on (a rate limit). */
  pace?: (bytes: number) => Promise<void>
}

/** A pace (CopyContext.pace) of `rate` bytes per second, with a burst of a quarter second. */
export function pacer (rate: number): (bytes: number) => Promise<void> {
  let next = performance.now()
  return async (bytes) => {
    const now = performance.now()
    next = Math.max(next, now - 250) + bytes / rate * 1000
    if (next > now) await new Promise((resolve) => setTimeout(resolve, next - now))
  }
}

/** Bytes read and written at a time when a block is copied. */
const COPY_CHUNK = 4 * 2 ** 20
/** Chunks of one block copied at once. */
const COPY_PARALLEL = 4
/**
 * Bytes a copy writes to its targets between two flushes of them. Dirty
 * data left to pile up is written back by one long fsync that every other
 * fsync on the file system waits behind (the metadata store's, the
 * image's own flushes): 512 MiB stalled a 512-byte fsync for 260-330 ms
 * here, 32 MiB for 40-60 ms, at the same copy rate.
 */
const FLUSH_EVERY = 32 * 2 ** 20
/**
 * Bytes of a chunk written to the targets under one lock while the image
 * is open for writing: a write waits for this much of a copy's writes at
 * most (a whole 4 MiB chunk took ~100 ms with eight in flight). With no
 * writer, a chunk goes whole (smaller pieces cost the copy ~20% of its
 * rate); a writer that opens meanwhile waits for one chunk at most.
 */
const APPLY_PIECE = 512 * 1024
/** Runs of zeros at least this long (and aligned so) are written as holes. */
const ZERO_GRAIN = 64 * 1024
const ZEROS = Buffer.alloc(ZERO_GRAIN)

/** Takes the write lock of a byte range of the image; resolves with its release. */
export type RangeLocker = (start: number, end: number) => Promise<() => void>

/**
 * What a copy needs to run while the image is written (a resync): the
 * image's write lock, and a record of the writes that reach the targets
 * meanwhile (they are mirrored there: resync.ts's SyncContext.mirror).
 */
export interface ConcurrentWrites {
  lock: RangeLocker
  /** A mark of the writes so far. */
  mark: () => number
  /** The byte ranges of `block` (offsets in it) of the writes that took their lock after `mark`. */
  since: (block: number, mark: number) => RangeSet
  /** True while the image is open for writing (a copy then writes its targets APPLY_PIECE bytes at a time). */
  writing: () => boolean
}

/**
 * What a chunk's read of the source found: data at offsets of the block,
 * the ranges that read as zeros, and the mark of the writes before it.
 */
interface ChunkRead { start: number, end: number, data: Array<{ offset: number, buf: Buffer }>, zeros: RangeSet, mark: number, buffers: Buffer[] }

/**
 * The buffers chunks are read into, reused (a fresh 4 MiB buffer is a
 * fresh mapping the kernel faults in and zeroes): one goes back once its
 * chunk is read and written to every target without a failure, the rule
 * of the NBD server's payloads (Volume.write); after any failure it is
 * left to the collector, since a request that failed is not relied on to
 * be done with the bytes.
 */
const chunkBuffers = new BufferPool({ min: 64 * 1024, max: COPY_CHUNK, retain: 2 * COPY_PARALLEL * COPY_CHUNK })

/**
 * Copies block `block` from `source` to `targets` so they end byte-for-
 * byte equal, and flushes the targets unless `flush` is false (the caller
 * flushes a batch; the targets are flushed every FLUSH_EVERY bytes all the
 * same). Returns the targets that failed.
 *
 * The copy is sparse: only the source's data extents are read, runs of
 * zeros in them are not written, and every range that reads as zeros on
 * the source is zeroed on the targets as a hole (never skipped: a target
 * may hold old data there). With `only` (byte ranges of the block: what
 * a fine record says the targets differ in), only those are copied.
 *
 * With `writes`, for a caller whose writes reach the targets while the
 * copy runs (a resync), a chunk is read from the source without holding
 * its range: the range's lock is taken once before the read (the writes
 * in flight land first) and again for writing the targets, and what a
 * write reached since the first is left out (the write took it to the
 * targets itself), a piece of APPLY_PIECE bytes at a time while the
 * image is open for writing, a chunk at a time when not. A write waits
 * for one piece's writes to the targets at most, never for a read of the
 * source. Without, the caller holds the whole block.
 */
export async function copyBlock (ctx: CopyContext, block: number, source: Replica, targets: string[], onBytes?: (n: number) => void, flush = true, writes?: ConcurrentWrites, only?: RangeSet): Promise<Failure[]> {
  const failures: Failure[] = []
  const live = new Map<string, Replica>()
  for (const t of targets) {
    const r = ctx.replicas.replicaFor(t)
    if (r === undefined) failures.push(failure(block, t, undefined, undefined))
    else live.set(t, r)
  }
  if (live.size === 0) return failures
  const base = block * ctx.meta.blockSize
  const length = ctx.meta.blockLength(block)
  const fail = (location: string, err: unknown): void => {
    if (!live.has(location)) return
    failures.push(failure(block, location, live.get(location), err))
    live.delete(location)
  }
  // The chunks to copy: the whole block, or the ranges asked for.
  const chunks: Range[] = []
  for (const [s, e] of (only ?? RangeSet.of(0, length)).within(0, length)) {
    for (let c = s; c < e; c += COPY_CHUNK) chunks.push([c, Math.min(e, c + COPY_CHUNK)])
  }
  const read = async ([start, end]: Range): Promise<ChunkRead> => {
    let mark = 0
    if (writes !== undefined) {
      const release = await writes.lock(base + start, base + end)
      mark = writes.mark()
      release()
    }
    const data: ChunkRead['data'] = []
    const zeros = new RangeSet().add(start, end)
    const buffers: Buffer[] = []
    for (const [s, e] of await source.dataExtents(ctx.image, block, start, end)) {
      const buf = chunkBuffers.take(e - s)
      buffers.push(buf)
      await source.read(ctx.image, block, s, buf)
      for (const [rs, re] of nonZeroRuns(buf, s)) {
        data.push({ offset: rs, buf: buf.subarray(rs - s, re - s) })
        zeros.remove(rs, re)
      }
    }
    return { start, end, data, zeros, mark, buffers }
  }
  // Writes the chunk to the targets: whole, or with `writes` a piece at a
  // time under the piece's lock, without what writes reached since the read.
  const apply = async (c: ChunkRead): Promise<number> => {
    let bytes = 0
    const step = writes?.writing() === true ? APPLY_PIECE : c.end - c.start
    for (let s = c.start; s < c.end && live.size > 0; s += step) {
      const e = Math.min(c.end, s + step)
      const release = writes === undefined ? () => {} : await writes.lock(base + s, base + e)
      try {
        const skip = writes?.since(block, c.mark) ?? new RangeSet()
        const pieces: ChunkRead['data'] = []
        for (const d of c.data) {
          const ds = Math.max(s, d.offset)
          const de = Math.min(e, d.offset + d.buf.length)
          if (ds >= de) continue
          for (const [ps, pe] of new RangeSet().add(ds, de).removeSet(skip).ranges()) {
            pieces.push({ offset: ps, buf: d.buf.subarray(ps - d.offset, pe - d.offset) })
            bytes += pe - ps
          }
        }
        const zeros = new RangeSet(c.zeros.within(s, e)).removeSet(skip)
        await Promise.all([...live].map(async ([loc, r]) => {
          try {
            for (const p of pieces) await r.write(ctx.image, block, p.offset, p.buf, ctx.generation)
            for (const [zs, ze] of zeros.ranges()) await r.discard(ctx.image, block, zs, ze - zs, 'zero', ctx.generation)
          } catch (err) { fail(loc, err) }
        }))
      } finally { release() }
    }
    onBytes?.(bytes)
    return bytes
  }
  const flushTargets = async (): Promise<void> => {
    await Promise.all([...live].map(async ([loc, r]) => {
      try { await r.flush(ctx.image) } catch (err) { fail(loc, err) }
    }))
  }
  let next = 0
  let unflushed = 0
  const worker = async (): Promise<void> => {
    while (next < chunks.length && live.size > 0) {
      const chunk = await read(chunks[next++]!)
      const failed = failures.length
      const bytes = await apply(chunk)
      if (failures.length === failed) for (const b of chunk.buffers) chunkBuffers.give(b)
      unflushed += bytes
      if (unflushed >= FLUSH_EVERY) {
        unflushed = 0
        await flushTargets()
      }
      await ctx.pace?.(bytes)
    }
  }
  // A worker that fails leaves the others to finish: none writes the targets after this returns.
  await allSettledOrThrow(Array.from({ length: Math.min(COPY_PARALLEL, chunks.length) }, worker))
  if (flush) await flushTargets()
  return failures
}

/** The ranges of `buf` (which starts at `at`) that are not runs of zeros of ZERO_GRAIN, aligned, or more. */
export function nonZeroRuns (buf: Buffer, at: number): Range[] {
  const out: Range[] = []
  const end = at + buf.length
  let runStart = -1
  // Grains aligned to the block: the first and last may be partial.
  for (let g = at; g < end;) {
    const gEnd = Math.min(end, (Math.floor(g / ZERO_GRAIN) + 1) * ZERO_GRAIN)
    const piece = buf.subarray(g - at, gEnd - at)
    const zero = piece.length === ZERO_GRAIN && piece.equals(ZEROS)
    if (!zero && runStart < 0) runStart = g
    if (zero && runStart >= 0) { out.push([runStart, g]); runStart = -1 }
    g = gEnd
  }
  if (runStart >= 0) out.push([runStart, end])
  return out
}

export interface SyncProgress {
  /** Blocks with an out-of-sync replica in the range when the sync began. */
  blocks: number
  done: number
  bytes: number
  failed: Array<{ block: number, location?: string, reason: string }>
}

export interface SyncContext extends Omit<CopyContext, 'meta'> {
  /** The image's metadata now (it may change during the sync). */
  meta: () => ImageMeta
  lock: RangeLock
  /** The writes that took their lock since a mark (see ConcurrentWrites). */
  writeMark: () => number
  writtenSince: (block: number, mark: number) => RangeSet
  /** True while the image is open for writing (see ConcurrentWrites.writing). */
  writing: () => boolean
  errors: NodeErrors
  chooseSource: (block: number) => Replica | undefined
  /** Enters the writer session for a copy to `blocks` (throws once fenced). */
  begin: (blocks: number[]) => () => void
  /**
   * From now on the writer's writes to `block` reach `targets` too (while
   * they are out of sync); returns what ends that. A target a mirrored
   * write failed on is named by `mirrorFailed` afterwards.
   */
  mirror: (block: number, targets: string[]) => () => void
  mirrorFailed: (block: number) => ReadonlySet<string>
  /**
   * Called once the block's writes are mirrored: the byte ranges of the
   * block the targets may differ in (their fine records), or undefined
   * to copy it whole.
   */
  changedIn: (block: number, targets: string[]) => RangeSet | undefined
  /** Called for the blocks a batch copied before their write locks are taken to mark them (what may be done outside them). */
  beforeMark?: (blocks: number[]) => Promise<void>
  /** Stores the copied replicas as in sync, as the writer session. */
  markInSync: (done: Array<{ block: number, targets: string[] }>) => Promise<void>
  /** A replica refused the session's generation: ends the session; the error to throw. */
  fenced: () => Error
}

/** Blocks a sync copies at once, and how many (or bytes) go between two flushes. */
const SYNC_PARALLEL = 2
const SYNC_BATCH_BLOCKS = 64
const SYNC_BATCH_BYTES = 512 * 2 ** 20

/**
 * Copies every out-of-sync replica of blocks [start, end) from an in-sync
 * one while the image is written. Blocks go in batches, SYNC_PARALLEL
 * blocks copied at a time. Before a block's copy starts, the writer's
 * writes to it reach its targets too (they are mirrored); a chunk's copy
 * leaves out what a write reached since its read began (the write took it
 * to the targets), and writes the rest under the chunk's write lock (see
 * copyBlock). Then each target is flushed once, and the batch
 * is marked in sync in one metadata update, under the write locks of its
 * blocks (a write waits for that update only), except targets a mirrored
 * write failed on. An interrupted sync resumes at the batch where it
 * stopped.
 */
export async function syncBlocks (ctx: SyncContext, start: number, end: number, onProgress?: (p: SyncProgress) => void): Promise<SyncProgress> {
  const todo = new RangeSet()
  for (const st of ctx.meta().locations.values()) {
    for (const [s, e] of st.outOfSync.within(start, end)) todo.add(s, e)
  }
  const blocks = [...todo.values()]
  const progress: SyncProgress = { blocks: blocks.length, done: 0, bytes: 0, failed: [] }
  onProgress?.({ ...progress })
  const perBatch = Math.max(1, Math.min(SYNC_BATCH_BLOCKS, Math.floor(SYNC_BATCH_BYTES / ctx.meta().blockSize)))
  for (let i = 0; i < blocks.length; i += perBatch) {
    await syncBatch(ctx, blocks.slice(i, i + perBatch), progress, onProgress)
  }
  return progress
}

async function syncBatch (ctx: SyncContext, batch: number[], progress: SyncProgress, onProgress?: (p: SyncProgress) => void): Promise<void> {
  const mirrors: Array<() => void> = []
  const leave = ctx.begin(batch)
  try {
    const copied: Array<{ block: number, targets: string[] }> = []
    const failures: Failure[] = []
    /** Locations a copy of the batch wrote (or began to). */
    const touched = new Set<string>()
    const queue = batch.slice()
    const worker = async (): Promise<void> => {
      for (let block = queue.shift(); block !== undefined; block = queue.shift()) {
        const meta = ctx.meta()
        const targets = meta.replicasOf(block).filter((r) => !r.inSync).map((r) => r.location)
        if (targets.length > 0) {
          const source = ctx.chooseSource(block)
          if (source === undefined) {
            progress.failed.push({ block, reason: 'no in-sync location reachable' })
          } else {
            mirrors.push(ctx.mirror(block, targets))
            for (const t of targets) touched.add(t)
            // After the mirror: a write either reached the fine record read now, or reaches the targets.
            const only = ctx.changedIn(block, targets)
            const failed = await copyBlock({ ...ctx, meta }, block, source, targets, (n) => { progress.bytes += n }, false, {
              lock: async (start, end) => await ctx.lock.acquire(start, end),
              mark: ctx.writeMark,
              since: ctx.writtenSince,
              writing: ctx.writing
            }, only)
            failures.push(...failed)
            copied.push({ block, targets: targets.filter((t) => !failed.some((f) => f.location === t)) })
          }
        }
        progress.done++
        onProgress?.({ ...progress, failed: progress.failed.slice() })
      }
    }
    // Every copy of the batch ends before the batch does (and its session is left).
    try {
      await allSettledOrThrow(Array.from({ length: SYNC_PARALLEL }, worker))
    } catch (err) {
      // Stopped (cancelled, fenced): nothing of the batch is marked in sync,
      // but what its copies wrote is flushed all the same, so that no
      // connection is closed later holding writes nobody flushed (the next
      // flush on that peer would fail for them: remote-replica.ts).
      await Promise.all([...touched].map(async (loc) => await ctx.replicas.replicaFor(loc)?.flush(ctx.image).catch(() => {})))
      throw err
    }
    if (failures.some((f) => f.fenced === true)) throw ctx.fenced()
    // One flush per target location covers every block copied to it.
    const flushFailed = new Set<string>()
    await Promise.all([...new Set(copied.flatMap((c) => c.targets))].map(async (loc) => {
      try {
        const r = ctx.replicas.replicaFor(loc)
        if (r === undefined) throw new Error('location unreachable')
        await r.flush(ctx.image)
      } catch (err) {
        flushFailed.add(loc)
        for (const c of copied) if (c.targets.includes(loc)) failures.push(failure(c.block, loc, ctx.replicas.replicaFor(loc), err, 'flush failed: '))
      }
    }))
    for (const f of failures) {
      if (f.transport === true) ctx.errors.fail(f.location, f.reason)
      progress.failed.push({ block: f.block, location: f.location, reason: f.reason })
    }
    // The update under the blocks' write locks: no write runs between the
    // check of what the mirrored writes missed and the new state.
    const releases: Array<() => void> = []
    try {
      if (copied.length > 0) await ctx.beforeMark?.(copied.map((c) => c.block))
      for (const c of copied) {
        const start = c.block * ctx.meta().blockSize
        releases.push(await ctx.lock.acquire(start, start + ctx.meta().blockLength(c.block)))
      }
      const done = copied
        .map((c) => ({ block: c.block, targets: c.targets.filter((t) => !flushFailed.has(t) && !ctx.mirrorFailed(c.block).has(t)) }))
        .filter((c) => c.targets.length > 0)
      for (const c of copied) {
        for (const t of ctx.mirrorFailed(c.block)) if (c.targets.includes(t)) progress.failed.push({ block: c.block, location: t, reason: 'a write to it failed during the copy' })
      }
      for (const c of done) for (const loc of c.targets) ctx.errors.succeed(loc)
      if (done.length > 0) await ctx.markInSync(done)
    } finally {
      // In sync (or not): the writes stop being mirrored, then go on.
      for (const m of mirrors.splice(0)) m()
      for (const release of releases) release()
    }
  } finally {
    for (const m of mirrors) m()
    leave()
  }
}
