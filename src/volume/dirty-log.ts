/**
 * The dirty-block log of one open image (DRBD's activity log is the
 * model). A block with two or more in-sync replicas is added, durably,
 * before the first write reaches it, and stays while writes to it are in
 * flight or not yet covered by a completed flush. Only the holder of the
 * image's writer lease changes the log (every change is guarded by its
 * lease), and whoever takes the lease over from a writer that died or was
 * fenced reconciles the logged blocks, so a writer that died between
 * replicas never leaves two in-sync replicas that differ (DESIGN.md
 * invariant 4).
 */
import type { MetadataStore } from '../metadata/store.js'
import { RangeSet } from '../metadata/range-set.js'

/** What a change of the log needs of the writer session it is for. */
export interface LogOwner {
  guard: number
  /** Until when (ms since the epoch) a change may wait for an unreachable metadata store. */
  until?: () => number
}

/** What a flush must remember from its start to trim the log after it. */
export interface FlushMark {
  /** Blocks last written in this epoch or later were not covered. */
  epoch: number
  /** Blocks with a write in flight when the flush began. */
  pinned: ReadonlySet<number>
}

/** Changes of the log stored in one write. */
interface Group { owner: LogOwner, fns: Array<(d: RangeSet) => RangeSet>, run: Promise<void> }

export class DirtyLog {
  private readonly store: MetadataStore
  private readonly image: string
  /** The log as it is stored (durable). */
  private stored = new RangeSet()
  /** The log being written right now (it replaces `stored` once durable). */
  private writing: RangeSet | undefined
  /** Changes run one at a time, in order. */
  private queue: Promise<void> = Promise.resolve()
  /** The changes waiting for the one being stored (stored together after it). */
  private waiting: Group | undefined
  /** Writes in flight per block. */
  private readonly inflight = new Map<number, number>()
  /** Grows when a flush starts. */
  private epoch = 0
  /** Epoch in which each logged block was last written. */
  private readonly lastWrite = new Map<number, number>()

  constructor (store: MetadataStore, image: string) {
    this.store = store
    this.image = image
  }

  get size (): number { return this.stored.size }

  /** Runs `fn` (a write to `blocks`) with those blocks durably logged first. */
  async around<T> (owner: LogOwner, blocks: number[], fn: () => Promise<T>): Promise<T> {
    for (const b of blocks) {
      this.inflight.set(b, (this.inflight.get(b) ?? 0) + 1)
      this.lastWrite.set(b, this.epoch)
    }
    try {
      // Logged means: durable now, and not dropped by the change being
      // written (a trim that started before this write was in flight).
      const missing = blocks.filter((b) => !this.stored.has(b) || (this.writing !== undefined && !this.writing.has(b)))
      if (missing.length > 0) await this.change(owner, (d) => { for (const b of missing) d.add(b, b + 1); return d })
      return await fn()
    } finally {
      for (const b of blocks) {
        const n = this.inflight.get(b)! - 1
        if (n === 0) this.inflight.delete(b)
        else this.inflight.set(b, n)
      }
    }
  }

  /**
   * Logs `blocks` ahead of writes to come (they stay until a flush's trim
   * finds them unwritten): one metadata write for many blocks, instead of
   * one wait for the log in the first write to each.
   */
  async add (owner: LogOwner, blocks: number[]): Promise<void> {
    for (const b of blocks) this.lastWrite.set(b, this.epoch)
    const missing = blocks.filter((b) => !this.stored.has(b))
    if (missing.length > 0) await this.change(owner, (d) => { for (const b of missing) d.add(b, b + 1); return d })
  }

  /** Called when a flush starts: what it will cover. */
  markFlush (): FlushMark {
    return { epoch: ++this.epoch, pinned: new Set(this.inflight.keys()) }
  }

  /**
   * Drops the blocks a completed flush made durable on every replica:
   * those last written before it began, with no write in flight then or
   * now. Only once the log holds more than `keep` blocks, so a steady
   * writer does not pay a metadata write per flush. Without a mark (the
   * last writer closed, everything flushed), every block not in flight.
   */
  async trim (owner: LogOwner, keep: number, mark?: FlushMark): Promise<void> {
    if (this.stored.size <= keep) return
    const before = mark?.epoch ?? this.epoch + 1
    const pinned = mark?.pinned ?? new Set<number>()
    await this.change(owner, (d) => {
      const next = new RangeSet()
      for (const b of d.values()) {
        if (this.inflight.has(b) || pinned.has(b) || (this.lastWrite.get(b) ?? -1) >= before) next.add(b, b + 1)
        else this.lastWrite.delete(b)
      }
      return next
    })
  }

  /** Takes the log as the store holds it (when this node becomes the image's writer). */
  adopt (stored: RangeSet): void {
    this.stored = stored.clone()
    this.lastWrite.clear()
  }

  /** Blocks with writes in flight. */
  inflightBlocks (): number[] {
    return [...this.inflight.keys()]
  }

  /**
   * Applies `fn` to the log and stores the result, one change at a time.
   * Changes that arrive while one is being stored wait together and are
   * stored in one write (group commit): a burst of first writes to many
   * blocks pays one metadata write, not one each.
   */
  private async change (owner: LogOwner, fn: (d: RangeSet) => RangeSet): Promise<void> {
    const waiting = this.waiting
    if (waiting !== undefined && waiting.owner.guard === owner.guard) {
      waiting.fns.push(fn)
      await waiting.run
      return
    }
    const group: Group = { owner, fns: [fn], run: Promise.resolve() }
    this.waiting = group
    group.run = this.queue.then(async () => {
      if (this.waiting === group) this.waiting = undefined
      let next = this.stored.clone()
      for (const f of group.fns) next = f(next)
      if (next.equals(this.stored)) return
      this.writing = next
      try {
        await this.store.putDirty(this.image, next, { guard: owner.guard, until: owner.until?.() })
        this.stored = next
      } finally {
        this.writing = undefined
      }
    })
    this.queue = group.run.catch(() => {})
    await group.run
  }
}
