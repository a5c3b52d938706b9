/**
 * The NBD client one node uses to reach another node's replicas (the peer
 * protocol), following NetworkBlockDevice/nbd doc/proto.md.
 *
 * Handshake: fixed newstyle, NBD_OPT_GO with an NBD_INFO_BLOCK_SIZE
 * request, falling back to NBD_OPT_EXPORT_NAME only when the server does
 * not know NBD_OPT_GO. Transmission: simple replies, or with
 * `blockStatus` structured replies and NBD_CMD_BLOCK_STATUS of
 * base:allocation where the server offers them; requests pipelined on one
 * socket and matched to replies by cookie, so replies may come in any
 * order.
 *
 * Failure model: a connection is either healthy or dead. A reset, a reply
 * that breaks the protocol or a request that is not answered in time ends
 * the connection and fails every request on it with a UkaiError; the
 * caller (RemoteReplica's pool) opens a new one. Nothing here throws past
 * a promise or emits 'error'.
 */
import { EventEmitter } from 'node:events'
import { connect as netConnect, type Socket } from 'node:net'
import { connect as tlsConnect, type PeerCertificate, type SecureContext } from 'node:tls'
import { performance } from 'node:perf_hooks'
import { UkaiError } from '../errors.js'
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES, NBD_ESHUTDOWN, NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_MAX_STRING, NBD_REQUEST_MAGIC, NBD_REQUEST_SIZE, NBD_STATE_HOLE, NBD_STATE_ZERO, commandName
} from '../frontends/nbd/protocol.js'
import { Handshake, HandshakeQueue, type Negotiated } from './nbd-handshake.js'
import { ReplyParser, errorCodeForNbd, nbdErrorName, protocolError, type StatusExtent } from './nbd-reply-parser.js'
import { show } from '../util/show.js'

export { ReplyParser, errorCodeForNbd, type ReplyTarget } from './nbd-reply-parser.js'

export type NbdTarget = { host: string, port: number } | { path: string }

export interface NbdClientOptions {
  /**
   * Per-request timeout (ms). A request not answered in time fails with
   * UKAI_ERR_TIMEOUT and the connection is closed (all its pending requests
   * fail too). Also bounds connect + handshake.
   */
  timeoutMs: number
  /**
   * Speak TLS (NBD_OPT_STARTTLS, then the TLS handshake, then the rest of
   * the haggling): this node's certificate and CA, and the check of the
   * server's certificate (the CA is checked first, always).
   */
  tls?: ClientTls
  /**
   * Negotiate structured replies and the base:allocation metadata context,
   * for blockStatus(). A server without them still gives a connection
   * (`hasBlockStatus` false).
   */
  blockStatus?: boolean
}

/** One extent of a block status answer (base:allocation): its bytes, and whether they are a hole or read as zeros. */
export interface AllocationExtent { offset: number, length: number, hole: boolean, zero: boolean }

export interface ClientTls {
  context: SecureContext
  checkServerIdentity: (host: string, cert: PeerCertificate) => Error | undefined
}

/** Parts of one split request in flight at a time (bounds what waits in the socket's queue). */
const SPLIT_WINDOW = 8
/**
 * Largest effect length of one TRIM or WRITE_ZEROES. The spec lets these
 * exceed the maximum payload ("the client MAY request an effect length
 * larger than the maximum payload size"), but the field is 32 bits and a
 * server "MAY reply with an NBD_EOVERFLOW or NBD_EINVAL error" for very
 * large ones, so stay well inside both.
 */
const MAX_EFFECT_LENGTH = 2 ** 30
/** Largest zero buffer written when the server cannot WRITE_ZEROES. */
const MAX_ZERO_CHUNK = 4 * 2 ** 20
/** setTimeout's longest delay; a longer one would fire at once. Deadlines further out are re-checked. */
const MAX_TIMER = 2 ** 31 - 1
/** Bytes the socket reads at once into one reused buffer (see `onread` in connect). */
const READ_BUFFER_SIZE = 256 * 1024

function describe (target: NbdTarget): string {
  return 'path' in target ? target.path : `${target.host}:${target.port}`
}

