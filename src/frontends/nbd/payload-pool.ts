/**
 * Buffers for WRITE payloads that arrive in several socket chunks and are
 * assembled into one (transmission.ts), kept for the next such WRITE once
 * the backend says that nothing reads them any more.
 *
 * Why: a fresh buffer per large write is fresh memory (page faults, the
 * kernel zeroing every page) and, as memory outside V8's heap, it drives
 * V8 into a major GC every few hundred MiB received. Profiled on both
 * nodes of a two-replica image under sequential 1 MiB writes, the GC's
 * marking and sweeping and the page clearing took about 40% of each
 * node's CPU (perf; 2026-12-04).
 *
 * The rule that makes reuse safe: a buffer comes back only through the
 * `released` callback a backend calls when every consumer of the payload
 * has finished with it (Volume.write: every replica request settled, and
 * each took the write; see there). A backend that never calls it leaves
 * the buffer to the GC, as before. A buffer is handed back at most once
 * (the transmission guards its callback).
 */

/** Payloads smaller than this are not pooled (they mostly arrive in one socket chunk and are served as a view of it). */
export const POOLED_MIN = 64 * 1024
/** Payloads larger than this are not pooled (rare; each would hold much memory idle). */
export const POOLED_MAX = 4 * 2 ** 20
/** Idle bytes a pool keeps at most. */
export const POOL_BYTES = 32 * 2 ** 20

export class PayloadPool {
  private readonly free = new Map<number, Buffer[]>()
  private idle = 0
  private readonly limit: number

  constructor (limit = POOL_BYTES) {
    this.limit = limit
  }

  /** Idle bytes held now. */
  get idleBytes (): number { return this.idle }

  /** A buffer of exactly `n` bytes (contents undefined): a pooled one when there is one. */
  take (n: number): Buffer {
    if (n < POOLED_MIN || n > POOLED_MAX) return Buffer.allocUnsafe(n)
    const buf = this.free.get(n)?.pop()
    if (buf !== undefined) {
      this.idle -= n
      return buf
    }
    // A backing store of its own: never a slice of a shared slab.
    return Buffer.allocUnsafeSlow(n)
  }

  /**
   * Hands back a buffer `take` gave, once nothing reads or writes it any
   * more. Buffers the pool could not have given (views, other sizes) and
   * any past the idle limit are left to the GC.
   */
  give (buf: Buffer): void {
    const n = buf.length
    if (n < POOLED_MIN || n > POOLED_MAX || buf.byteOffset !== 0 || buf.buffer.byteLength !== n) return
    if (this.idle + n > this.limit) return
    let list = this.free.get(n)
    if (list === undefined) { list = []; this.free.set(n, list) }
    // Handed back twice, it would be given to two writes at once.
    if (list.includes(buf)) return
    list.push(buf)
    this.idle += n
  }
}

/** The process's pool, shared by every NBD connection. */
export const payloadPool = new PayloadPool()
