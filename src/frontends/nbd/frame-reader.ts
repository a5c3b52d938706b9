/**
 * The bytes a peer has sent and no parser has consumed yet, as the chunks
 * the socket delivered. Frames are taken from the front: a frame inside
 * one chunk is returned as a `subarray` view of it (no copy); only a frame
 * that spans chunks is copied, because parsers and the volume need one
 * contiguous buffer.
 *
 * Two ways to consume: synchronously (`take`, `skip`), as the transmission
 * phase does when data arrives, and asynchronously (`read`, `discard`),
 * as the handshake does, one option at a time.
 */
import { UkaiError } from '../../errors.js'

interface Waiter {
  bytes: number
  resolve: () => void
  reject: (err: Error) => void
}

export class FrameReader {
  private chunks: Array<Buffer | undefined> = []
  /** Index of the first chunk still holding unconsumed bytes. */
  private first = 0
  /** Bytes of chunks[first] already consumed. */
  private offset = 0
  private waiter: Waiter | undefined
  private ended: Error | undefined
  /** Called when a reader starts waiting for bytes (a paused source must flow again). */
  private readonly onWait: (() => void) | undefined
  /** Bytes received and not yet consumed. */
  length = 0

  constructor (onWait?: () => void) {
    this.onWait = onWait
  }

  push (chunk: Buffer): void {
    if (chunk.length === 0 || this.ended !== undefined) return
    this.chunks.push(chunk)
    this.length += chunk.length
    const w = this.waiter
    if (w !== undefined && this.length >= w.bytes) {
      this.waiter = undefined
      w.resolve()
    }
  }

  /** No more bytes will come: waiting and later reads fail with `err`. */
  end (err: Error = new UkaiError('UKAI_ERR_CONNECT', 'the peer closed the connection')): void {
    if (this.ended !== undefined) return
    this.ended = err
    const w = this.waiter
    this.waiter = undefined
    w?.reject(err)
  }

  get isEnded (): boolean { return this.ended !== undefined }

  /** Bytes of the first chunk not consumed yet: take(n) of at most this many is a view, not a copy. */
  get headLength (): number {
    const head = this.chunks[this.first]
    return head === undefined ? 0 : head.length - this.offset
  }

  /**
   * The next `n` bytes (n <= length), consumed. A view into the received
   * chunk when the frame lies inside one; otherwise a copy.
   */
  take (n: number): Buffer {
    if (n > this.length) throw new RangeError(`take(${n}) with ${this.length} bytes buffered`)
    if (n === 0) return Buffer.alloc(0)
    const head = this.chunks[this.first]!
    if (head.length - this.offset >= n) {
      const view = head.subarray(this.offset, this.offset + n)
      this.advance(n)
      return view
    }
    // The frame spans chunks: copy it once into a buffer of its own.
    const out = Buffer.allocUnsafe(n)
    let done = 0
    while (done < n) {
      const c = this.chunks[this.first]!
      const k = Math.min(c.length - this.offset, n - done)
      c.copy(out, done, this.offset, this.offset + k)
      done += k
      this.advance(k)
    }
    return out
  }

  /**
   * Copies up to `n` of the bytes received so far into `target` at
   * `offset` and consumes them; returns how many. A large frame can so be
   * assembled piece by piece as it arrives, instead of in one copy at the
   * end, and the chunks it came in are released as they are copied.
   */
  takeInto (target: Buffer, offset: number, n: number): number {
    let done = 0
    while (done < n && this.length > 0) {
      const c = this.chunks[this.first]!
      const k = Math.min(c.length - this.offset, n - done)
      c.copy(target, offset + done, this.offset, this.offset + k)
      done += k
      this.advance(k)
    }
    return done
  }

  /** The next `n` bytes (n <= length) without consuming them; a copy when they span chunks. */
  peek (n: number): Buffer {
    if (n > this.length) throw new RangeError(`peek(${n}) with ${this.length} bytes buffered`)
    const head = this.chunks[this.first]
    if (head === undefined || n === 0) return Buffer.alloc(0)
    if (head.length - this.offset >= n) return head.subarray(this.offset, this.offset + n)
    const out = Buffer.allocUnsafe(n)
    let done = 0
    for (let i = this.first, off = this.offset; done < n; i++, off = 0) {
      const c = this.chunks[i]!
      const k = Math.min(c.length - off, n - done)
      c.copy(out, done, off, off + k)
      done += k
    }
    return out
  }

  /** Consumes and drops up to `n` bytes; returns how many were dropped. */
  skip (n: number): number {
    let done = 0
    while (done < n && this.length > 0) {
      const c = this.chunks[this.first]!
      const k = Math.min(c.length - this.offset, n - done)
      done += k
      this.advance(k)
    }
    return done
  }

  /** Waits for `n` bytes and takes them. Rejects when the peer is gone first. */
  async read (n: number): Promise<Buffer> {
    if (this.length < n) await this.wait(n)
    return this.take(n)
  }

  /** Drops the next `n` bytes as they arrive, holding none of them. */
  async discard (n: number): Promise<void> {
    let left = n
    for (;;) {
      left -= this.skip(left)
      if (left === 0) return
      await this.wait(1)
    }
  }

  private async wait (bytes: number): Promise<void> {
    if (this.ended !== undefined) throw this.ended
    if (this.waiter !== undefined) throw new Error('FrameReader: one reader at a time')
    const waiting = new Promise<void>((resolve, reject) => { this.waiter = { bytes, resolve, reject } })
    this.onWait?.()
    await waiting
  }

  private advance (n: number): void {
    this.offset += n
    this.length -= n
    const head = this.chunks[this.first]!
    if (this.offset < head.length) return
    this.chunks[this.first] = undefined
    this.first++
    this.offset = 0
    if (this.first === this.chunks.length) {
      this.chunks.length = 0
      this.first = 0
    } else if (this.first >= 64 && this.first * 2 >= this.chunks.length) {
      this.chunks = this.chunks.slice(this.first)
      this.first = 0
    }
  }
}