interface InFlight {
  type: number
  offset: number
  length: number
  /** READ: where the payload goes; null for every other command. */
  dest: Buffer | null
  /** BLOCK_STATUS: the descriptors of the base:allocation chunk. */
  extents?: StatusExtent[]
  /** performance.now() after which the request has timed out. */
  deadline: number
  resolve: () => void
  reject: (err: Error) => void
}

/** Shared source of zeroes for servers without WRITE_ZEROES; only ever read. */
let zeroChunk: Buffer | undefined
const zeroes = (n: number): Buffer => {
  if (zeroChunk === undefined || zeroChunk.length < n) zeroChunk = Buffer.alloc(Math.max(n, zeroChunk?.length ?? 0))
  return zeroChunk.subarray(0, n)
}

/**
 * After the server's ACK to NBD_OPT_STARTTLS: the TLS handshake over the
 * connection, as a client with this node's certificate; `adopt` switches
 * the caller to the TLS socket before any of its data can arrive.
 */
async function startTls (raw: Socket, tls: ClientTls, queue: HandshakeQueue, where: string, adopt: (secure: Socket) => void): Promise<Socket> {
  // "the server MUST NOT send anything after the ACK until the TLS handshake".
  if (queue.rest().length > 0) throw new UkaiError('UKAI_ERR_CONNECT', `NBD server ${where} sent bytes after its reply to NBD_OPT_STARTTLS`)
  raw.removeAllListeners('data')
  const secure = tlsConnect({ socket: raw, secureContext: tls.context, rejectUnauthorized: true, checkServerIdentity: tls.checkServerIdentity, servername: undefined })
  adopt(secure)
  await new Promise<void>((resolve, reject) => {
    const done = (err?: Error): void => {
      secure.off('secureConnect', ok)
      secure.off('error', failed)
      if (err === undefined) resolve(); else reject(err)
    }
    const ok = (): void => done()
    const failed = (err: Error): void => done(new UkaiError('UKAI_ERR_CONNECT', `TLS with NBD server ${where} failed: ${err.message}`, undefined, { cause: err }))
    secure.once('secureConnect', ok)
    secure.once('error', failed)
  })
  return secure
}

export class NbdClient extends EventEmitter {
  readonly exportName: string
  /** Export size in bytes (NBD_INFO_EXPORT or the NBD_OPT_EXPORT_NAME reply). */
  readonly size: number
  readonly transmissionFlags: number
  /** Requests' offsets and lengths are multiples of this (NBD_INFO_BLOCK_SIZE, else 1). */
  readonly minBlockSize: number
  readonly preferredBlockSize: number
  /** Largest READ/WRITE payload sent in one request; larger ones are split. */
  readonly maxPayload: number
  /** The context ID of base:allocation, when the server selected it. */
  private readonly allocationContext: number | undefined
  private readonly socket: Socket
  private readonly timeoutMs: number
  /** True when the connection runs over TLS. */
  readonly secure: boolean
  private readonly pending = new Map<number, InFlight>()
  private readonly parser: ReplyParser
  private nextCookie = 1
  private corked = false
  private timer: NodeJS.Timeout | undefined
  /** Set once the connection is unusable; the reason every later request gets. */
  private failure: UkaiError | undefined
  /** NBD_ESHUTDOWN received: no new requests, soft disconnect once in-flight ones are answered. */
  private draining = false
  private closeEmitted = false
  private readonly ended: Promise<void>

