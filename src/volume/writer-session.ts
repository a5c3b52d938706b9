/**
 * A writer session: one grant of an image's writer lease to this node's
 * Volume, from its first write (or resync) until the last writer closes
 * or another node takes over.
 *
 *   acquiring --grant--> held --fence()--> fenced
 *                         \---release---> released
 *
 * Every write enters the session first (`begin`), synchronously with the
 * check that the session still holds the lease, and leaves it when done.
 * `fence()` is synchronous too, so a write either entered before the
 * fence (and its blocks count as unsafe: they may differ between
 * replicas) or is refused. The unsafe blocks are what the next holder
 * must reconcile; a session also starts with the blocks it inherited
 * unreconciled, and drops each once reconciled.
 */
import { randomUUID } from 'node:crypto'
import { RangeSet } from '../metadata/range-set.js'
import { fenced, type WriterPurpose } from '../metadata/store.js'

export type SessionState = 'acquiring' | 'held' | 'fenced' | 'released'

export class WriterSession {
  readonly id = randomUUID()
  readonly image: string
  readonly purpose: WriterPurpose
  state: SessionState = 'acquiring'
  generation = 0
  /** The writer key's revision: the guard of every change this session makes. */
  guard = 0
  /** Blocks this session cannot vouch for (see the module comment). */
  readonly unsafe = new RangeSet()
  /**
   * True once `unsafe` holds what the session inherited. A session fenced
   * before (between its grant and learning what the old holder could not
   * vouch for) can vouch for nothing: its `unsafe` is incomplete, and the
   * next holder must reconcile the whole dirty-block log.
   */
  inherited = false
  /** Blocks with writes of this session in progress. */
  private readonly inflight = new Map<number, number>()
  private readonly idle = new Set<() => void>()

  constructor (image: string, purpose: WriterPurpose) {
    this.image = image
    this.purpose = purpose
  }

  get held (): boolean { return this.state === 'held' }

  hold (generation: number, guard: number): void {
    this.generation = generation
    this.guard = guard
    this.state = 'held'
  }

  /** Throws UKAI_ERR_FENCED unless the session still holds the lease. */
  check (): void {
    if (this.state !== 'held') throw fenced(this.image)
  }

  /** Starts a write to `blocks` (see the module comment); the returned function ends it. */
  begin (blocks: number[]): () => void {
    this.check()
    for (const b of blocks) this.inflight.set(b, (this.inflight.get(b) ?? 0) + 1)
    let ended = false
    return () => {
      if (ended) return
      ended = true
      for (const b of blocks) {
        const n = this.inflight.get(b)! - 1
        if (n === 0) this.inflight.delete(b)
        else this.inflight.set(b, n)
      }
      if (this.inflight.size === 0) for (const f of [...this.idle]) f()
    }
  }

  /** Ends the session's right to write; returns the blocks it cannot vouch for. Idempotent. */
  fence (): RangeSet {
    if (this.state === 'held' || this.state === 'acquiring') {
      this.state = 'fenced'
      for (const b of this.inflight.keys()) this.unsafe.add(b, b + 1)
    }
    return this.unsafe.clone()
  }

  /** Resolves when no write of this session is in progress. */
  async drained (): Promise<void> {
    while (this.inflight.size > 0) {
      await new Promise<void>((resolve) => {
        const f = (): void => { this.idle.delete(f); resolve() }
        this.idle.add(f)
      })
    }
  }
}
