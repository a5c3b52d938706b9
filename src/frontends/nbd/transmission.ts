/**
 * The transmission phase of one connection (proto.md, "Transmission").
 *
 * Requests are parsed as bytes arrive, validated in one place
 * (validateRequest), and dispatched at once without waiting for earlier
 * ones: "Replies need not be sent in the same order as requests", so a
 * slow request never holds up a fast one, and each reply echoes its
 * request's cookie. Overlapping writes are ordered by the volume's range
 * lock. A FLUSH is answered after volume.flush(), which covers every
 * write already answered ("All write commands ... that the server
 * completes (i.e. replies to) prior to processing a NBD_CMD_FLUSH MUST be
 * written to non-volatile storage prior to replying to that
 * NBD_CMD_FLUSH").
 *
 * Flow control: past a number of requests or bytes in flight, or of reply
 * bytes the peer has not taken, no new request is parsed and the socket
 * is paused; it resumes as requests finish.
 */
import type { Socket } from 'node:net'
import { toUkaiError } from '../../errors.js'
import type { NbdBackend } from './exports.js'
import type { FrameReader } from './frame-reader.js'
import type { Negotiated } from './handshake.js'
import {
  MAX_PAYLOAD, NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES,
  NBD_ENOTSUP, NBD_REPLY_FLAG_DONE, NBD_REQUEST_SIZE, NBD_STATE_HOLE, NBD_STATE_ZERO, commandName
} from './protocol.js'
import {
  OFFSET_DATA_OFFSET, SIMPLE_DATA_OFFSET, allocOffsetData, allocSimpleRead, encodeBlockStatus,
  encodeSimpleReply, encodeStructuredError, encodeStructuredNone, type BlockDescriptor
} from './replies.js'
import { parseRequest, validateRequest, type NbdRequest, type SessionState } from './requests.js'

/** Requests being served at once on one connection. */
export const MAX_INFLIGHT = 128
/** READ and WRITE payload bytes being served at once on one connection. */
export const MAX_INFLIGHT_BYTES = 128 * 2 ** 20
/** Reply bytes queued on the socket beyond which no new request is parsed. */
export const MAX_UNSENT = 64 * 2 ** 20
/** Received bytes held unparsed beyond which the socket is paused (above one full WRITE). */
export const MAX_BUFFERED = 2 * MAX_PAYLOAD + 2 ** 20
/**
 * "Servers SHOULD NOT send more than 2^20 extents in a single reply chunk";
 * the server "MAY return fewer descriptors in the reply than would be
 * required to fully specify the whole range".
 */
export const MAX_DESCRIPTORS = 2 ** 20
/** A BLOCK_STATUS looks at no more than this many blocks (each costs a lookup). */
export const MAX_STATUS_BLOCKS = 4096

export class Transmission {
  private readonly socket: Socket
  private readonly reader: FrameReader
  private readonly backend: NbdBackend
  private readonly session: SessionState
  private readonly warn: (message: string) => void
  private inflight = 0
  private inflightBytes = 0
  /** A valid WRITE whose payload has not fully arrived. */
  private pendingWrite: NbdRequest | undefined
  /** Payload bytes of a refused WRITE still to be dropped. */
  private drainLeft = 0
  /** False once no further request will be read (DISC, end, shutdown, violation). */
  private accepting = true
  private hard = false
  /** The peer will send nothing more. */
  private peerEnded = false
  private paused = false
  private corked = false
  private finished = false
  private resolveDone!: () => void
  /** Resolves when no request is left in flight and nothing more will be read. */
  readonly done: Promise<void>

  constructor (socket: Socket, reader: FrameReader, negotiated: Negotiated, warn: (message: string) => void) {
    this.socket = socket
    this.reader = reader
    this.backend = negotiated.export.backend
    this.session = {
      size: negotiated.export.size,
      flags: negotiated.flags,
      structured: negotiated.structured,
      allocationContext: negotiated.allocationContext
    }
    this.warn = warn
    this.done = new Promise((resolve) => { this.resolveDone = resolve })
  }

  /** False once no further request will be read: later bytes can be dropped unread. */
  get reading (): boolean { return this.accepting }