  private constructor (socket: Socket, exportName: string, n: Negotiated, options: NbdClientOptions) {
    super()
    this.socket = socket
    this.exportName = exportName
    this.size = n.size
    // "bit 0, NBD_FLAG_HAS_FLAGS: MUST always be 1"; without it no flag means anything.
    this.transmissionFlags = (n.transmissionFlags & NBD_FLAG_HAS_FLAGS) !== 0 ? n.transmissionFlags : 0
    this.minBlockSize = n.minBlockSize
    this.preferredBlockSize = n.preferredBlockSize
    this.maxPayload = n.maxPayload
    this.timeoutMs = options.timeoutMs
    this.secure = options.tls !== undefined
    this.allocationContext = n.allocationContext
    this.parser = new ReplyParser({
      payloadOf: (cookie) => this.pending.get(cookie)?.dest,
      complete: (cookie, error, message) => this.complete(cookie, error, message),
      requestOf: (cookie) => this.pending.get(cookie),
      status: (cookie, context, extents) => {
        const req = this.pending.get(cookie)!
        // One context was asked for; "exactly one status chunk per negotiated metadata context ID".
        if (context !== this.allocationContext || req.extents === undefined || req.extents.length > 0) return protocolError(`unexpected status chunk for context ${context}`)
        req.extents.push(...extents)
        return undefined
      }
    }, n.structured)
    this.ended = new Promise((resolve) => {
      const onClose = (): void => {
        this.fail(new UkaiError('UKAI_ERR_CONNECT', 'the NBD server closed the connection'))
        if (!this.closeEmitted) {
          this.closeEmitted = true
          this.emit('close')
        }
        resolve()
      }
      // A socket that closed right after the handshake has no 'close' event left to give.
      if (socket.closed) process.nextTick(onClose)
      else socket.once('close', onClose)
    })
    socket.on('error', (err: NodeJS.ErrnoException) => {
      this.fail(new UkaiError('UKAI_ERR_CONNECT', `NBD connection failed: ${err.message}`, { syscall: err.code }, { cause: err }))
    })
    socket.on('end', () => {
      this.fail(new UkaiError('UKAI_ERR_CONNECT', 'the NBD server closed the connection'))
    })
  }

  /**
   * Connects and negotiates `exportName`. Rejects with UKAI_ERR_NOT_FOUND
   * for an export the server does not know, UKAI_ERR_TIMEOUT when the
   * handshake takes longer than `timeoutMs`, UKAI_ERR_CONNECT otherwise.
   */
  static async connect (target: NbdTarget, exportName: string, options: NbdClientOptions): Promise<NbdClient> {
    if (!Number.isFinite(options.timeoutMs) || options.timeoutMs <= 0) throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', `timeoutMs must be a positive number, not ${options.timeoutMs}`)
    // "MUST be no longer than 4096 bytes" (Conventions, strings).
    if (Buffer.byteLength(exportName, 'utf8') > NBD_MAX_STRING) throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', `NBD export name longer than ${NBD_MAX_STRING} bytes`)
    const where = describe(target)
    return await new Promise<NbdClient>((resolve, reject) => {
      const queue = new HandshakeQueue()
      let client: NbdClient | undefined
      const readBuffer = Buffer.allocUnsafe(READ_BUFFER_SIZE)
      // The socket reads into one buffer of ours instead of allocating a
      // chunk per read; whoever consumes a chunk must be done with it on return.
      const onread = {
        buffer: readBuffer,
        callback: (n: number, buf: Uint8Array): boolean => {
          const chunk = (buf as Buffer).subarray(0, n)
          if (client !== undefined) client.onData(chunk)
          else queue.push(chunk)
          return true
        }
      }
      // Over TLS the TLS socket reads for itself: chunks come as 'data'.
      const read = options.tls === undefined ? onread : undefined
      const raw = 'path' in target
        ? netConnect({ path: target.path, onread: read })
        : netConnect({ host: target.host, port: target.port, onread: read })
      let socket: Socket = raw
      if (options.tls !== undefined) raw.on('data', (chunk: Buffer) => queue.push(chunk))
      let handshake: Handshake | undefined
      let settled = false
      const finish = (err: UkaiError | undefined, n?: Negotiated): void => {
        if (settled) return
        settled = true
        clearTimeout(timer)
        socket.off('error', onError)
        socket.off('close', onClose)
        if (err !== undefined) {
          queue.end(err)
          // Never let a late 'error' of an abandoned socket go unhandled.
          socket.on('error', () => {})
          if (handshake?.softDisconnect === true) {
            // Let NBD_OPT_ABORT go out, then leave; do not wait for the server for long.
            socket.end()
            setTimeout(() => socket.destroy(), Math.min(MAX_TIMER, options.timeoutMs)).unref()
          } else {
            socket.destroy()
          }
          reject(err)
          return
        }
        client = new NbdClient(socket, exportName, n!, options)
        for (const rest of queue.rest()) client.onData(rest)
        resolve(client)
      }
      const timer = setTimeout(() => finish(new UkaiError('UKAI_ERR_TIMEOUT',
        `NBD connect and handshake with ${where} (export '${exportName}') took longer than ${options.timeoutMs} ms`)), Math.min(MAX_TIMER, options.timeoutMs))
      const onError = (err: NodeJS.ErrnoException): void => {
        const e = new UkaiError('UKAI_ERR_CONNECT', `cannot reach NBD server ${where}: ${err.message}`, { syscall: err.code }, { cause: err })
        queue.end(e)
        finish(e)
      }
      const onClose = (): void => queue.end(new UkaiError('UKAI_ERR_CONNECT', `NBD server ${where} closed the connection during the handshake`))
      socket.on('error', onError)
      socket.on('close', onClose)
      socket.once('connect', () => {
        // Requests are written as soon as they are made (batched per tick by
        // cork), never held back by Nagle. Both are no-ops on a unix socket.
        socket.setNoDelay(true)
        socket.setKeepAlive(true, 30_000)
        const upgrade = options.tls === undefined ? undefined : async (): Promise<Socket> => await startTls(raw, options.tls!, queue, where, (secure) => {
          socket.off('error', onError)
          socket.off('close', onClose)
          socket = secure
          socket.on('error', onError)
          socket.on('close', onClose)
          secure.on('data', (chunk: Buffer) => { if (client !== undefined) client.onData(chunk); else queue.push(chunk) })
        })
        handshake = new Handshake(socket, queue, exportName, upgrade, options.blockStatus === true)
        handshake.run().then((n) => finish(undefined, n), (err: unknown) => {
          finish(err instanceof UkaiError ? err : new UkaiError('UKAI_ERR_CONNECT', `NBD handshake failed: ${String(err)}`, undefined, { cause: err }))
        })
      })
    })
  }

