/**
 * Transmission replies as this client reads them: the reply parser
 * (simple replies, and structured ones where they were negotiated) and
 * the mapping of NBD error values to UkaiError codes.
 */
import { UkaiError, type ErrorCode } from '../errors.js'
import { RangeSet } from '../metadata/range-set.js'
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_READ, NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM,
  NBD_ESHUTDOWN, NBD_MAX_STRING, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_SIMPLE_REPLY_MAGIC, NBD_SIMPLE_REPLY_SIZE, NBD_STRUCTURED_REPLY_HEADER_SIZE, NBD_STRUCTURED_REPLY_MAGIC, commandName
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

/** The request in flight with a cookie, as a structured reply's chunks are checked against it. */
export interface InFlightRequest { type: number, offset: number, length: number }

/** One NBD_REPLY_TYPE_BLOCK_STATUS descriptor: "length of the extent", "status flags". */
export interface StatusExtent { length: number, flags: number }

/** What the parser asks of the requests in flight. */
export interface ReplyTarget {
  /**
   * Where the payload of a successful reply to `cookie` goes: the READ's
   * buffer, null when the request carries no reply payload, undefined when
   * no request with that cookie is in flight.
   */
  payloadOf: (cookie: number) => Buffer | null | undefined
  /** The reply to `cookie` is complete (its payload, if any, is in place); an error chunk's message comes along. */
  complete: (cookie: number, error: number, message?: string) => void
  /** Structured replies: the request in flight with `cookie`, undefined when there is none. */
  requestOf?: (cookie: number) => InFlightRequest | undefined
  /**
   * Structured replies: an NBD_REPLY_TYPE_BLOCK_STATUS chunk for `cookie`
   * (a BLOCK_STATUS request): its context and descriptors. Returns an
   * error when the chunk does not fit the request (an unknown context).
   */
  status?: (cookie: number, context: number, extents: StatusExtent[]) => UkaiError | undefined
}

/**
 * Largest payload of a structured chunk other than OFFSET_DATA: a
 * BLOCK_STATUS chunk of 2^20 descriptors ("Servers SHOULD NOT send more
 * than 2^20 extents in a single reply chunk") or an error chunk with a
 * message of NBD_MAX_STRING bytes.
 */
const MAX_CHUNK_PAYLOAD = 4 + 8 * 2 ** 20
const MAX_ERROR_PAYLOAD = 14 + NBD_MAX_STRING

/** A structured reply under way: its error so far, and what of a READ its content chunks covered. */
interface Structured { error: number, message?: string, covered: RangeSet | undefined, statuses: number }

/**
 * Transmission replies parsed from chunks as the socket delivers them.
 *
 * Simple replies ("Simple reply message"):
 *
 *   S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC)
 *   S: 32 bits, error (MAY be zero)
 *   S: 64 bits, cookie
 *   S: (length bytes of data if the request is of type NBD_CMD_READ and
 *       error is zero)
 *
 * and, where structured replies were negotiated ("Structured reply
 * chunk message"), chunks:
 *
 *   S: 32 bits, 0x668e33ef, magic (NBD_STRUCTURED_REPLY_MAGIC)
 *   S: 16 bits, flags; 16 bits, type; 64 bits, cookie; 32 bits, length
 *   S: length bytes of payload
 *
 * of which OFFSET_DATA and OFFSET_HOLE fill a READ's buffer at their
 * offsets, BLOCK_STATUS chunks go to the target, error chunks set the
 * reply's error, and the chunk flagged NBD_REPLY_FLAG_DONE completes it.
 *
 * A header inside one chunk is read in place. Only a header that spans
 * chunks is copied (into a scratch buffer) because its fields must be
 * read from one contiguous buffer. Read data is copied once, from the
 * chunk straight into the caller's buffer, however it is split; no chunk
 * is retained after `push` returns, so the socket may reuse its read
 * buffer.
 *
 * Without structured replies the stream is not self-describing (whether
 * data follows a header depends on the request), so the parser asks the
 * in-flight table. A reply it cannot place (bad magic, unknown cookie,
 * a chunk that does not fit its request) is reported and the parser
 * stops: nothing after it can be framed.
 */
