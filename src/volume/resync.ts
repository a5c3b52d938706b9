/**
 * Copying blocks between replicas: reconciliation (one in-sync replica to
 * the others) and resynchronisation (out-of-sync replicas brought back
 * from an in-sync one while the image is in use). Both run as the
 * image's writer session and write with its generation, so a node that
 * lost the lease cannot copy stale data over a newer writer's.
 */
import { toUkaiError, type ErrorCode } from '../errors.js'
import type { ImageMeta } from '../metadata/image.js'
import { RangeSet } from '../metadata/range-set.js'
import type { Replica, ReplicaProvider } from '../replica/replica.js'
import type { NodeErrors } from './node-errors.js'
import type { RangeLock } from './range-lock.js'

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
}

/** Bytes read and written at a time when a block is copied. */
const COPY_CHUNK = 4 * 2 ** 20

/** Takes the write lock of a byte range of the image; resolves with its release. */
export type RangeLocker = (start: number, end: number) => Promise<() => void>

/**
 * Copies block `block` from `source` to `targets` so they end byte-for-
 * byte equal (holes stay holes past the source's allocated length), and
 * flushes the targets unless `flush` is false (the caller flushes a batch).
 * Returns the targets that failed.
 *
 * With `lock`, each chunk is copied under the write lock of its own byte
 * range (at most two chunks locked at a time: the one being written and
 * the one read ahead), for a caller whose writes reach the targets while
 * the copy runs (a resync): a write waits for one chunk's copy at most.
 * Without, the caller holds the whole block.
 */
export async function copyBlock (ctx: CopyContext, block: number, source: Replica, targets: string[], onBytes?: (n: number) => void, flush = true, lock?: RangeLocker): Promise<Failure[]> {
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
    failures.push(failure(block, location, live.get(location), err))
    live.delete(location)
  }
  const hold = async (start: number, end: number): Promise<() => void> =>
    lock === undefined ? () => {} : await lock(base + start, base + end)
  const writeAll = async (off: number, buf: Buffer): Promise<void> => {
    await Promise.all([...live].map(async ([loc, r]) => await r.write(ctx.image, block, off, buf, ctx.generation).catch((err) => fail(loc, err))))
    onBytes?.(buf.length)
  }
  // Chunk by chunk, each read while the one before is being written.
  let allocated = Math.min(length, await source.allocatedLength(ctx.image, block))
  const readChunk = async (off: number): Promise<{ buf: Buffer, release: () => void }> => {
    const release = await hold(off, Math.min(off + COPY_CHUNK, allocated))
    try {
      const buf = Buffer.allocUnsafe(Math.min(COPY_CHUNK, allocated - off))
      await source.read(ctx.image, block, off, buf)
      return { buf, release }
    } catch (err) { release(); throw err }
  }
  let next = allocated > 0 ? readChunk(0) : undefined
  let off = 0
  for (; off < allocated; off += COPY_CHUNK) {
    const { buf, release } = await next!
    try {
      next = off + COPY_CHUNK < allocated ? readChunk(off + COPY_CHUNK) : undefined
      await writeAll(off, buf)
    } finally { release() }
  }
  // The tail, under one lock: the source may have grown meanwhile (its
  // writes reached the targets too, but past where the copy looked).
  const release = await hold(off, length)
  try {
    allocated = Math.min(length, await source.allocatedLength(ctx.image, block))
    for (; off < allocated; off += COPY_CHUNK) {
      const buf = Buffer.allocUnsafe(Math.min(COPY_CHUNK, allocated - off))
      await source.read(ctx.image, block, off, buf)
      await writeAll(off, buf)
    }
    await Promise.all([...live].map(async ([loc, r]) => {
      try {
        if (allocated < length) await r.discard(ctx.image, block, allocated, length - allocated, 'zero', ctx.generation)
      } catch (err) { fail(loc, err) }
    }))
  } finally { release() }
  if (flush) {
    await Promise.all([...live].map(async ([loc, r]) => {
      try { await r.flush(ctx.image) } catch (err) { fail(loc, err) }
    }))
  }
  return failures
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
 * writes to it reach its targets too (they are mirrored); the copy takes
 * the write lock of one chunk at a time, so a write overlapping a chunk
 * either lands before that chunk is copied (and is copied with it) or
 * after (and is mirrored). Then each target is flushed once, and the batch
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
            const failed = await copyBlock({ ...ctx, meta }, block, source, targets, (n) => { progress.bytes += n }, false,
              async (start, end) => await ctx.lock.acquire(start, end))
            failures.push(...failed)
            copied.push({ block, targets: targets.filter((t) => !failed.some((f) => f.location === t)) })
          }
        }
        progress.done++
        onProgress?.({ ...progress, failed: progress.failed.slice() })
      }
    }
    await Promise.all(Array.from({ length: SYNC_PARALLEL }, worker))
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