  /** True once the connection cannot take requests (failed, closing or closed). */
  get closed (): boolean { return this.failure !== undefined || this.draining }

  /** Requests sent and not yet answered. */
  get inFlight (): number { return this.pending.size }

  get readOnly (): boolean { return (this.transmissionFlags & NBD_FLAG_READ_ONLY) !== 0 }

  /** True when blockStatus() can ask the server (base:allocation was negotiated). */
  get hasBlockStatus (): boolean { return this.allocationContext !== undefined }

  /**
   * The allocation of [offset, offset + length) (base:allocation), in
   * order from `offset`; it may cover less than asked ("the server MAY
   * return less data than requested"), never more, and at least one
   * byte. UKAI_ERR_NOT_SUPPORTED without block status (hasBlockStatus).
   */
  async blockStatus (offset: number, length: number): Promise<AllocationExtent[]> {
    this.check(NBD_CMD_BLOCK_STATUS, offset, length)
    if (this.allocationContext === undefined) throw new UkaiError('UKAI_ERR_NOT_SUPPORTED', `export '${this.exportName}' gives no block status (base:allocation was not negotiated)`)
    if (length === 0) return []
    // The length field is 32 bits.
    const asked = Math.min(length, this.effectLimit())
    const extents: StatusExtent[] = []
    await this.send(NBD_CMD_BLOCK_STATUS, 0, offset, asked, null, null, extents)
    const out: AllocationExtent[] = []
    let at = offset
    // "the final extent MAY result in a sum larger than the original requested length": cut at the end.
    for (const e of extents) {
      if (at >= offset + asked) break
      const n = Math.min(e.length, offset + asked - at)
      out.push({ offset: at, length: n, hole: (e.flags & NBD_STATE_HOLE) !== 0, zero: (e.flags & NBD_STATE_ZERO) !== 0 })
      at += n
    }
    return out
  }

  /** Reads `buf.length` bytes at `offset` into `buf`. */
  async read (offset: number, buf: Buffer): Promise<void> {
    this.check(NBD_CMD_READ, offset, buf.length)
    // "the client MUST NOT request a length larger than the maximum payload size".
    await this.split(offset, buf.length, this.maxPayload, async (at, len) => {
      await this.send(NBD_CMD_READ, 0, at, len, null, buf.subarray(at - offset, at - offset + len))
    })
  }

