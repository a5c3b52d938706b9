/**
 * One client connection: the handshake, then the transmission phase, then
 * the export is released. Whatever the client sends or however it leaves
 * (garbage, a dropped connection mid-request), only this connection ends;
 * every error is caught here and the `closed` promise never rejects.
 */
import type { Socket } from 'node:net'
import { toUkaiError } from '../../errors.js'
import type { ExportProvider } from './exports.js'
import { FrameReader } from './frame-reader.js'
import { HardDisconnect, MAX_OPTION_DATA, negotiate, type HandshakeIO, type Negotiated } from './handshake.js'
import { NBD_OPTION_HEADER_SIZE } from './protocol.js'
import { Transmission } from './transmission.js'

/** A client idle this long during its handshake is dropped. */
export const HANDSHAKE_TIMEOUT_MS = 60_000
/** How long replies may take to leave after the connection is ended, before it is dropped. */
export const END_GRACE_MS = 10_000
/** Bytes held unread during the handshake (one option, with its header). */
const HANDSHAKE_BUFFER = MAX_OPTION_DATA + NBD_OPTION_HEADER_SIZE

export class NbdConnection {
  readonly socket: Socket
  /** Resolves once the connection is over and its export released. */
  readonly closed: Promise<void>
  private readonly reader: FrameReader
  private readonly exports: ExportProvider
  private readonly warn: (message: string) => void
  private transmission: Transmission | undefined
  private stopping = false
  private paused = false

  constructor (socket: Socket, exports: ExportProvider, warn: (message: string) => void) {
    this.socket = socket
    this.exports = exports
    this.warn = warn
    // A reader that waits for bytes needs the socket flowing again.
    this.reader = new FrameReader(() => this.resume())
    // "both the client and server SHOULD disable Nagle's algorithm"; a no-op on unix sockets.
    socket.setNoDelay(true)
    socket.setTimeout(HANDSHAKE_TIMEOUT_MS, () => { if (this.transmission === undefined) socket.destroy() })
    socket.on('data', (chunk: Buffer) => this.guard(() => this.onData(chunk)))
    socket.on('end', () => this.guard(() => this.onEnd()))
    socket.on('close', () => this.guard(() => this.onEnd()))
    socket.on('error', () => { /* 'close' follows; the client's trouble is not the node's */ })
    socket.on('drain', () => this.guard(() => this.transmission?.pump()))
    this.closed = this.run().catch((err) => this.warn(`NBD connection: ${toUkaiError(err).message}`))
  }

  /** The server is closing: a handshake is cut off, a transmission finishes what is in flight. */
  shutdown (): void {
    this.stopping = true
    if (this.transmission !== undefined) this.transmission.shutdown()
    else this.socket.destroy()
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
      this.reader.push(chunk)
      t.pump()
      return
    }
    this.reader.push(chunk)
    if (this.reader.length > HANDSHAKE_BUFFER && !this.paused) {
      this.paused = true
      this.socket.pause()
    }
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

  private async run (): Promise<void> {
    const io: HandshakeIO = {
      read: async (n) => await this.reader.read(n),
      discard: async (n) => await this.reader.discard(n),
      write: (buf) => { if (!this.socket.destroyed) this.socket.write(buf) }
    }
    const who = `an NBD client (${this.socket.remoteAddress ?? 'unix socket'})`
    let negotiated: Negotiated | undefined
    try {
      negotiated = await negotiate(io, { exports: this.exports, who, shuttingDown: () => this.stopping })
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
      this.socket.setTimeout(0)
      const t = new Transmission(this.socket, this.reader, negotiated, this.warn)
      this.transmission = t
      this.resume()
      this.guard(() => { if (this.reader.isEnded) t.end(); else t.pump() })
      await t.done
      await this.finish()
    } finally {
      await negotiated.export.close().catch((err) => this.warn(`NBD: releasing export '${negotiated!.export.name}': ${toUkaiError(err).message}`))
    }
  }

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
