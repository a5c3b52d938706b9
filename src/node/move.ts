/**
 * `ukai image move`: relocates a block range of an image to another node
 * while the image is in use, step by step: the new location is added for
 * a step of blocks, those are synced (copied from an in-sync replica,
 * writes mirrored meanwhile, resync.ts), and the old location is removed
 * for them, which its node reclaims (deletes the block files) once it
 * has seen the change. Each step is one of the ordinary placement
 * changes, so the image is consistent after any of them, and a move that
 * stopped (an error, a cancel, a node restarted) resumes
 * when run again: placement already moved stays, and blocks already in
 * sync are not copied again.
 */
import { UkaiError } from '../errors.js'
import { nextBoundary, type ImageMeta } from '../metadata/image.js'
import { sameLocation, validateLocation } from '../metadata/names.js'
import { show } from '../util/show.js'
import type { SyncProgress } from '../volume/resync.js'

export interface MoveRequest {
  to: string
  from?: string
  /** Blocks [start, end) (the whole image by default). */
  start?: number
  end?: number
  /** Bytes per second the copy may take (unlimited without; at least MIN_MOVE_RATE). */
  rate?: number
}

/**
 * The lowest rate a move takes, bytes per second. A move runs in the node
 * until it is through and cannot be stopped from outside (its command
 * going does not stop it), holding the image's writer session meanwhile:
 * at 1 byte per second one 64 MiB block would take two years.
 */
export const MIN_MOVE_RATE = 2 ** 20

/** Refuses a rate that is not a number of bytes per second of at least MIN_MOVE_RATE. */
export function checkMoveRate (rate: unknown): void {
  if (rate === undefined) return
  if (typeof rate !== 'number' || !Number.isFinite(rate) || rate < MIN_MOVE_RATE) {
    throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', `the rate must be a number of bytes per second of at least ${MIN_MOVE_RATE} (1M), got ${show(rate)}`, { key: 'rate' })
  }
}

export interface MoveProgress {
  to: string
  from: string | undefined
  /** Blocks of the range, and how many are moved. */
  blocks: number
  done: number
  /** Bytes copied so far. */
  bytes: number
  /** Bytes per second since the move began. */
  rate: number
  /** Seconds left, as far as the rate so far tells (undefined before it tells anything). */
  eta: number | undefined
}

export interface MoveResult extends MoveProgress {
  /** Blocks whose copy failed (the move stopped before removing them from the old location). */
  failed: SyncProgress['failed']
  /** The move was cancelled (`ukai image move --cancel`): it stopped between two chunks of its copy, consistent; run again, it resumes. */
  cancelled?: boolean
}

/** What a move needs of the node. */
export interface MoveHost {
  defaultPort: number
  meta: (name: string) => Promise<ImageMeta>
  addLocation: (name: string, location: string, start: number, end: number) => Promise<unknown>
  removeLocation: (name: string, location: string, start: number, end: number) => Promise<unknown>
  /** A sync of blocks [start, end); with `signal`, it stops between two chunks once the signal is aborted (it rejects then). */
  sync: (name: string, start: number, end: number, onProgress: (p: SyncProgress) => void, rate?: number, signal?: AbortSignal) => Promise<SyncProgress>
}

/** Bytes of blocks moved per step (at least one block). */
const STEP_BYTES = 1024 * 2 ** 20

const invalid = (message: string): UkaiError => new UkaiError('UKAI_ERR_INVALID_ARGUMENT', message)

/** The location the blocks move away from: `from`, or the only other one holding part of the range. */
function sourceOf (meta: ImageMeta, to: string, from: string | undefined, start: number, end: number, port: number): string | undefined {
  const holders = [...meta.locations].filter(([loc, st]) => !sameLocation(loc, to, port) && st.blocks.overlaps(start, end)).map(([loc]) => loc)
  if (from !== undefined) {
    const named = holders.find((loc) => sameLocation(loc, from, port))
    if (named !== undefined) return named
    // Moved already (a move run again after it finished): nothing to give up.
    if (movedTo(meta, to, start, end, port)) return undefined
    throw invalid(`image '${meta.name}': location ${from} holds no block of ${start}..${end - 1}`)
  }
  if (holders.length > 1) throw invalid(`image '${meta.name}': blocks ${start}..${end - 1} are on ${holders.join(', ')}; name the one to move away from with --from`)
  return holders[0]
}