  /**
   * Writes `data` at `offset`. `data` must not change until the promise
   * settles: it is handed to the socket as it is, never copied. With `fua`
   * the write is durable when the promise resolves.
   */
  async write (offset: number, data: Buffer, fua = false): Promise<void> {
    this.check(NBD_CMD_WRITE, offset, data.length, true)
    // "NBD_FLAG_SEND_FUA: exposes support for NBD_CMD_FLAG_FUA"; without it, write then flush.
    const nativeFua = fua && (this.transmissionFlags & NBD_FLAG_SEND_FUA) !== 0
    await this.split(offset, data.length, this.maxPayload, async (at, len) => {
      await this.send(NBD_CMD_WRITE, nativeFua ? NBD_CMD_FLAG_FUA : 0, at, len, data.subarray(at - offset, at - offset + len), null)
    })
    if (fua && !nativeFua) await this.flush()
  }

  /**
   * Makes every write answered so far durable. "A client MUST NOT send a
   * flush request unless NBD_FLAG_SEND_FLUSH was set"; a server without it
   * has no volatile cache to flush, so this resolves at once.
   */
  async flush (): Promise<void> {
    this.check(NBD_CMD_FLUSH, 0, 0)
    if ((this.transmissionFlags & NBD_FLAG_SEND_FLUSH) === 0) return
    // "For a flush request, length and offset are reserved, and MUST be set to all-zero."
    await this.send(NBD_CMD_FLUSH, 0, 0, 0, null, null)
  }

  /**
   * A hint that a range is no longer needed; its contents are undefined
   * afterwards. "A client MUST NOT send a trim request unless
   * NBD_FLAG_SEND_TRIM was set": without it this does nothing.
   */
  async trim (offset: number, length: number): Promise<void> {
    this.check(NBD_CMD_TRIM, offset, length, true)
    if ((this.transmissionFlags & NBD_FLAG_SEND_TRIM) === 0) return
    await this.split(offset, length, this.effectLimit(), async (at, len) => {
      await this.send(NBD_CMD_TRIM, 0, at, len, null, null)
    })
  }

  /**
   * Makes a range read as zeroes; with `noHole` it stays allocated. Without
   * NBD_FLAG_SEND_WRITE_ZEROES ("A client MUST NOT send a write zeroes
   * request unless ...") zero buffers are written instead.
   */
  async writeZeroes (offset: number, length: number, noHole = false): Promise<void> {
    this.check(NBD_CMD_WRITE_ZEROES, offset, length, true)
    if ((this.transmissionFlags & NBD_FLAG_SEND_WRITE_ZEROES) === 0) {
      // Both are multiples of the minimum block size (a power of 2 up to 2^16).
      const chunk = Math.min(this.maxPayload, MAX_ZERO_CHUNK)
      await this.split(offset, length, chunk, async (at, len) => {
        await this.send(NBD_CMD_WRITE, 0, at, len, zeroes(len), null)
      })
      return
    }
    // "NBD_FLAG_SEND_WRITE_ZEROES: exposes support for NBD_CMD_WRITE_ZEROES and NBD_CMD_FLAG_NO_HOLE".
    await this.split(offset, length, this.effectLimit(), async (at, len) => {
      await this.send(NBD_CMD_WRITE_ZEROES, noHole ? NBD_CMD_FLAG_NO_HOLE : 0, at, len, null, null)
    })
  }

  /**
   * A soft disconnect: NBD_CMD_DISC, then the end of the connection.
   * Requests still pending fail with UKAI_ERR_SHUTDOWN, and then the
   * connection is cut instead: what the socket still holds of them must
   * not be sent after their callers were told they failed (they may
   * reuse the payload's buffer, and the write would land late).
   * Resolves once the socket is closed.
   */
  async close (): Promise<void> {
    if (this.failure === undefined) {
      const alive = !this.socket.destroyed && this.socket.writable && this.pending.size === 0
      this.fail(new UkaiError('UKAI_ERR_SHUTDOWN', 'the NBD connection was closed by this node'), false)
      if (alive) {
        // "The values of the length and offset fields in a disconnect request MUST be zero."
        // "A client MUST NOT send anything to the server after sending an NBD_CMD_DISC command."
        this.socket.end(this.header(NBD_CMD_DISC, 0, 0, 0, 0))
        // The server closes its side on NBD_CMD_DISC; one that does not is not waited for long.
        setTimeout(() => this.socket.destroy(), Math.min(MAX_TIMER, this.timeoutMs)).unref()
      } else {
        this.socket.destroy()
      }
    }
    await this.ended
  }

