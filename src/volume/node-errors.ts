/**
 * The node error state: a location that failed is skipped until
 * `retry_after` seconds have passed, then tried again (the original's
 * rule). Shared by every volume of a node.
 */
export interface NodeErrorEntry {
  location: string
  reason: string
  /** When the location was put in the error state (ms since epoch). */
  since: number
  /** When it may be tried again (ms since epoch). */
  retryAfter: number
}

export class NodeErrors {
  private readonly entries = new Map<string, NodeErrorEntry>()
  private readonly retryMs: number
  private readonly now: () => number

  constructor (retryAfterSeconds: number, now: () => number = Date.now) {
    this.retryMs = retryAfterSeconds * 1000
    this.now = now
  }

  private readonly watchers = new Set<() => void>()

  fail (location: string, reason: string): void {
    const t = this.now()
    this.entries.set(location, { location, reason, since: t, retryAfter: t + this.retryMs })
    this.changed()
    // Watchers learn of the end of the error state too.
    if (this.watchers.size > 0) setTimeout(() => this.changed(), this.retryMs + 1).unref()
  }

  /** Calls `fn` (synchronously) whenever a location enters or leaves the error state; returns its removal. */
  watch (fn: () => void): () => void {
    this.watchers.add(fn)
    return () => { this.watchers.delete(fn) }
  }

  private changed (): void {
    for (const fn of this.watchers) fn()
  }

  /** True while the location should be skipped. */
  isFailed (location: string): boolean {
    const e = this.entries.get(location)
    return e !== undefined && e.retryAfter > this.now()
  }

  succeed (location: string): void {
    if (this.entries.delete(location)) this.changed()
  }

  list (): NodeErrorEntry[] {
    return [...this.entries.values()].filter((e) => e.retryAfter > this.now())
  }
}
