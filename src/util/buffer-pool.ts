/**
 * Large I/O buffers kept for reuse. A fresh buffer of a megabyte is a
 * fresh mapping: the kernel faults in and zeroes its pages on first touch
 * and unmaps them when it is collected, which cost a sequential NBD read
 * more CPU than the read itself. A buffer given back is handed out again
 * for a request of its size class (powers of two), up to `retain` bytes
 * kept idle in all.
 *
 * A buffer is given back only by the one who took it, once the last user
 * of its bytes is done (for a reply, when the socket has taken it); one
 * given back twice, or that the pool never handed out, is ignored, so a
 * mistake costs an allocation, never two users of one buffer.
 */
export interface BufferPoolOptions {
  /** Requests below this many bytes get a plain Buffer.allocUnsafe (small buffers are cheap). */
  min: number
  /** Requests above this many bytes too (rare, and too large to keep). */
  max: number
  /** Idle bytes kept at most, over every size class. */
  retain: number
}

export class BufferPool {
  private readonly opts: BufferPoolOptions
  private readonly free = new Map<number, ArrayBuffer[]>()
  private readonly lent = new WeakSet<ArrayBuffer>()
  private idle = 0

  constructor (opts: BufferPoolOptions) {
    this.opts = opts
  }

  /** Idle bytes held now. */
  get idleBytes (): number { return this.idle }

  /** A buffer of `length` bytes whose contents are unspecified. */
  take (length: number): Buffer {
    if (length < this.opts.min || length > this.opts.max) return Buffer.allocUnsafe(length)
    const size = classOf(length)
    const ab = this.free.get(size)?.pop()
    if (ab !== undefined) this.idle -= size
    const backing = ab ?? new ArrayBuffer(size)
    this.lent.add(backing)
    return Buffer.from(backing, 0, length)
  }

  /** Gives back a buffer from take() once nothing uses its bytes any more. */
  give (buf: Buffer): void {
    const ab = buf.buffer
    if (!(ab instanceof ArrayBuffer) || !this.lent.has(ab)) return
    this.lent.delete(ab)
    const size = ab.byteLength
    if (this.idle + size > this.opts.retain) return
    let list = this.free.get(size)
    if (list === undefined) { list = []; this.free.set(size, list) }
    list.push(ab)
    this.idle += size
  }
}

/** The power of two at or above `n`. */
function classOf (n: number): number {
  return 2 ** Math.ceil(Math.log2(n))
}