  /** Bytes arrived (already pushed into the reader), a request finished, or the socket drained. */
  pump (): void {
    /** True when the loop stopped for want of bytes (not for flow control). */
    let starved = false
    while (this.accepting) {
      if (this.drainLeft > 0) {
        // "a write payload is always drained": a refused WRITE's data is
        // dropped, never taken for the next request header.
        this.drainLeft -= this.reader.skip(this.drainLeft)
        if (this.drainLeft > 0) { starved = true; break }
        continue
      }
      const w = this.pendingWrite
      if (w !== undefined) {
        if (this.reader.length < w.length) { starved = true; break }
        this.pendingWrite = undefined
        this.dispatch(w, this.reader.take(w.length))
        continue
      }
      if (this.saturated()) break
      if (this.reader.length < NBD_REQUEST_SIZE) { starved = true; break }
      const req = parseRequest(this.reader.take(NBD_REQUEST_SIZE))
      if (req === undefined) {
        // A frame without NBD_REQUEST_MAGIC: the stream cannot be split
        // into requests any more. "Either side MAY initiate a hard
        // disconnect if it detects a violation by the other party".
        this.hardDisconnect()
        return
      }
      if (req.type === NBD_CMD_DISC) {
        // "The server MUST handle all outstanding requests, shut down the
        // TLS session (if one is running), and close the TCP session."
        this.accepting = false
        break
      }
      const bad = validateRequest(req, this.session)
      if (req.type === NBD_CMD_WRITE) {
        if (bad !== undefined) {
          this.drainLeft = req.length
          this.replyError(req, bad.error, bad.message)
        } else {
          this.pendingWrite = req
        }
        continue
      }
      if (bad !== undefined) this.replyError(req, bad.error, bad.message)
      else this.dispatch(req, undefined)
    }
    // After the peer's last byte, a frame that has not arrived never will:
    // a partial request is dropped. Complete ones held back by flow
    // control are still served as requests finish.
    if (starved && this.peerEnded) this.stopReading()
    this.flow()
    this.maybeDone()
  }

  /**
   * The peer sent its last byte or went away. Requests received in full
   * are still served (a client may half-close after its last request).
   */
  end (): void {
    if (this.peerEnded) return
    this.peerEnded = true
    this.pump()
  }

  /** The server is closing: requests in flight are answered, no new one is read. */
  shutdown (): void {
    this.stopReading()
    this.flow()
    this.maybeDone()
  }

  private stopReading (): void {
    this.accepting = false
    this.pendingWrite = undefined
    this.drainLeft = 0
  }

  /**
   * An unexpected exception (a bug) while serving this connection: it is
   * reported and the connection dropped; requests in flight still finish
   * against the volume, and nothing else is affected.
   */
  fault (err: unknown): void {
    this.warn(`NBD connection dropped after an internal error: ${(err as Error)?.stack ?? String(err)}`)
    this.hardDisconnect()
  }

  private hardDisconnect (): void {
    if (this.hard) return
    this.stopReading()
    this.hard = true
    this.socket.destroy()
    this.maybeDone()
  }

  private saturated (): boolean {
    return this.inflight >= MAX_INFLIGHT || this.inflightBytes >= MAX_INFLIGHT_BYTES || this.socket.writableLength >= MAX_UNSENT
  }

  private flow (): void {
    const pause = this.accepting && (this.saturated() || this.reader.length >= MAX_BUFFERED)
    if (pause === this.paused) return
    this.paused = pause
    if (pause) this.socket.pause()
    else this.socket.resume()
  }

  private maybeDone (): void {
    if (this.accepting || this.inflight > 0 || this.finished) return
    this.finished = true
    // Replies queued so far still go out; end() uncorks.
    if (!this.hard && !this.socket.destroyed) this.socket.end()
    this.resolveDone()
  }

  private dispatch (req: NbdRequest, payload: Buffer | undefined): void {
    const bytes = req.type === NBD_CMD_READ || req.type === NBD_CMD_WRITE ? req.length : 0
    this.inflight++
    this.inflightBytes += bytes
    void this.serve(req, payload, bytes)
  }

  /** Runs one request to its reply; never rejects. */
  private async serve (req: NbdRequest, payload: Buffer | undefined, bytes: number): Promise<void> {
    try {
      await this.execute(req, payload)
    } catch (err) {
      const e = toUkaiError(err)
      if (e.code === 'UKAI_ERR_INTERNAL') this.warn(`NBD ${commandName(req.type)}: ${e.message}`)
      try {
        this.replyError(req, e.mapping.nbd, e.message)
      } catch (bug) {
        this.fault(bug)
      }
    } finally {
      this.inflight--
      this.inflightBytes -= bytes
    }
    try {
      if (this.accepting) this.pump()
      else this.maybeDone()
    } catch (bug) {
      this.fault(bug)
    }
  }

