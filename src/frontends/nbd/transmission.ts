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
 * is paused; it resumes as requests finish and replies leave. Every
 * request that needs memory (a READ's reply buffer, a WRITE's payload) is
 * first admitted by the process-wide budget (budget.ts); until it is, it
 * stays unread and so does everything after it. Once the socket is broken
 * nothing more is started: requests received and not started are dropped.
 */
import type { Socket } from 'node:net'
import { toUkaiError } from '../../errors.js'
import type { NbdBackend } from './exports.js'
import { BufferBudget, type Ledger } from './budget.js'
import type { FrameReader } from './frame-reader.js'
import type { Negotiated } from './handshake.js'
import { BufferPool } from '../../util/buffer-pool.js'
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
/**
 * Reply bytes queued on the socket beyond which no new request is parsed:
 * a client that does not take its replies gets no more served.
 */
export const MAX_UNSENT = 16 * 2 ** 20
/**
 * Received bytes held beyond the request being assembled (a WRITE's
 * payload): pipelined request headers (64 KiB is 2340 of them).
 */
export const READ_AHEAD = 64 * 1024
/**
 * "Servers SHOULD NOT send more than 2^20 extents in a single reply chunk";
 * the server "MAY return fewer descriptors in the reply than would be
 * required to fully specify the whole range".
 */
export const MAX_DESCRIPTORS = 2 ** 20
/** A BLOCK_STATUS looks at no more than this many blocks (each costs a lookup). */
export const MAX_STATUS_BLOCKS = 4096
/**
 * TRIM and WRITE_ZEROES run this many whole blocks at a time, one step
 * after the other: a 28-byte request of 4 GiB must not start thousands of
 * block operations (and zero buffers) at once.
 */
export const DISCARD_STEP_BLOCKS = 16
/** Zeros a volume writes per block at a time (the block store's zero buffer), for the budget. */
const ZERO_BUFFER = 2 ** 20
/** Bytes counted for a reply header (simple 16, structured OFFSET_DATA 28). */
const REPLY_HEADER = 32
/**
 * Requests one connection starts per event-loop turn: a backend that
 * answers without I/O (holes) must not let one client's pipeline hold the
 * loop while others wait.
 */
export const DISPATCH_PER_TURN = 256
const EMPTY = Buffer.alloc(0)
/**
 * Buffers of large READ replies and of WRITE payloads assembled from
 * several socket chunks, shared by every connection of the process (see
 * BufferPool): a reply's goes back once the socket has taken it, a
 * payload's only when the backend calls the write's `released` (every
 * consumer done with it, and the write taken everywhere: NbdBackend);
 * one a backend never releases is left to the collector. 4 KiB requests
 * are small enough for plain allocations.
 */
const ioBuffers = new BufferPool({ min: 64 * 1024, max: 32 * 2 ** 20, retain: 32 * 2 ** 20 })
/** A request at least this costly is started only once the socket is known to still have a peer (unix sockets). */
const LIVENESS_COST = 256 * 1024

/** What a transmission needs from its connection. */
export interface TransmissionContext {
  /** Bytes held across connections; requests that need more wait for room. */
  budget: BufferBudget
  /** This connection, as the budget knows it. */
  ledger: Ledger
  /** Reports the connection's bytes to the budget; called after every change. */
  account: () => void
  warn: (message: string) => void
  /** Ask the socket with a zero-length write whether the peer is gone (default true; a fake socket may not answer). */
  probe?: boolean
}

