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

/**
 * Copies block `block` from `source` to `targets` so they end byte-for-
 * byte equal (holes stay holes past the source's allocated length), and
 * flushes the targets unless `flush` is false (the caller flushes a batch).
 * Returns the targets that failed.
 */
export async function copyBlock (ctx: CopyContext, block: number, source: Replica, targets: string[], onBytes?: (n: number) => void, flush = true): Promise<Failure[]> {
  const failures: Failure[] = []
  const live = new Map<string, Replica>()
  for (const t of targets) {
    const r = ctx.replicas.replicaFor(t)
    if (r === undefined) failures.push(failure(block, t, undefined, undefined))
    else live.set(t, r)
  }
  if (live.size === 0) return failures
  const length = ctx.meta.blockLength(block)
  const allocated = Math.min(length, await source.allocatedLength(ctx.image, block))
  const fail = (location: string, err: unknown): void => {
    failures.push(failure(block, location, live.get(location), err))
    live.delete(location)
  }
  // Read the next chunk while the previous one is being written.
  let next: Promise<Buffer> | undefined
  const readChunk = async (off: number): Promise<Buffer> => {
    const buf = Buffer.allocUnsafe(Math.min(COPY_CHUNK, allocated - off))
    await source.read(ctx.image, block, off, buf)
    return buf
  }
  if (allocated > 0) next = readChunk(0)
  for (let off = 0; off < allocated; off += COPY_CHUNK) {
    const buf = await next!
    next = off + COPY_CHUNK < allocated ? readChunk(off + COPY_CHUNK) : undefined
    await Promise.all([...live].map(async ([loc, r]) => await r.write(ctx.image, block, off, buf, ctx.generation).catch((err) => fail(loc, err))))
    onBytes?.(buf.length)
  }
  await Promise.all([...live].map(async ([loc, r]) => {
    try {
      if (allocated < length) await r.discard(ctx.image, block, allocated, length - allocated, 'zero', ctx.generation)
      if (flush) await r.flush(ctx.image)
    } catch (err) { fail(loc, err) }
  }))
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
 * one. Blocks go in batches: every block of a batch holds the write lock
 * of its byte range until its new state is stored, so a write to it waits
 * and then reaches the re-synced replica too. Blocks are copied
 * SYNC_PARALLEL at a time; then each target is flushed once and the
 * batch is marked in sync in one metadata update, so an interrupted sync
 * resumes at the batch where it stopped.
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
  const releases: Array<() => void> = []
  try {
    for (const block of batch) {
      const bstart = block * ctx.meta().blockSize
      releases.push(await ctx.lock.acquire(bstart, bstart + ctx.meta().blockLength(block)))
    }
    releases.push(ctx.begin(batch))
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
            const failed = await copyBlock({ ...ctx, meta }, block, source, targets, (n) => { progress.bytes += n }, false)
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
    const done = copied.map((c) => ({ block: c.block, targets: c.targets.filter((t) => !flushFailed.has(t)) })).filter((c) => c.targets.length > 0)
    for (const c of done) for (const loc of c.targets) ctx.errors.succeed(loc)
    if (done.length > 0) await ctx.markInSync(done)
  } finally {
    for (const release of releases) release()
  }
}