  private async execute (req: NbdRequest, payload: Buffer | undefined): Promise<void> {
    const b = this.backend
    switch (req.type) {
      case NBD_CMD_READ: return await this.read(req)
      case NBD_CMD_BLOCK_STATUS: return await this.blockStatus(req)
      case NBD_CMD_FLUSH:
        await b.flush()
        return this.send(encodeSimpleReply(req, 0))
      case NBD_CMD_WRITE: await b.write(req.offset, payload!); break
      case NBD_CMD_TRIM: await b.trim(req.offset, req.length); break
      case NBD_CMD_WRITE_ZEROES: {
        const noHole = (req.flags & NBD_CMD_FLAG_NO_HOLE) !== 0
        // NBD_CMD_FLAG_FAST_ZERO: "MUST fail quickly with NBD_ENOTSUP unless
        // the request can be serviced in less time than a corresponding
        // NBD_CMD_WRITE, and SHOULD NOT alter the contents of the export
        // when returning an NBD_ENOTSUP failure." With NO_HOLE every byte
        // is written, never faster than a write.
        if ((req.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0 && (noHole || !await b.zeroIsFast(req.offset, req.length))) {
          return this.replyError(req, NBD_ENOTSUP, 'zeroing this range is not faster than writing it')
        }
        await b.zero(req.offset, req.length, !noHole)
        break
      }
    }
    // NBD_CMD_FLAG_FUA: "it MUST NOT send its reply to that command until
    // all write operations (if any) associated with that command have been
    // completed and persisted to non-volatile storage."
    if ((req.flags & NBD_CMD_FLAG_FUA) !== 0) await b.flush()
    this.send(encodeSimpleReply(req, 0))
  }

  /**
   * One allocation per read: the reply header and the data share a
   * buffer, the volume reads straight into it, and the whole reply is one
   * write. With structured replies the data goes in one
   * NBD_REPLY_TYPE_OFFSET_DATA chunk flagged DONE: the data is complete
   * before the chunk is sent, so no error can follow it, and
   * NBD_CMD_FLAG_DF holds.
   */
  private async read (req: NbdRequest): Promise<void> {
    if (this.session.structured) {
      // An OFFSET_DATA chunk "MUST be at least 9" bytes long: an empty read
      // is answered with NBD_REPLY_TYPE_NONE alone.
      if (req.length === 0) return this.send(encodeStructuredNone(req))
      const buf = allocOffsetData(req, NBD_REPLY_FLAG_DONE, req.offset, req.length)
      await this.fill(req.offset, buf.subarray(OFFSET_DATA_OFFSET))
      this.send(buf)
    } else {
      const buf = allocSimpleRead(req, req.length)
      await this.fill(req.offset, buf.subarray(SIMPLE_DATA_OFFSET))
      this.send(buf)
    }
  }

  private async fill (offset: number, out: Buffer): Promise<void> {
    if (out.length === 0) return
    const n = await this.backend.read(offset, out)
    // Bytes past the image's used size (shrunk since the handshake) read as zeros.
    if (n < out.length) out.fill(0, n)
  }

  /** base:allocation: NBD_STATE_HOLE where no block data is stored, NBD_STATE_ZERO where it reads as zeros. */
  private async blockStatus (req: NbdRequest): Promise<void> {
    const span = Math.min(req.length, this.session.size - req.offset, Math.max(MAX_STATUS_BLOCKS * this.backend.blockSize, MAX_PAYLOAD))
    const extents = await this.backend.extents(req.offset, span)
    // NBD_CMD_FLAG_REQ_ONE: "every reply chunk MUST contain exactly one
    // descriptor, and that descriptor MUST NOT exceed the length of the
    // original request" (span never does).
    const one = (req.flags & NBD_CMD_FLAG_REQ_ONE) !== 0
    const out: BlockDescriptor[] = []
    for (const e of extents) {
      if (e.length <= 0) continue
      out.push({ length: e.length, flags: (e.hole ? NBD_STATE_HOLE : 0) | (e.zero ? NBD_STATE_ZERO : 0) })
      if (one || out.length >= MAX_DESCRIPTORS) break
    }
    // Past the used size (the image shrank since the handshake) reads as
    // zeros and holds nothing. "the server MUST return at least one status descriptor".
    if (out.length === 0) out.push({ length: span, flags: NBD_STATE_HOLE | NBD_STATE_ZERO })
    this.send(encodeBlockStatus(req, NBD_REPLY_FLAG_DONE, this.session.allocationContext!, out))
  }

  /**
   * An error reply. With structured replies an NBD_REPLY_TYPE_ERROR chunk
   * with a message ("The server SHOULD prefer sending errors via a
   * structured reply"; a READ "MUST NOT use a simple reply ... even for
   * the case of an early NBD_EINVAL"); else a simple reply without data.
   */
  private replyError (req: NbdRequest, error: number, message: string): void {
    this.send(this.session.structured ? encodeStructuredError(req, error, message) : encodeSimpleReply(req, error))
  }

  /** Replies finished in the same tick leave in one writev. */
  private send (buf: Buffer): void {
    const s = this.socket
    if (s.destroyed || !s.writable) return
    if (!this.corked) {
      this.corked = true
      s.cork()
      process.nextTick(this.uncork)
    }
    s.write(buf)
  }

  private readonly uncork = (): void => {
    this.corked = false
    this.socket.uncork()
  }
}
