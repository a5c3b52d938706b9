/**
 * The process-wide budget of bytes the NBD servers hold for their clients:
 * request bytes received and not yet served (unparsed bytes, WRITE
 * payloads, READ buffers being filled) and reply bytes queued on sockets
 * and not yet taken by the kernel. Per-connection limits alone do not
 * bound memory: twenty connections that each stay under theirs can still
 * hold gigabytes.
 *
 * Each connection is a Ledger: it reports what it holds (`account`), and
 * asks before it starts a request that needs more (`admit`). A request is
 * admitted when the budget has room for it, or always when the connection
 * holds so little that the request fits in its reserve: a client doing
 * small I/O is never held up by others that filled the budget. Past the
 * budget, connections that want more than their reserve wait and read
 * nothing meanwhile; as bytes are released the waiter holding the least
 * goes first (the connections holding the most wait longest), first come
 * first served among equals, and a waiter is never overtaken by a later
 * request that needs more than its own reserve, so a large request is not
 * starved by a stream of smaller ones.
 *
 * Bytes held can exceed the budget by at most the connections' reserves
 * plus what each may read ahead (a few hundred KiB per connection); the
 * rest waits.
 */

/** The default budget of every NBD server in the process. */
export const DEFAULT_BUDGET_BYTES = 128 * 2 ** 20
/** What a connection may always hold, budget or not. */
export const DEFAULT_RESERVE_BYTES = 256 * 1024

/** One connection's side of the budget. */
export interface Ledger {
  /** Bytes this connection holds, as last reported through `account`. */
  readonly accounted: number
}

interface Waiter {
  ledger: Ledger
  cost: number
  wake: () => void
  seq: number
}

export interface BudgetOptions {
  /** Bytes held across connections beyond which requests wait (default 128 MiB). */
  limit?: number
  /** Bytes a connection may hold regardless of the budget (default 256 KiB). */
  reserve?: number
}

export class BufferBudget {
  readonly limit: number
  readonly reserve: number
  private held = 0
  private readonly waiters: Waiter[] = []
  private seq = 0
  private wakeScheduled = false
  /** Highest `used` seen (for tests and the benchmark). */
  peak = 0

  constructor (options: BudgetOptions = {}) {
    this.limit = Math.max(1, options.limit ?? DEFAULT_BUDGET_BYTES)
    this.reserve = Math.max(0, options.reserve ?? DEFAULT_RESERVE_BYTES)
  }

  /** Bytes held across all ledgers. */
  get used (): number { return this.held }

  /** Connections waiting for room. */
  get waiting (): number { return this.waiters.length }

  /** A ledger's holding changed by `delta` bytes. */
  adjust (delta: number): void {
    if (delta === 0) return
    this.held += delta
    if (this.held > this.peak) this.peak = this.held
    if (delta < 0 && this.waiters.length > 0) this.scheduleWake()
  }

  /**
   * May `ledger` start a request that needs `cost` more bytes now? When
   * not, the caller waits (`wait`) and reads nothing until woken.
   */
  admit (ledger: Ledger, cost: number): boolean {
    if (ledger.accounted + cost <= this.reserve) return true
    if (!this.fits(cost)) return false
    // Room, but others were waiting first: the one holding least goes first.
    return this.waiters.length === 0 || this.next() === ledger
  }

  /** Calls `wake` once (asynchronously) when `ledger` may try `admit` again. */
  wait (ledger: Ledger, cost: number, wake: () => void): void {
    const w = this.waiters.find((x) => x.ledger === ledger)
    if (w !== undefined) {
      w.cost = cost
      w.wake = wake
    } else {
      this.waiters.push({ ledger, cost, wake, seq: this.seq++ })
    }
    this.scheduleWake()
  }

  /** `ledger` no longer waits (it was admitted, or its connection ended). */
  cancel (ledger: Ledger): void {
    const i = this.waiters.findIndex((x) => x.ledger === ledger)
    if (i < 0) return
    this.waiters.splice(i, 1)
    if (this.waiters.length > 0) this.scheduleWake()
  }

  /** A request larger than the whole budget runs once nothing else is held. */
  private fits (cost: number): boolean {
    return this.held + Math.min(cost, this.limit) <= this.limit
  }

  private next (): Ledger | undefined {
    let best: Waiter | undefined
    for (const w of this.waiters) {
      if (best === undefined || w.ledger.accounted < best.ledger.accounted ||
        (w.ledger.accounted === best.ledger.accounted && w.seq < best.seq)) best = w
    }
    return best?.ledger
  }

  private scheduleWake (): void {
    if (this.wakeScheduled) return
    this.wakeScheduled = true
    setImmediate(() => {
      this.wakeScheduled = false
      const head = this.next()
      // Each woken waiter is admitted (and cancels) or waits again.
      for (const w of [...this.waiters]) {
        if (w.ledger.accounted + w.cost <= this.reserve || (w.ledger === head && this.fits(w.cost))) w.wake()
      }
    })
  }
}

/** The budget every NBD server in this process shares unless given its own. */
export const processBudget = new BufferBudget()
