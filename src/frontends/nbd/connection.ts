/**
 * One client connection: the handshake, then the transmission phase, then
 * the export is released. Whatever the client sends or however it leaves
 * (garbage, a dropped connection mid-request), only this connection ends;
 * every error is caught here and the `closed` promise never rejects.
 *
 * The connection is a Ledger of the process-wide budget (budget.ts): the
 * bytes it holds (received and not consumed, replies queued on the
 * socket, the requests its transmission serves) are reported after every
 * change, and released when it ends.
 */
import type { Socket } from 'node:net'
import { TLSSocket } from 'node:tls'
import { toUkaiError } from '../../errors.js'
import { processBudget, type BufferBudget, type Ledger } from './budget.js'
import type { ExportProvider } from './exports.js'
import { FrameReader } from './frame-reader.js'
import { HardDisconnect, MAX_OPTION_DATA, negotiate, type HandshakeIO, type Negotiated } from './handshake.js'
import { NBD_OPTION_HEADER_SIZE } from './protocol.js'
import { Transmission } from './transmission.js'
import { clientIdentity, type NodeTls, type PeerIdentity } from '../../tls/identity.js'

/** A client must finish its handshake this long after connecting. */
export const HANDSHAKE_TIMEOUT_MS = 60_000
/** A client stuck this long mid-request (or not taking its replies) is dropped. */
export const IO_TIMEOUT_MS = 30_000
/** How long replies may take to leave after the connection is ended, before it is dropped. */
export const END_GRACE_MS = 10_000
/** Bytes held unread during the handshake (one option, with its header). */
const HANDSHAKE_BUFFER = MAX_OPTION_DATA + NBD_OPTION_HEADER_SIZE
/** Option replies queued beyond which no further option is read until the client takes them. */
const HANDSHAKE_UNSENT = 64 * 1024

export interface ConnectionOptions {
  budget?: BufferBudget
  handshakeTimeoutMs?: number
  /** What the operator should know that is not an error of the node (a client dropped); default: `warn`. */
  notice?: (message: string) => void
  /**
   * The node's TLS identity: the connection runs in FORCEDTLS mode and
   * every client must show a certificate of the cluster CA.
   */
  tls?: NodeTls
}

export class NbdConnection implements Ledger {
  /** The client's socket: the TCP one, then the TLS one over it after NBD_OPT_STARTTLS. */
  socket: Socket
  /** Resolves once the connection is over and its export released. */
  readonly closed: Promise<void>
  /** Bytes this connection holds, as the budget knows it. */
  accounted = 0
  /** Who this is, for messages. */
  readonly who: string
  private readonly reader: FrameReader
  private readonly exports: ExportProvider
  private readonly warn: (message: string) => void
  private readonly notice: (message: string) => void
  private readonly budget: BufferBudget
  private transmission: Transmission | undefined
  private exportName: string | undefined
  private stopping = false
  private paused = false
  private released = false
  private handshakeTimer: NodeJS.Timeout | undefined
  /** The idle check's last look: the transmission's progress count and when it was seen to change. */
  private seenProgress = -1
  private seenAt = 0
  private readonly tls: NodeTls | undefined