/** True when `to` holds every block of [start, end) in sync. */
function movedTo (meta: ImageMeta, to: string, start: number, end: number, port: number): boolean {
  for (const [loc, st] of meta.locations) {
    if (sameLocation(loc, to, port)) return st.blocks.covers(start, end) && !st.outOfSync.overlaps(start, end)
  }
  return false
}

/**
 * Runs a move. With `signal`, aborting it stops the move between two
 * chunks of its copy (the step under way keeps its new location, out of
 * sync where not copied yet, and its old one): the result says
 * `cancelled`.
 */
export async function moveImage (host: MoveHost, name: string, req: MoveRequest, emit: (p: MoveProgress) => void, signal?: AbortSignal): Promise<MoveResult> {
  const to = validateLocation(req.to, host.defaultPort)
  const from = req.from === undefined ? undefined : validateLocation(req.from, host.defaultPort)
  if (from !== undefined && sameLocation(from, to, host.defaultPort)) throw invalid(`--from and --to name the same location (${to})`)
  checkMoveRate(req.rate)
  const meta = await host.meta(name)
  const start = req.start ?? 0
  const end = req.end ?? meta.blockCount
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end > meta.blockCount || start >= end) {
    throw new UkaiError('UKAI_ERR_OUT_OF_RANGE', `block range ${start}..${end - 1} is not within image '${name}' (blocks 0..${meta.blockCount - 1})`)
  }
  const source = sourceOf(meta, to, from, start, end, host.defaultPort)
  // Every block must have a copy to move: refused before anything changes. Run by run of
  // blocks of one state, not block by block (2^28 blocks kept the event loop for seconds).
  for (let b = start; b < end; b = nextBoundary(meta, b)) {
    if (!meta.replicasOf(b).some((r) => r.inSync)) {
      throw new UkaiError('UKAI_ERR_UNAVAILABLE', `image '${name}' block ${b} has no in-sync replica: there is nothing to move`, { block: b })
    }
  }
  const t0 = performance.now()
  const progress: MoveProgress = { to, from: source, blocks: end - start, done: 0, bytes: 0, rate: 0, eta: undefined }
  const report = (copied: number, done: number): void => {
    const seconds = (performance.now() - t0) / 1000
    progress.rate = seconds > 0 ? copied / seconds : 0
    progress.bytes = copied
    progress.done = done
    progress.eta = done > 0 && done < progress.blocks ? seconds / done * (progress.blocks - done) : done >= progress.blocks ? 0 : undefined
    emit({ ...progress })
  }
  report(0, 0)
  const step = Math.max(1, Math.floor(STEP_BYTES / meta.blockSize))
  let copied = 0
  // A function, not a field read: the signal changes while the move awaits.
  const aborted = (): boolean => signal?.aborted === true
  const cancelled = (done: number): MoveResult => {
    report(copied, done)
    return { ...progress, failed: [], cancelled: true }
  }
  for (let s = start; s < end; s += step) {
    const e = Math.min(end, s + step)
    if (aborted()) return cancelled(s - start)
    await host.addLocation(name, to, s, e)
    const before = copied
    let synced: SyncProgress
    try {
      synced = await host.sync(name, s, e, (p) => {
        copied = before + p.bytes
        // Blocks of the step count as they are copied (all of them once it is through).
        report(copied, s - start + Math.min(e - s, p.done))
      }, req.rate, signal)
    } catch (err) {
      if (aborted()) return cancelled(s - start)
      throw err
    }
    copied = before + synced.bytes
    if (synced.failed.length > 0) {
      report(copied, s - start)
      return { ...progress, failed: synced.failed }
    }
    // The new copies are in sync: the old location gives up the step's blocks (refused if one would lose its last in-sync copy).
    if (source !== undefined) await host.removeLocation(name, source, s, e)
    report(copied, e - start)
  }
  return { ...progress, failed: [] }
}
