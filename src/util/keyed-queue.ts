/**
 * Runs async jobs one at a time per key, in the order they were queued
 * (a failed job does not stop the ones after it); jobs of different keys
 * run concurrently. An idle key holds nothing.
 */
export class KeyedQueue {
  private readonly tails = new Map<string, Promise<unknown>>()

  async run<T> (key: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.tails.get(key) ?? Promise.resolve()
    const run = prev.then(fn, fn)
    const tail = run.catch(() => {})
    this.tails.set(key, tail)
    void tail.then(() => { if (this.tails.get(key) === tail) this.tails.delete(key) })
    return await run
  }

  /** Resolves when every job queued so far has ended. */
  async idle (): Promise<void> {
    await Promise.allSettled([...this.tails.values()])
  }
}