export class ReplyParser {
  private readonly target: ReplyTarget
  private readonly structured: boolean
  /** A header that spans chunks, gathered here. */
  private readonly partial = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_SIZE)
  private partialLength = 0
  /** The READ whose payload is arriving, and how much of it has. */
  private cookie = 0
  private dest: Buffer | null = null
  private received = 0
  /** The structured chunk whose data (OFFSET_DATA) or payload is arriving. */
  private chunk: { cookie: number, flags: number, type: number, length: number } | undefined
  /** A structured chunk's fixed fields or whole payload, gathered (`gathered` bytes of it so far). */
  private gather: Buffer | null = null
  private gathered = 0
  private readonly replies = new Map<number, Structured>()
  private failed: UkaiError | undefined

  constructor (target: ReplyTarget, structured = false) {
    this.target = target
    this.structured = structured
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
          if (this.chunk === undefined) {
            this.target.complete(this.cookie, 0)
          } else {
            const err = this.chunkDone()
            if (err !== undefined) return this.fail(err)
          }
        }
        continue
      }
      const gather = this.gather
      if (gather !== null) {
        const n = Math.min(gather.length - this.gathered, end - pos)
        chunk.copy(gather, this.gathered, pos, pos + n)
        pos += n
        this.gathered += n
        if (this.gathered === gather.length) {
          this.gather = null
          const err = this.payload(gather)
          if (err !== undefined) return this.fail(err)
        }
        continue
      }
      let header: Buffer
      let at: number
      const size = this.partialLength >= 4 || (this.partialLength === 0 && end - pos >= 4)
        ? this.headerSize(this.partialLength >= 4 ? this.partial.readUInt32BE(0) : chunk.readUInt32BE(pos))
        : NBD_SIMPLE_REPLY_SIZE
      if (this.partialLength === 0 && end - pos >= size) {
        header = chunk
        at = pos
        pos += size
      } else {
        // The header spans chunks: gather its magic, then the rest of it.
        const want = this.partialLength < 4 ? 4 : size
        const n = Math.min(want - this.partialLength, end - pos)
        chunk.copy(this.partial, this.partialLength, pos, pos + n)
        this.partialLength += n
        pos += n
        if (this.partialLength < size) continue
        this.partialLength = 0
        header = this.partial
        at = 0
      }
      const err = this.header(header, at)
      if (err !== undefined) return this.fail(err)
    }
    return undefined
  }

  private fail (err: UkaiError): UkaiError {
    this.failed = err
    return err
  }

  /** The header length a magic starts (a bad magic is reported once the shorter header is in). */
  private headerSize (magic: number): number {
    return magic === NBD_STRUCTURED_REPLY_MAGIC && this.structured ? NBD_STRUCTURED_REPLY_HEADER_SIZE : NBD_SIMPLE_REPLY_SIZE
  }

  private header (b: Buffer, at: number): UkaiError | undefined {
    const magic = b.readUInt32BE(at)
    if (magic === NBD_STRUCTURED_REPLY_MAGIC && this.structured) return this.structuredHeader(b, at)
    if (magic !== NBD_SIMPLE_REPLY_MAGIC) {
      // "the server MUST use only simple replies" without negotiation.
      if (magic === NBD_STRUCTURED_REPLY_MAGIC) return protocolError('structured reply chunk, but structured replies were not negotiated')
      return protocolError(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`)
    }
    const error = b.readUInt32BE(at + 4)
    const cookie = readCookie(b, at + 8)
    const dest = this.target.payloadOf(cookie)
    if (dest === undefined || this.replies.has(cookie)) {
      // "the server MUST use the same value for cookie as was sent by the client".
      return protocolError(`reply with unknown cookie ${cookieText(b, at + 8)}`)
    }
    if (this.structured && error === 0) {
      // Structured replies negotiated: "the server MUST use structured
      // replies to the NBD_CMD_READ transmission request", and a
      // successful BLOCK_STATUS "MUST use a structured reply".
      const type = this.target.requestOf?.(cookie)?.type
      if (type === NBD_CMD_READ || type === NBD_CMD_BLOCK_STATUS) return protocolError(`simple reply to ${commandName(type)} after structured replies were negotiated`)
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

  /** "32 bits, magic; 16 bits, flags; 16 bits, type; 64 bits, cookie; 32 bits, length of payload". */
  private structuredHeader (b: Buffer, at: number): UkaiError | undefined {
    const flags = b.readUInt16BE(at + 4)
    const type = b.readUInt16BE(at + 6)
    const cookie = readCookie(b, at + 8)
    const length = b.readUInt32BE(at + 16)
    const req = this.target.requestOf?.(cookie)
    if (req === undefined) return protocolError(`reply chunk with unknown cookie ${cookieText(b, at + 8)}`)
    const what = `${chunkName(type)} chunk for ${commandName(req.type)}`
    const isError = (type & NBD_REPLY_TYPE_ERROR_BIT) !== 0
    if (!isError && type !== NBD_REPLY_TYPE_NONE) {
      // "Valid as a reply to NBD_CMD_READ" (OFFSET_DATA, OFFSET_HOLE); BLOCK_STATUS to a block status query.
      const fits = type === NBD_REPLY_TYPE_BLOCK_STATUS ? req.type === NBD_CMD_BLOCK_STATUS : req.type === NBD_CMD_READ
      // "If the client receives an unknown or unexpected type, other than an error chunk, it MUST initiate a hard disconnect."
      if (!fits || (type !== NBD_REPLY_TYPE_OFFSET_DATA && type !== NBD_REPLY_TYPE_OFFSET_HOLE && type !== NBD_REPLY_TYPE_BLOCK_STATUS)) {
        return protocolError(`unexpected ${what}`)
      }
    }
    const checkLength = (): string | undefined => {
      if (isError) return length < 6 ? 'shorter than 6 bytes' : length > MAX_ERROR_PAYLOAD ? `of ${length} bytes` : undefined
      switch (type) {
        // "length MUST be 0"; "MUST always be used with the NBD_REPLY_FLAG_DONE bit set".
        case NBD_REPLY_TYPE_NONE: return length !== 0 ? `of length ${length}` : (flags & NBD_REPLY_FLAG_DONE) === 0 ? 'without NBD_REPLY_FLAG_DONE' : undefined
        // "length MUST be at least 9"; no more than the request's data follows.
        case NBD_REPLY_TYPE_OFFSET_DATA: return length < 9 || length - 8 > req.length ? `of length ${length}` : undefined
        // "length MUST be exactly 12".
        case NBD_REPLY_TYPE_OFFSET_HOLE: return length !== 12 ? `of length ${length}` : undefined
        // "length MUST be 4 + (a positive integer multiple of 8)".
        default: return length < 12 || (length - 4) % 8 !== 0 || length > MAX_CHUNK_PAYLOAD ? `of length ${length}` : undefined
      }
    }
    const bad = checkLength()
    if (bad !== undefined) return protocolError(`${what} ${bad}`)
    if (!this.replies.has(cookie)) this.replies.set(cookie, { error: 0, covered: req.type === NBD_CMD_READ ? new RangeSet() : undefined, statuses: 0 })
    this.chunk = { cookie, flags, type, length }
    if (type === NBD_REPLY_TYPE_NONE) return this.chunkDone()
    // OFFSET_DATA: its offset first, then the data straight into the READ's buffer.
    this.gather = Buffer.allocUnsafe(type === NBD_REPLY_TYPE_OFFSET_DATA ? 8 : length)
    this.gathered = 0
    return undefined
  }

  /** A structured chunk's payload (OFFSET_DATA: its offset) is in. */
  private payload (p: Buffer): UkaiError | undefined {
    const c = this.chunk!
    const req = this.target.requestOf?.(c.cookie)
    const reply = this.replies.get(c.cookie)
    if (req === undefined || reply === undefined) return protocolError(`reply chunk for a request no longer in flight (cookie ${c.cookie})`)
    const what = `${chunkName(c.type)} chunk for ${commandName(req.type)}`
    if ((c.type & NBD_REPLY_TYPE_ERROR_BIT) !== 0) {
      // "32 bits: error (MUST be nonzero); 16 bits: message length (no more than header length - 6)".
      const error = p.readUInt32BE(0)
      const messageLength = p.readUInt16BE(4)
      const fixed = c.type === NBD_REPLY_TYPE_ERROR_OFFSET ? 14 : 6
      if (error === 0) return protocolError(`${what} with error 0`)
      if (messageLength > c.length - fixed) return protocolError(`${what}: message of ${messageLength} bytes in a chunk of ${c.length}`)
      // An unknown error type: "it MUST consider the current reply as errored, but MAY continue".
      if (reply.error === 0) {
        reply.error = error
        if (messageLength > 0) reply.message = p.toString('utf8', 6, 6 + messageLength)
      }
      return this.chunkDone()
    }
    switch (c.type) {
      case NBD_REPLY_TYPE_OFFSET_DATA: {
        const offset = readU64(p, 0)
        const n = c.length - 8
        const err = this.content(reply, req, offset, n, what)
        if (err !== undefined) return err
        this.cookie = c.cookie
        this.dest = this.target.payloadOf(c.cookie)!.subarray(offset - req.offset, offset - req.offset + n)
        this.received = 0
        return undefined
      }
      case NBD_REPLY_TYPE_OFFSET_HOLE: {
        // "64 bits: offset; 32 bits: hole size (MUST be nonzero)": those bytes read as zeros.
        const offset = readU64(p, 0)
        const n = p.readUInt32BE(8)
        if (n === 0) return protocolError(`${what} with a hole size of 0`)
        const err = this.content(reply, req, offset, n, what)
        if (err !== undefined) return err
        this.target.payloadOf(c.cookie)!.fill(0, offset - req.offset, offset - req.offset + n)
        return this.chunkDone()
      }
      default: {
        // "32 bits, metadata context ID", then descriptors of "32 bits, length (MUST be nonzero); 32 bits, status flags".
        const extents: StatusExtent[] = []
        for (let at = 4; at < p.length; at += 8) {
          const length = p.readUInt32BE(at)
          if (length === 0) return protocolError(`${what} with an extent of length 0`)
          extents.push({ length, flags: p.readUInt32BE(at + 4) })
        }
        reply.statuses++
        const err = this.target.status?.(c.cookie, p.readUInt32BE(0), extents)
        return err ?? this.chunkDone()
      }
    }
  }

  /**
   * A content chunk of a READ: "MUST lie within the bounds of the original
   * offset and length of the client's request, and MUST NOT overlap with
   * the bounds of any earlier content chunk".
   */
  private content (reply: Structured, req: InFlightRequest, offset: number, n: number, what: string): UkaiError | undefined {
    if (offset < req.offset || offset + n > req.offset + req.length) {
      return protocolError(`${what} at offset ${offset} (${n} bytes) is outside the request (${req.length} bytes at ${req.offset})`)
    }
    if (reply.covered!.overlaps(offset, offset + n)) return protocolError(`${what} at offset ${offset} (${n} bytes) overlaps an earlier chunk`)
    reply.covered!.add(offset, offset + n)
    return undefined
  }

  /** A structured chunk is in; the one flagged DONE completes its reply. */
  private chunkDone (): UkaiError | undefined {
    const c = this.chunk!
    this.chunk = undefined
    if ((c.flags & NBD_REPLY_FLAG_DONE) === 0) return undefined
    const reply = this.replies.get(c.cookie)!
    this.replies.delete(c.cookie)
    const req = this.target.requestOf?.(c.cookie)
    if (reply.error === 0 && req !== undefined) {
      // "When no error is detected, the server MUST send enough data chunks to cover the entire region".
      if (req.type === NBD_CMD_READ && !(reply.covered!.covers(req.offset, req.offset + req.length) || req.length === 0)) {
        return protocolError(`the reply to ${commandName(req.type)} of ${req.length} bytes at offset ${req.offset} ended with ${reply.covered!.size} bytes of it`)
      }
      // "A successful block status request MUST have exactly one status chunk per negotiated metadata context ID."
      if (req.type === NBD_CMD_BLOCK_STATUS && reply.statuses === 0) return protocolError(`the reply to ${commandName(req.type)} ended without a status chunk`)
    }
    this.target.complete(c.cookie, reply.error, reply.message)
    return undefined
  }
}

/** Cookies this client sends stay below 2^53; a larger one maps to no request. */
function readCookie (b: Buffer, at: number): number {
  return b.readUInt32BE(at) * 0x100000000 + b.readUInt32BE(at + 4)
}

function cookieText (b: Buffer, at: number): string {
  return `0x${b.readUInt32BE(at).toString(16)}${b.readUInt32BE(at + 4).toString(16).padStart(8, '0')}`
}

/** A 64-bit offset; one past 2^53 cannot lie inside any request. */
function readU64 (b: Buffer, at: number): number {
  const hi = b.readUInt32BE(at)
  return hi >= 2 ** 21 ? Number.MAX_SAFE_INTEGER : hi * 0x100000000 + b.readUInt32BE(at + 4)
}

const NBD_REPLY_TYPE_ERROR_BIT = 1 << 15

function chunkName (type: number): string {
  switch (type) {
    case NBD_REPLY_TYPE_NONE: return 'NBD_REPLY_TYPE_NONE'
    case NBD_REPLY_TYPE_OFFSET_DATA: return 'NBD_REPLY_TYPE_OFFSET_DATA'
    case NBD_REPLY_TYPE_OFFSET_HOLE: return 'NBD_REPLY_TYPE_OFFSET_HOLE'
    case NBD_REPLY_TYPE_BLOCK_STATUS: return 'NBD_REPLY_TYPE_BLOCK_STATUS'
    case NBD_REPLY_TYPE_ERROR: return 'NBD_REPLY_TYPE_ERROR'
    case NBD_REPLY_TYPE_ERROR_OFFSET: return 'NBD_REPLY_TYPE_ERROR_OFFSET'
    default: return `reply type ${type}`
  }
}

/** The spec's name of an error value, for messages. */
export function nbdErrorName (value: number): string {
  return NBD_ERROR_NAMES[value] ?? `error ${value}`
}