export class Transmission {
  private readonly socket: Socket
  private readonly reader: FrameReader
  private readonly backend: NbdBackend
  private readonly session: SessionState
  private readonly ctx: TransmissionContext
  private readonly warn: (message: string) => void
  private inflight = 0
  /** Budget bytes of the requests being served (READ buffers, WRITE payloads, zero buffers). */
  private inflightBytes = 0
  /** A valid WRITE whose payload has not fully arrived. */
  private pendingWrite: NbdRequest | undefined
  /** Its payload, assembled as it arrives (when it did not come in one chunk), and the bytes in it so far. */
  private assembly: Buffer | undefined
  private assembled = 0
  /** Payload bytes of a refused WRITE still to be dropped. */
  private drainLeft = 0
  /** False once no further request will be read (DISC, end, shutdown, violation). */
  private accepting = true
  private hard = false
  /** The peer will send nothing more. */
  private peerEnded = false
  private paused = false
  /** Waiting for room in the budget (the next request is parsed, not yet taken). */
  private waiting = false
  /** The last pump stopped inside a request: the client owes bytes. */
  private partial = false
  /** The last pump stopped for flow control (not for want of bytes): a reply leaving may unblock it. */
  private blocked = false
  /** A zero-length write is asking the socket whether the peer is still there. */
  private probing = false
  /** Requests started in this event-loop turn, and whether pump gave way for the next turn. */
  private turnDispatches = 0
  private yielded = false
  /** The socket was asked in this turn whether its peer is still there. */
  private turnChecked = false
  private turnScheduled = false
  /** A unix socket: a zero-length write tells whether the peer closed. */
  private readonly local: boolean
  private corked = false
  private finished = false
  /**
   * Counts events that show the connection moving: bytes received, replies
   * taken by the kernel, reading resumed, a reply queued when none was. The
   * server's idle check compares it over time.
   */
  progress = 0
  private resolveDone!: () => void
  /** Resolves when no request is left in flight and nothing more will be read. */
  readonly done: Promise<void>

  /**
   * `ctx` may be just the warning sink: the transmission then has a budget
   * of its own without limit (for harnesses that drive it on a fake socket).
   */
  constructor (socket: Socket, reader: FrameReader, negotiated: Negotiated, ctx: TransmissionContext | ((message: string) => void)) {
    if (typeof ctx === 'function') ctx = standalone(ctx)
    this.socket = socket
    this.reader = reader
    this.backend = negotiated.export.backend
    this.session = {
      size: negotiated.export.size,
      flags: negotiated.flags,
      structured: negotiated.structured,
      allocationContext: negotiated.allocationContext
    }
    this.ctx = ctx
    this.warn = ctx.warn
    this.local = ctx.probe !== false && socket.remoteAddress === undefined
    this.done = new Promise((resolve) => { this.resolveDone = resolve })
  }

  /** False once no further request will be read: later bytes can be dropped unread. */
  get reading (): boolean { return this.accepting }

  /**
   * Budget bytes this transmission holds beyond the received bytes in the
   * reader and the replies on the socket: requests in flight, and the part
   * of an admitted WRITE's payload that has not arrived yet.
   */
  get reserved (): number {
    const w = this.pendingWrite
    if (w === undefined) return this.inflightBytes
    return this.inflightBytes + (this.assembly !== undefined ? w.length : Math.max(0, w.length - this.reader.length))
  }

  /** Payload bytes of the pending WRITE still to be received. */
  private payloadLeft (): number {
    const w = this.pendingWrite
    return w === undefined ? 0 : w.length - this.assembled
  }

  /**
   * Waiting on the client for ms: the client left a request half-sent
   * while the server reads, or its replies are queued and not taken. An
   * idle connection with nothing pending, or one whose requests are being
   * served (however slowly), is not stuck.
   */
  get stuck (): 'request' | 'replies' | undefined {
    if (this.hard || this.socket.destroyed) return undefined
    if (this.socket.writableLength > 0) return 'replies'
    if (this.accepting && !this.paused && this.partial) return 'request'
    return undefined
  }