  // -------------------------------------------------------------------------

  /** Validation in one place, before anything is sent. */
  private check (type: number, offset: number, length: number, writes = false): void {
    const name = commandName(type)
    if (this.failure !== undefined || this.draining) {
      const reason = this.failure ?? new UkaiError('UKAI_ERR_SHUTDOWN', 'the NBD server is shutting down')
      throw new UkaiError(reason.code, `${name} at offset ${offset}: ${reason.message}`, { command: name, offset }, { cause: reason })
    }
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', `${name}: bad offset ${offset} or length ${length}`)
    }
    // "the client MUST NOT use a length which, when added to offset, would exceed the export size".
    if (offset + length > this.size) {
      throw new UkaiError('UKAI_ERR_OUT_OF_RANGE', `${name} of ${length} bytes at offset ${offset} is beyond the export size ${this.size}`, { command: name, offset, length, size: this.size })
    }
    // "the client MUST ensure that offset and length are integer multiples of any advertised minimum block size".
    if (offset % this.minBlockSize !== 0 || length % this.minBlockSize !== 0) {
      throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', `${name} of ${length} bytes at offset ${offset} is not aligned to the minimum block size ${this.minBlockSize}`, { command: name, offset, length })
    }
    // "If this flag is set, the server MUST error subsequent write operations to the export."
    if (writes && this.readOnly) throw new UkaiError('UKAI_ERR_READ_ONLY', `${name} at offset ${offset}: export '${this.exportName}' is read-only`)
  }

  private effectLimit (): number {
    return Math.max(this.maxPayload, MAX_EFFECT_LENGTH - (MAX_EFFECT_LENGTH % this.minBlockSize))
  }

  /**
   * Runs `part` over [offset, offset + length) in pieces of at most `max`
   * bytes, SPLIT_WINDOW pieces in flight at a time. A failure stops further
   * pieces and fails the whole, but only once the pieces in flight have
   * settled: until then they still read into or write from the caller's
   * buffer, which the caller may reuse as soon as the promise settles.
   * Zero-length requests send nothing ("The client SHOULD NOT request a
   * read length of 0").
   */
  private async split (offset: number, length: number, max: number, part: (at: number, len: number) => Promise<void>): Promise<void> {
    if (length === 0) return
    if (length <= max) return await part(offset, length)
    const end = offset + length
    let next = offset
    let failure: { err: unknown } | undefined
    const worker = async (): Promise<void> => {
      while (failure === undefined && next < end) {
        const at = next
        const len = Math.min(max, end - at)
        next += len
        try {
          await part(at, len)
        } catch (err) {
          failure ??= { err }
        }
      }
    }
    const workers: Array<Promise<void>> = []
    for (let i = 0; i < SPLIT_WINDOW && i * max < length; i++) workers.push(worker())
    await Promise.all(workers)
    if (failure !== undefined) throw failure.err
  }

  /** "C: 32 bits, 0x25609513; 16 bits, command flags; 16 bits, type; 64 bits, cookie; 64 bits, offset; 32 bits, length". */
  private header (type: number, flags: number, cookie: number, offset: number, length: number): Buffer {
    const h = Buffer.allocUnsafe(NBD_REQUEST_SIZE)
    h.writeUInt32BE(NBD_REQUEST_MAGIC, 0)
    h.writeUInt16BE(flags, 4)
    h.writeUInt16BE(type, 6)
    h.writeUInt32BE(Math.floor(cookie / 0x100000000), 8)
    h.writeUInt32BE(cookie >>> 0, 12)
    h.writeUInt32BE(Math.floor(offset / 0x100000000), 16)
    h.writeUInt32BE(offset >>> 0, 20)
    h.writeUInt32BE(length, 24)
    return h
  }

  /** Sends one request (header, then the WRITE payload as it is) and waits for its reply. */
  private send (type: number, flags: number, offset: number, length: number, payload: Buffer | null, dest: Buffer | null, extents?: StatusExtent[]): Promise<void> {
    if (this.failure !== undefined || this.draining) {
      const reason = this.failure ?? new UkaiError('UKAI_ERR_SHUTDOWN', 'the NBD server is shutting down')
      return Promise.reject(this.requestError(reason, type, offset, length))
    }
    // "Clients SHOULD use a cookie that is distinct from all other currently pending transactions".
    const cookie = this.nextCookie++
    return new Promise<void>((resolve, reject) => {
      const req: InFlight = { type, offset, length, dest, deadline: performance.now() + this.timeoutMs, resolve, reject }
      // The parser fills them in (see `status` in the constructor); the caller holds the same array.
      if (extents !== undefined) req.extents = extents
      this.pending.set(cookie, req)
      // Requests made in one tick leave in one writev: cork now, uncork
      // after the tick. The payload is never concatenated with the header.
      if (!this.corked) {
        this.corked = true
        this.socket.cork()
        process.nextTick(this.uncork)
      }
      this.socket.write(this.header(type, flags, cookie, offset, length))
      if (payload !== null) this.socket.write(payload)
      if (this.timer === undefined) this.armTimer()
    })
  }

  private readonly uncork = (): void => {
    this.corked = false
    this.socket.uncork()
  }

  /**
   * One timer for all requests: the map keeps send order, so the first
   * entry is the oldest request, the one whose deadline comes first.
   */
  private armTimer (): void {
    const oldest = this.pending.values().next().value as InFlight | undefined
    if (oldest === undefined || this.failure !== undefined) return
    this.timer = setTimeout(this.onTimer, Math.min(MAX_TIMER, Math.max(0, oldest.deadline - performance.now()) + 1))
    this.timer.unref()
  }

  private readonly onTimer = (): void => {
    this.timer = undefined
    const oldest = this.pending.values().next().value as InFlight | undefined
    if (oldest === undefined) return
    if (oldest.deadline <= performance.now()) {
      this.fail(new UkaiError('UKAI_ERR_TIMEOUT', `no reply from the NBD server within ${this.timeoutMs} ms (export '${this.exportName}')`))
      return
    }
    this.armTimer()
  }

  /** Data from the socket (a view of its read buffer, valid only during this call). */
  private onData (chunk: Buffer): void {
    if (this.failure !== undefined) return
    const err = this.parser.push(chunk)
    if (err !== undefined) this.fail(err)
  }

  private complete (cookie: number, error: number, message?: string): void {
    const req = this.pending.get(cookie)
    if (req === undefined) return
    this.pending.delete(cookie)
    if (error === 0) {
      req.resolve()
    } else {
      const name = commandName(req.type)
      const code = errorCodeForNbd(error)
      req.reject(new UkaiError(code, `${name} of ${req.length} bytes at offset ${req.offset} failed on the NBD server: ${nbdErrorName(error)}${message === undefined ? '' : ` (${show(message)})`}`,
        { command: name, offset: req.offset, length: req.length, nbdError: error }))
      // "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect."
      if (error === NBD_ESHUTDOWN) this.draining = true
    }
    // "The client MAY issue a soft disconnect at any time, but SHOULD wait until there are no inflight requests first."
    if (this.draining && this.pending.size === 0) void this.close()
  }

  private requestError (reason: UkaiError, type: number, offset: number, length: number): UkaiError {
    const name = commandName(type)
    return new UkaiError(reason.code, `${name} of ${length} bytes at offset ${offset}: ${reason.message}`, { command: name, offset, length }, { cause: reason })
  }

  /** The connection is unusable: every pending request fails with `reason`, later ones too. */
  private fail (reason: UkaiError, destroy = true): void {
    if (this.failure !== undefined) return
    this.failure = reason
    if (this.timer !== undefined) clearTimeout(this.timer)
    this.timer = undefined
    const pending = [...this.pending.values()]
    this.pending.clear()
    for (const req of pending) req.reject(this.requestError(reason, req.type, req.offset, req.length))
    if (destroy) this.socket.destroy()
  }
}
