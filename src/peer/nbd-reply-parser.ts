/**
 * Transmission replies as this client reads them: the simple-reply parser
 * (structured replies are never negotiated on the peer path) and the
 * mapping of NBD error values to UkaiError codes.
 */
import { UkaiError, type ErrorCode } from '../errors.js'
import {
  NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN,
  NBD_SIMPLE_REPLY_MAGIC, NBD_SIMPLE_REPLY_SIZE, NBD_STRUCTURED_REPLY_MAGIC
} from '../frontends/nbd/protocol.js'

// ---------------------------------------------------------------------------
// Error values

/**
 * The UkaiError code for an NBD error value ("Error values"). The spec
 * asks a client to treat an unknown value "as if it had been NBD_EINVAL,
 * rather than disconnecting"; we do not disconnect, but report it as an
 * I/O error, since the volume treats a replica's I/O error as the replica
 * failing and an invalid argument as its own bug.
 */
export function errorCodeForNbd (value: number): ErrorCode {
  switch (value) {
    case NBD_EIO: return 'UKAI_ERR_IO'
    case NBD_ENOSPC: return 'UKAI_ERR_NO_SPACE'
    case NBD_EPERM: return 'UKAI_ERR_PERMISSION'
    case NBD_EINVAL: return 'UKAI_ERR_INVALID_ARGUMENT'
    case NBD_ENOTSUP: return 'UKAI_ERR_NOT_SUPPORTED'
    case NBD_EOVERFLOW: return 'UKAI_ERR_TOO_BIG'
    case NBD_ESHUTDOWN: return 'UKAI_ERR_SHUTDOWN'
    default: return 'UKAI_ERR_IO'
  }
}

const NBD_ERROR_NAMES: Record<number, string> = {
  [NBD_EPERM]: 'NBD_EPERM',
  [NBD_EIO]: 'NBD_EIO',
  [NBD_ENOMEM]: 'NBD_ENOMEM',
  [NBD_EINVAL]: 'NBD_EINVAL',
  [NBD_ENOSPC]: 'NBD_ENOSPC',
  [NBD_EOVERFLOW]: 'NBD_EOVERFLOW',
  [NBD_ENOTSUP]: 'NBD_ENOTSUP',
  [NBD_ESHUTDOWN]: 'NBD_ESHUTDOWN'
}

/** A frame the peer sent breaks the protocol: the connection cannot go on. */
export const protocolError = (message: string): UkaiError => new UkaiError('UKAI_ERR_IO', `NBD protocol error: ${message}`)

// ---------------------------------------------------------------------------
// Reply parser

/** What the parser asks of the requests in flight. */
export interface ReplyTarget {
  /**
   * Where the payload of a successful reply to `cookie` goes: the READ's
   * buffer, null when the request carries no reply payload, undefined when
   * no request with that cookie is in flight.
   */
  payloadOf: (cookie: number) => Buffer | null | undefined
  /** The reply to `cookie` is complete (its payload, if any, is in place). */
  complete: (cookie: number, error: number) => void
}

/**
 * Simple replies ("Simple reply message"), parsed from chunks as the
 * socket delivers them:
 *
 *   S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC)
 *   S: 32 bits, error (MAY be zero)
 *   S: 64 bits, cookie
 *   S: (length bytes of data if the request is of type NBD_CMD_READ and
 *       error is zero)
 *
 * A header inside one chunk is read in place. Only a header that spans
 * chunks is copied (16 bytes, into a scratch buffer) because its fields
 * must be read from one contiguous buffer. A READ payload is copied once,
 * from the chunk straight into the caller's buffer, however it is split;
 * no chunk is retained after `push` returns, so the socket may reuse its
 * read buffer.
 *
 * Without structured replies the stream is not self-describing (whether
 * data follows a header depends on the request), so the parser asks the
 * in-flight table. A reply it cannot place (bad magic, unknown cookie) is
 * reported and the parser stops: nothing after it can be framed.
 */
export class ReplyParser {
  private readonly target: ReplyTarget
  /** A header that spans chunks, gathered here. */
  private readonly partial = Buffer.allocUnsafe(NBD_SIMPLE_REPLY_SIZE)
  private partialLength = 0
  /** The READ whose payload is arriving, and how much of it has. */
  private cookie = 0
  private dest: Buffer | null = null
  private received = 0
  private failed: UkaiError | undefined

  constructor (target: ReplyTarget) {
    this.target = target
  }

  /** Consumes a chunk. Returns an error when the stream breaks the protocol (then and ever after). */
  push (chunk: Buffer): UkaiError | undefined {
    if (this.failed !== undefined) return this.failed
    const end = chunk.length
    let pos = 0
    while (pos < end) {
      const dest = this.dest
      if (dest !== null) {
        const n = Math.min(dest.length - this.received, end - pos)
        chunk.copy(dest, this.received, pos, pos + n)
        pos += n
        this.received += n
        if (this.received === dest.length) {
          this.dest = null
          this.target.complete(this.cookie, 0)
        }
        continue
      }
      let header: Buffer
      let at: number
      if (this.partialLength === 0 && end - pos >= NBD_SIMPLE_REPLY_SIZE) {
        header = chunk
        at = pos
        pos += NBD_SIMPLE_REPLY_SIZE
      } else {
        // The header spans chunks: gather its 16 bytes.
        const n = Math.min(NBD_SIMPLE_REPLY_SIZE - this.partialLength, end - pos)
        chunk.copy(this.partial, this.partialLength, pos, pos + n)
        this.partialLength += n
        pos += n
        if (this.partialLength < NBD_SIMPLE_REPLY_SIZE) break
        this.partialLength = 0
        header = this.partial
        at = 0
      }
      const err = this.header(header, at)
      if (err !== undefined) {
        this.failed = err
        return err
      }
    }
    return undefined
  }

  private header (b: Buffer, at: number): UkaiError | undefined {
    const magic = b.readUInt32BE(at)
    if (magic !== NBD_SIMPLE_REPLY_MAGIC) {
      // "the server MUST use only simple replies" without negotiation.
      if (magic === NBD_STRUCTURED_REPLY_MAGIC) return protocolError('structured reply chunk, but structured replies were not negotiated')
      return protocolError(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`)
    }
    const error = b.readUInt32BE(at + 4)
    const hi = b.readUInt32BE(at + 8)
    const lo = b.readUInt32BE(at + 12)
    // Cookies this client sends stay below 2^53; a larger one maps to no request.
    const cookie = hi * 0x100000000 + lo
    const dest = this.target.payloadOf(cookie)
    if (dest === undefined) {
      // "the server MUST use the same value for cookie as was sent by the client".
      return protocolError(`reply with unknown cookie 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')}`)
    }
    // "If it chooses not to [disconnect], it MUST NOT send any payload for
    // this request": data follows only a READ reply with error zero.
    if (error !== 0 || dest === null || dest.length === 0) {
      this.target.complete(cookie, error)
      return undefined
    }
    this.cookie = cookie
    this.dest = dest
    this.received = 0
    return undefined
  }
}

/** The spec's name of an error value, for messages. */
export function nbdErrorName (value: number): string {
  return NBD_ERROR_NAMES[value] ?? `error ${value}`
}
