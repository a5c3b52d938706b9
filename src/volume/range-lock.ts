/**
 * Byte-range locks inside one volume. A write holds the range it writes,
 * so that two overlapping writes reach every replica in the same order
 * (otherwise replicas could end with different bytes). Writes that do not
 * overlap run in parallel: a lock per block would serialise a whole
 * block's random writes.
 */
interface Held { start: number, end: number, done: Promise<void> }

export class RangeLock {
  private readonly held = new Set<Held>()

  async acquire (start: number, end: number): Promise<() => void> {
    for (;;) {
      const blocking: Array<Promise<void>> = []
      for (const h of this.held) if (h.start < end && start < h.end) blocking.push(h.done)
      if (blocking.length === 0) break
      await Promise.all(blocking)
    }
    let release!: () => void
    const h: Held = { start, end, done: new Promise<void>((resolve) => { release = resolve }) }
    this.held.add(h)
    return () => {
      this.held.delete(h)
      release()
    }
  }

  async with<T> (start: number, end: number, fn: () => Promise<T>): Promise<T> {
    const release = await this.acquire(start, end)
    try { return await fn() } finally { release() }
  }
}