  /** Bytes arrived (already pushed into the reader), a request finished, or the socket drained. */
  pump (): void {
    /** True when the loop stopped for want of bytes (not for flow control). */
    let starved = false
    while (this.accepting) {
      if (!this.socket.writable) {
        // The connection broke (a reply could not be written): no reply can
        // be delivered any more, so nothing more is started.
        this.abandon()
        return
      }
      if (this.drainLeft > 0) {
        // "a write payload is always drained": a refused WRITE's data is
        // dropped, never taken for the next request header.
        this.drainLeft -= this.reader.skip(this.drainLeft)
        if (this.drainLeft > 0) { starved = true; break }
        continue
      }
      const w = this.pendingWrite
      if (w !== undefined) {
        let payload: Buffer
        if (this.assembly === undefined && this.reader.headLength >= w.length) {
          // In one received chunk: a view of it.
          payload = this.reader.take(w.length)
        } else {
          // Copied as it arrives, a socket chunk at a time: a 32 MiB
          // payload is never one long copy holding the event loop. The
          // buffer may be one an earlier WRITE's backend released
          // (ioBuffers).
          this.assembly ??= ioBuffers.take(w.length)
          this.assembled += this.reader.takeInto(this.assembly, this.assembled, w.length - this.assembled)
          if (this.assembled < w.length) { starved = true; break }
          payload = this.assembly
          this.assembly = undefined
          this.assembled = 0
        }
        this.pendingWrite = undefined
        this.dispatch(w, payload, w.length)
        continue
      }
      if (this.saturated()) break
      // After the peer's end of file, one request at a time: a client that
      // half-closed gets every reply, one that is gone costs at most one
      // more request before a reply fails to be written.
      if (this.peerEnded && (this.inflight > 0 || this.socket.writableLength > 0)) break
      if (this.probing) break
      if (this.turnDispatches >= DISPATCH_PER_TURN) { this.yielded = true; break }
      if (this.reader.length < NBD_REQUEST_SIZE) { starved = true; break }
      const req = parseRequest(this.reader.peek(NBD_REQUEST_SIZE))
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
        this.reader.skip(NBD_REQUEST_SIZE)
        this.stopReading()
        break
      }
      const bad = validateRequest(req, this.session)
      const cost = bad === undefined ? this.costOf(req) : 0
      if (cost >= LIVENESS_COST && !this.peerAlive()) {
        // The client sent this and left: a READ of it could never be answered.
        this.abandon()
        return
      }
      if (cost > 0) {
        if (!this.ctx.budget.admit(this.ctx.ledger, cost)) {
          // No room: the request stays unread until the budget wakes us.
          this.waiting = true
          this.ctx.budget.wait(this.ctx.ledger, cost, this.wake)
          break
        }
        if (this.waiting) {
          this.waiting = false
          this.ctx.budget.cancel(this.ctx.ledger)
        }
      }
      this.turnDispatches++
      this.scheduleTurn()
      this.reader.skip(NBD_REQUEST_SIZE)
      if (req.type === NBD_CMD_WRITE) {
        if (bad !== undefined) {
          this.drainLeft = req.length
          this.replyError(req, bad.error, bad.message)
        } else {
          this.pendingWrite = req
        }
        this.ctx.account()
        continue
      }
      if (bad !== undefined) this.replyError(req, bad.error, bad.message)
      else this.dispatch(req, undefined, cost)
    }
    this.blocked = this.accepting && !starved
    this.partial = starved && (this.reader.length > 0 || this.pendingWrite !== undefined || this.drainLeft > 0)
    // After the peer's last byte, a frame that has not arrived never will:
    // a partial request is dropped. Complete ones held back by flow
    // control are still served as requests finish.
    if (starved && this.peerEnded) this.stopReading()
    this.ctx.account()
    this.flow()
    this.maybeDone()
  }

  /**
   * The peer sent its last byte. Requests received in full are still
   * served (a client may half-close after its last request).
   */
  end (): void {
    if (this.peerEnded) return
    this.peerEnded = true
    this.probe()
    this.pump()
  }

  /**
   * The socket is closed: replies can no longer be delivered, so requests
   * not started yet are dropped, and those in flight are followed by none.
   */
  gone (): void {
    this.peerEnded = true
    this.abandon()
  }

  /** The server is closing: requests in flight are answered, no new one is read. */
  shutdown (): void {
    this.stopReading()
    this.ctx.account()
    this.flow()
    this.maybeDone()
  }

  /** The server's idle check found the connection stuck for too long: it is dropped. */
  timeout (): void {
    this.hardDisconnect()
  }

  /**
   * Is the peer still there to take replies? A zero-length write sends
   * nothing, but on a unix socket whose peer has closed entirely it fails
   * (EPIPE), where a peer that only half-closed is still writable; so
   * requests of a client that is gone are not started. (On TCP it always
   * succeeds: there the first reply that cannot be written tells.)
   */
  private probe (): void {
    if (this.probing || this.hard || !this.socket.writable || this.ctx.probe === false) return
    this.probing = true
    this.socket.write(EMPTY, (err) => {
      this.probing = false
      if (err != null) this.abandon()
      else this.written()
    })
  }

  /**
   * False when the socket's peer is known to be gone. On a unix socket a
   * zero-length write fails at once (EPIPE) when the peer has closed, so
   * a client that sent requests and left is found out before its costly
   * requests start; asked once per event-loop turn, and only when nothing
   * is queued before it (queued replies find out by themselves).
   */
  private peerAlive (): boolean {
    const s = this.socket
    if (this.local && !this.turnChecked && !this.corked && s.writableLength === 0 && s.writable) {
      this.turnChecked = true
      this.scheduleTurn()
      s.write(EMPTY)
    }
    return s.writable
  }

  private scheduleTurn (): void {
    if (this.turnScheduled) return
    this.turnScheduled = true
    setImmediate(this.nextTurn)
  }

  private readonly nextTurn = (): void => {
    this.turnScheduled = false
    this.turnChecked = false
    this.turnDispatches = 0
    if (!this.yielded) return
    this.yielded = false
    try {
      if (this.accepting) this.pump()
    } catch (bug) {
      this.fault(bug)
    }
  }

  private abandon (): void {
    this.stopReading()
    this.ctx.account()
    this.maybeDone()
  }

  private stopReading (): void {
    this.accepting = false
    this.pendingWrite = undefined
    this.assembly = undefined
    this.assembled = 0
    this.drainLeft = 0
    this.partial = false
    if (this.waiting) {
      this.waiting = false
      this.ctx.budget.cancel(this.ctx.ledger)
    }
    // What was received and not started is dropped, not held.
    this.reader.skip(this.reader.length)
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
    this.ctx.account()
    this.maybeDone()
  }

  /**
   * The budget has room again. The client may have left while this
   * connection waited (its end of file unread or not yet seen): the socket
   * is asked first, so nothing is started for a client that is gone.
   */
  private readonly wake = (): void => {
    if (!this.waiting) return
    try {
      this.probe()
      this.pump()
    } catch (bug) {
      this.fault(bug)
    }
  }

  /**
   * Budget bytes a valid request needs while it runs: a READ its reply
   * buffer, a WRITE its payload, a WRITE_ZEROES the zeros the volume
   * writes for one step, a BLOCK_STATUS its descriptors. Other replies are
   * small and counted once queued.
   */
  private costOf (req: NbdRequest): number {
    switch (req.type) {
      case NBD_CMD_READ: return req.length + REPLY_HEADER
      case NBD_CMD_WRITE: return req.length
      case NBD_CMD_WRITE_ZEROES: return Math.min(req.length, DISCARD_STEP_BLOCKS * Math.min(this.blockSize(), ZERO_BUFFER))
      case NBD_CMD_BLOCK_STATUS: return REPLY_HEADER + 8 * Math.min(MAX_DESCRIPTORS, 2 * MAX_STATUS_BLOCKS)
      default: return 0
    }
  }

  private blockSize (): number {
    const b = this.backend.blockSize
    return Number.isSafeInteger(b) && b > 0 ? b : MAX_PAYLOAD
  }

  private saturated (): boolean {
    return this.inflight >= MAX_INFLIGHT || this.inflightBytes >= MAX_INFLIGHT_BYTES || this.socket.writableLength >= MAX_UNSENT
  }

  /**
   * Whether the socket is read: paused once READ_AHEAD bytes beyond the
   * request being assembled (an admitted WRITE's payload) are held, never
   * while a refused WRITE's payload is being drained.
   */
  private flow (): void {
    // Reading goes on while requests wait (for the budget, for requests in
    // flight): what is held stays bounded by the read-ahead, and the
    // client's end of file is seen.
    const pause = this.accepting && this.drainLeft === 0 && this.reader.length >= this.payloadLeft() + READ_AHEAD
    if (pause === this.paused) return
    this.paused = pause
    if (pause) {
      this.socket.pause()
    } else {
      this.progress++
      this.socket.resume()
    }
  }

  private maybeDone (): void {
    if (this.accepting || this.inflight > 0 || this.finished) return
    this.finished = true
    // Replies queued so far still go out; end() uncorks.
    if (!this.hard && !this.socket.destroyed) this.socket.end()
    this.resolveDone()
  }

  private dispatch (req: NbdRequest, payload: Buffer | undefined, cost: number): void {
    this.inflight++
    this.inflightBytes += cost
    // The budget sees it before the next request asks for room.
    this.ctx.account()
    void this.serve(req, payload, cost)
  }

  /** Runs one request to its reply; never rejects. */
  private async serve (req: NbdRequest, payload: Buffer | undefined, cost: number): Promise<void> {
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
      this.inflightBytes -= cost
    }
    try {
      if (this.accepting) this.pump()
      else {
        this.ctx.account()
        this.maybeDone()
      }
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
        this.send(encodeSimpleReply(req, 0))
        return
      case NBD_CMD_WRITE: await b.write(req.offset, payload!, released(payload!)); break
      case NBD_CMD_TRIM: await this.inSteps(req, async (offset, length) => await b.trim(offset, length)); break
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
        await this.inSteps(req, async (offset, length) => await b.zero(offset, length, !noHole))
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
   * Runs a TRIM or WRITE_ZEROES over DISCARD_STEP_BLOCKS whole blocks at a
   * time (steps end on block boundaries, so each block sees the same
   * operation it would see in one call). Once the connection is broken
   * the remaining steps are skipped: the reply could not be delivered, and
   * an unanswered request may have been done in part.
   */
  private async inSteps (req: NbdRequest, op: (offset: number, length: number) => Promise<void>): Promise<void> {
    const step = DISCARD_STEP_BLOCKS * this.blockSize()
    const end = req.offset + req.length
    for (let at = req.offset; at < end;) {
      if (at > req.offset && !this.socket.writable) return
      const next = Math.min(end, (Math.floor(at / step) + 1) * step)
      await op(at, next - at)
      at = next
    }
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
      if (req.length === 0) { this.send(encodeStructuredNone(req)); return }
      const buf = allocOffsetData(req, NBD_REPLY_FLAG_DONE, req.offset, req.length, ioBuffers)
      await this.fillPooled(req.offset, buf, OFFSET_DATA_OFFSET)
    } else {
      const buf = allocSimpleRead(req, req.length, ioBuffers)
      await this.fillPooled(req.offset, buf, SIMPLE_DATA_OFFSET)
    }
  }

  /**
   * Fills a pooled reply from `at` on and sends it; the buffer goes back
   * to the pool once the socket took it (or at once when the socket takes
   * nothing more). A read that failed leaves it to the collector.
   */
  private async fillPooled (offset: number, buf: Buffer, at: number): Promise<void> {
    await this.fill(offset, buf.subarray(at))
    if (!this.send(buf, () => ioBuffers.give(buf))) ioBuffers.give(buf)
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

  /**
   * Replies finished in the same tick leave in one writev. False when the
   * socket takes nothing more (the reply is dropped); otherwise `taken`
   * runs once the socket is done with `buf` (written, or the connection
   * gone).
   */
  private send (buf: Buffer, taken?: () => void): boolean {
    const s = this.socket
    if (s.destroyed || !s.writable) return false
    if (!this.corked) {
      this.corked = true
      s.cork()
      process.nextTick(this.uncork)
    }
    // The wait for a client to take its replies starts when one is queued.
    if (s.writableLength === 0) this.progress++
    s.write(buf, taken === undefined ? this.written : () => { taken(); this.written() })
    return true
  }

  /** A reply reached the kernel: the bytes it held are released, and reading may resume. */
  private readonly written = (): void => {
    this.progress++
    try {
      if (this.accepting && this.blocked) this.pump()
      else this.ctx.account()
    } catch (bug) {
      this.fault(bug)
    }
  }

  private readonly uncork = (): void => {
    this.corked = false
    this.socket.uncork()
  }
}

/**
 * The callback a backend calls when nothing reads `buf` any more: it goes
 * back to the pool, once (a later call would give back a buffer lent
 * again since). A payload that is no buffer of the pool (a view of a
 * socket chunk) the pool ignores.
 */
function released (buf: Buffer): () => void {
  let done = false
  return () => {
    if (done) return
    done = true
    ioBuffers.give(buf)
  }
}

/** A context with a budget of its own that never says no. */
function standalone (warn: (message: string) => void): TransmissionContext {
  return { budget: new BufferBudget({ limit: Number.MAX_SAFE_INTEGER }), ledger: { accounted: 0 }, account: () => {}, warn, probe: false }
}