  constructor (socket: Socket, exports: ExportProvider, warn: (message: string) => void, options: ConnectionOptions = {}) {
    this.socket = socket
    this.exports = exports
    this.warn = warn
    this.notice = options.notice ?? warn
    this.budget = options.budget ?? processBudget
    this.who = `an NBD client (${socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${socket.remotePort ?? ''}` : 'unix socket'})`
    // A reader that waits for bytes needs the socket flowing again.
    this.reader = new FrameReader(() => this.resume())
    // "both the client and server SHOULD disable Nagle's algorithm"; a no-op on unix sockets.
    socket.setNoDelay(true)
    // A TCP peer whose host vanished is found out; an idle healthy client is never dropped.
    socket.setKeepAlive(true, 60_000)
    // The whole handshake, not only each wait in it: a client trickling
    // bytes cannot hold a connection in its handshake for ever.
    this.handshakeTimer = setTimeout(() => { if (this.transmission === undefined) socket.destroy() }, options.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS)
    this.handshakeTimer.unref()
    this.tls = options.tls
    this.attach(socket)
    this.closed = this.run()
      .catch((err) => this.warn(`NBD connection: ${toUkaiError(err).message}`))
      .finally(() => this.release())
  }

  private readonly listeners = {
    data: (chunk: Buffer) => this.guard(() => this.onData(chunk)),
    end: () => this.guard(() => this.onEnd()),
    close: () => this.guard(() => this.onClose()),
    error: () => { /* 'close' follows; the client's trouble is not the node's */ },
    drain: () => this.guard(() => { if (this.transmission !== undefined) this.transmission.pump(); else this.account() })
  }

  private attach (socket: Socket): void {
    for (const [event, fn] of Object.entries(this.listeners)) socket.on(event, fn)
  }

  private detach (socket: Socket): void {
    for (const [event, fn] of Object.entries(this.listeners)) socket.off(event, fn)
  }

  /**
   * After the ACK to NBD_OPT_STARTTLS: the TLS handshake on this socket,
   * then everything goes through the TLS socket. "the client MUST NOT
   * send anything [after STARTTLS] until it has received the reply", so
   * bytes already received are a protocol violation.
   */
  private async startTls (tls: NodeTls): Promise<PeerIdentity | undefined> {
    const raw = this.socket
    if (this.reader.length !== 0) throw new HardDisconnect('bytes sent after NBD_OPT_STARTTLS before its reply')
    // The ACK leaves in plain text before the TLS socket takes the stream over.
    if (raw.writableLength > 0) await new Promise<void>((resolve) => { raw.once('drain', resolve); raw.once('close', resolve) })
    this.detach(raw)
    raw.on('error', () => {})
    const secure = new TLSSocket(raw, { isServer: true, secureContext: tls.context, requestCert: true, rejectUnauthorized: true })
    this.socket = secure
    this.attach(secure)
    await new Promise<void>((resolve, reject) => {
      const done = (err?: Error): void => {
        secure.off('secure', ok)
        secure.off('close', gone)
        secure.off('error', done)
        if (err === undefined) resolve(); else reject(err)
      }
      const ok = (): void => done()
      const gone = (): void => done(new Error('the client closed the connection during the TLS handshake'))
      secure.once('secure', ok)
      secure.once('close', gone)
      secure.once('error', done)
    })
    return clientIdentity(secure, tls.ca)
  }

  /** The server is closing: a handshake is cut off, a transmission finishes what is in flight. */
  shutdown (): void {
    this.stopping = true
    if (this.transmission !== undefined) this.transmission.shutdown()
    else this.socket.destroy()
  }

  /**
   * The server's periodic idle check. A connection in transmission that
   * is stuck (a request half-sent while the server reads, or replies the
   * client does not take) and has not moved for `ioTimeoutMs` is dropped,
   * which releases its export. Idle connections with nothing pending are
   * left alone however long they sit.
   */
  checkIdle (now: number, ioTimeoutMs: number): void {
    const t = this.transmission
    if (t === undefined) return
    const why = t.stuck
    if (why === undefined || t.progress !== this.seenProgress) {
      this.seenProgress = t.progress
      this.seenAt = now
      return
    }
    if (now - this.seenAt < ioTimeoutMs) return
    this.notice(`NBD: dropped ${this.who} on '${this.exportName ?? '?'}': ${why === 'request' ? 'a request left unfinished' : 'its replies not taken'} for ${ioTimeoutMs / 1000} s`)
    t.timeout()
  }

  /** Reports what this connection holds to the budget. */
  account (): void {
    if (this.released) return
    const s = this.socket
    const now = this.reader.length + (s.destroyed ? 0 : s.writableLength) + (this.transmission?.reserved ?? 0)
    const delta = now - this.accounted
    if (delta === 0) return
    this.accounted = now
    this.budget.adjust(delta)
  }

  private release (): void {
    if (this.released) return
    this.released = true
    clearTimeout(this.handshakeTimer)
    this.budget.cancel(this)
    this.budget.adjust(-this.accounted)
    this.accounted = 0
  }

  /**
   * Runs an event handler so that an unexpected exception (a bug) ends
   * this connection and is reported, instead of ending the process.
   */
  private guard (fn: () => void): void {
    try {
      fn()
    } catch (err) {
      if (this.transmission !== undefined) return this.transmission.fault(err)
      this.warn(`NBD connection dropped after an internal error: ${(err as Error)?.stack ?? String(err)}`)
      this.socket.destroy()
    }
  }

  private onData (chunk: Buffer): void {
    const t = this.transmission
    if (t !== undefined) {
      if (!t.reading) return // after NBD_CMD_DISC nothing more is read
      t.progress++
      this.reader.push(chunk)
      t.pump()
      return
    }
    this.reader.push(chunk)
    if (this.reader.length > HANDSHAKE_BUFFER && !this.paused) {
      this.paused = true
      this.socket.pause()
    }
    this.account()
  }

  private resume (): void {
    if (!this.paused) return
    this.paused = false
    this.socket.resume()
  }

  private onEnd (): void {
    this.reader.end()
    this.transmission?.end()
  }

  private onClose (): void {
    this.reader.end()
    this.transmission?.gone()
    this.account()
  }

  /** Resolves when the client has taken enough of the option replies (or the connection is gone). */
  private async drained (): Promise<void> {
    const s = this.socket
    if (s.destroyed || s.writableLength <= HANDSHAKE_UNSENT) return
    await new Promise<void>((resolve) => {
      const done = (): void => { s.off('drain', done); s.off('close', done); resolve() }
      s.on('drain', done)
      s.on('close', done)
    })
  }

  private async run (): Promise<void> {
    const io: HandshakeIO = {
      read: async (n) => {
        // Options are answered one at a time: a client that sends more
        // without reading the answers gets no more read.
        await this.drained()
        const b = await this.reader.read(n)
        this.account()
        return b
      },
      discard: async (n) => { await this.reader.discard(n); this.account() },
      write: (buf) => { if (!this.socket.destroyed) { this.socket.write(buf, this.written); this.account() } },
      startTls: this.tls === undefined ? undefined : async () => await this.startTls(this.tls!)
    }
    let negotiated: Negotiated | undefined
    try {
      negotiated = await negotiate(io, { exports: this.exports, who: this.who, shuttingDown: () => this.stopping })
    } catch (err) {
      // A garbled handshake, a client that left, or a refused
      // NBD_OPT_EXPORT_NAME: this connection ends, nothing else does.
      if (!(err instanceof HardDisconnect) && !this.reader.isEnded) this.warn(`NBD handshake: ${toUkaiError(err).message}`)
      this.socket.destroy()
      return
    }
    if (negotiated === undefined) {
      // NBD_OPT_ABORT: the ACK is sent, then the client drops the connection.
      await this.finish()
      return
    }
    try {
      if (this.stopping || this.socket.destroyed) {
        this.socket.destroy()
        return
      }
      clearTimeout(this.handshakeTimer)
      this.exportName = negotiated.export.name
      const t = new Transmission(this.socket, this.reader, negotiated, {
        budget: this.budget,
        ledger: this,
        account: () => this.account(),
        warn: this.warn
      })
      this.transmission = t
      this.resume()
      this.guard(() => { if (this.reader.isEnded) t.end(); else t.pump() })
      await t.done
      await this.finish()
    } finally {
      await negotiated.export.close().catch((err) => this.warn(`NBD: releasing export '${negotiated!.export.name}': ${toUkaiError(err).message}`))
    }
  }

  private readonly written = (): void => { this.account() }

  /** Ends the connection once queued replies have left, or after a grace period. */
  private async finish (): Promise<void> {
    const s = this.socket
    if (!s.destroyed) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, END_GRACE_MS)
        timer.unref()
        const done = (): void => { clearTimeout(timer); resolve() }
        s.once('close', done)
        if (s.writableFinished) done()
        else {
          s.once('finish', done)
          if (!s.writableEnded) s.end()
        }
      })
    }
    s.destroy()
  }
}
