/**
 * Transmission requests (proto.md, "Request message"): parsing, encoding
 * (for a client), and the one validator every request passes before it is
 * dispatched. The validator is the only place that decides whether a
 * request may run; the dispatcher assumes a valid request.
 */
import {
  MAX_PAYLOAD, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_EPERM, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_REQUEST_MAGIC, NBD_REQUEST_SIZE, commandName
} from './protocol.js'

/** A cookie is opaque: kept as its two 32-bit halves and echoed as sent. */
export interface Cookie {
  cookieHi: number
  cookieLo: number
}

export interface NbdRequest extends Cookie {
  flags: number
  type: number
  /**
   * Offset as a number. Above 2^53 it is not exact, but it is then beyond
   * any export, and the range check refuses it all the same.
   */
  offset: number
  length: number
}

/** What the validator needs to know about the negotiated session. */
export interface SessionState {
  /** Export size sent in NBD_INFO_EXPORT / the NBD_OPT_EXPORT_NAME reply. */
  size: number
  /** Transmission flags sent to the client. */
  flags: number
  structured: boolean
  /** Context ID of base:allocation when selected for this export. */
  allocationContext: number | undefined
}

export interface RequestError {
  /** An NBD error value. */
  error: number
  message: string
}

/**
 * "C: 32 bits, 0x25609513, magic; C: 16 bits, command flags; C: 16 bits,
 * type; C: 64 bits, cookie; C: 64 bits, offset (unsigned); C: 32 bits,
 * length (unsigned)". Undefined when the magic is wrong: the stream can no
 * longer be split into frames.
 */
export function parseRequest (buf: Buffer): NbdRequest | undefined {
  if (buf.length < NBD_REQUEST_SIZE || buf.readUInt32BE(0) !== NBD_REQUEST_MAGIC) return undefined
  return {
    flags: buf.readUInt16BE(4),
    type: buf.readUInt16BE(6),
    cookieHi: buf.readUInt32BE(8),
    cookieLo: buf.readUInt32BE(12),
    offset: buf.readUInt32BE(16) * 2 ** 32 + buf.readUInt32BE(20),
    length: buf.readUInt32BE(24)
  }
}

/** A request header (the client's side); a WRITE's payload follows it. */
export function encodeRequest (req: NbdRequest): Buffer {
  const b = Buffer.allocUnsafe(NBD_REQUEST_SIZE)
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0)
  b.writeUInt16BE(req.flags, 4)
  b.writeUInt16BE(req.type, 6)
  b.writeUInt32BE(req.cookieHi >>> 0, 8)
  b.writeUInt32BE(req.cookieLo >>> 0, 12)
  b.writeUInt32BE(Math.floor(req.offset / 2 ** 32), 16)
  b.writeUInt32BE(req.offset % 2 ** 32, 20)
  b.writeUInt32BE(req.length, 24)
  return b
}

/** Bytes of payload that follow a request header on the wire. */
export function payloadLength (req: NbdRequest): number {
  return req.type === NBD_CMD_WRITE ? req.length : 0
}

const fail = (error: number, message: string): RequestError => ({ error, message })

/**
 * The command flags a command may carry in this session. "Clients MUST NOT
 * set a command flag bit that is not documented for the particular
 * command; and whether a flag is valid may depend on negotiation".
 */
function allowedFlags (type: number, s: SessionState): number {
  // NBD_CMD_FLAG_FUA: "valid for all commands, provided NBD_FLAG_SEND_FUA
  // has been negotiated, in which case the server MUST accept all commands
  // with this bit set (even by ignoring the bit)".
  let allowed = (s.flags & NBD_FLAG_SEND_FUA) !== 0 ? NBD_CMD_FLAG_FUA : 0
  switch (type) {
    case NBD_CMD_READ:
      // NBD_CMD_FLAG_DF: "MUST NOT be set unless the transmission flags include NBD_FLAG_SEND_DF".
      if ((s.flags & NBD_FLAG_SEND_DF) !== 0) allowed |= NBD_CMD_FLAG_DF
      break
    case NBD_CMD_WRITE_ZEROES:
      allowed |= NBD_CMD_FLAG_NO_HOLE
      // "The client MUST NOT set this unless the server advertised NBD_FLAG_SEND_FAST_ZERO."
      if ((s.flags & NBD_FLAG_SEND_FAST_ZERO) !== 0) allowed |= NBD_CMD_FLAG_FAST_ZERO
      break
    case NBD_CMD_BLOCK_STATUS:
      allowed |= NBD_CMD_FLAG_REQ_ONE
      break
  }
  return allowed
}

/**
 * Checks a request against the session before dispatch. Returns undefined
 * when it may run, else the error to answer with (proto.md, "Error
 * values"). NBD_CMD_DISC is not validated: it is never answered.
 */
export function validateRequest (req: NbdRequest, s: SessionState): RequestError | undefined {
  const name = commandName(req.type)
  const readOnly = (s.flags & NBD_FLAG_READ_ONLY) !== 0
  const end = req.offset + req.length
  // "The server SHOULD return NBD_EINVAL if it receives an unknown command."
  // Commands whose transmission flag was not sent count as unknown.
  switch (req.type) {
    case NBD_CMD_READ: case NBD_CMD_WRITE: case NBD_CMD_BLOCK_STATUS: break
    case NBD_CMD_FLUSH: if ((s.flags & NBD_FLAG_SEND_FLUSH) === 0) return fail(NBD_EINVAL, `${name} was not negotiated`); break
    // "SHOULD return NBD_EPERM if it receives a write or trim request on a read-only export."
    case NBD_CMD_TRIM: case NBD_CMD_WRITE_ZEROES: {
      const flag = req.type === NBD_CMD_TRIM ? NBD_FLAG_SEND_TRIM : NBD_FLAG_SEND_WRITE_ZEROES
      if ((s.flags & flag) === 0) return readOnly ? fail(NBD_EPERM, `${name} on a read-only export`) : fail(NBD_EINVAL, `${name} was not negotiated`)
      break
    }
    default: return fail(NBD_EINVAL, `unknown or unsupported command ${name}`)
  }
  // "The server SHOULD return NBD_EINVAL if it receives an unknown command
  // flag. It also SHOULD return NBD_EINVAL if it receives a request with a
  // flag not explicitly documented as applicable to the given request."
  const bad = req.flags & ~allowedFlags(req.type, s)
  if (bad !== 0) return fail(NBD_EINVAL, `${name}: command flags 0x${bad.toString(16)} are not valid here`)

  switch (req.type) {
    case NBD_CMD_READ:
      // "any client request with a length larger than the maximum payload
      // size will fail"; with structured replies "the server is also
      // permitted to reject large read requests up front with NBD_EOVERFLOW".
      if (req.length > MAX_PAYLOAD) return fail(s.structured ? NBD_EOVERFLOW : NBD_EINVAL, `${name} of ${req.length} bytes exceeds the maximum payload of ${MAX_PAYLOAD}`)
      // "SHOULD return NBD_EINVAL if it receives a read or trim request including one or more sectors beyond the size of the device".
      if (end > s.size) return fail(NBD_EINVAL, `${name} of ${req.length} bytes at ${req.offset} passes the end of the export (${s.size} bytes)`)
      return undefined
    case NBD_CMD_WRITE:
      if (readOnly) return fail(NBD_EPERM, `${name} on a read-only export`)
      // "the client MUST NOT request a length larger than the maximum payload size".
      if (req.length > MAX_PAYLOAD) return fail(NBD_EINVAL, `${name} of ${req.length} bytes exceeds the maximum payload of ${MAX_PAYLOAD}`)
      // "SHOULD return NBD_ENOSPC if it receives a write request including one or more sectors beyond the size of the device".
      if (end > s.size) return fail(NBD_ENOSPC, `${name} of ${req.length} bytes at ${req.offset} passes the end of the export (${s.size} bytes)`)
      return undefined
    case NBD_CMD_FLUSH:
      // "For a flush request, length and offset are reserved, and MUST be set to all-zero."
      if (req.offset !== 0 || req.length !== 0) return fail(NBD_EINVAL, `${name} with a nonzero offset or length`)
      return undefined
    case NBD_CMD_TRIM:
      if (end > s.size) return fail(NBD_EINVAL, `${name} of ${req.length} bytes at ${req.offset} passes the end of the export (${s.size} bytes)`)
      return undefined
    case NBD_CMD_WRITE_ZEROES:
      // "The server SHOULD return NBD_ENOSPC if it receives a write zeroes
      // request including one or more sectors beyond the size of the device."
      if (end > s.size) return fail(NBD_ENOSPC, `${name} of ${req.length} bytes at ${req.offset} passes the end of the export (${s.size} bytes)`)
      return undefined
    case NBD_CMD_BLOCK_STATUS:
      // "Servers SHOULD reply with NBD_EINVAL to clients sending
      // NBD_CMD_BLOCK_STATUS without selecting at least one metadata context."
      if (s.allocationContext === undefined) return fail(NBD_EINVAL, `${name} without a selected metadata context`)
      // "The client SHOULD NOT request a status length of 0".
      if (req.length === 0) return fail(NBD_EINVAL, `${name} of length 0`)
      // "SHOULD return NBD_EINVAL if it receives a NBD_CMD_BLOCK_STATUS request including one or more sectors beyond the size of the device."
      if (end > s.size) return fail(NBD_EINVAL, `${name} of ${req.length} bytes at ${req.offset} passes the end of the export (${s.size} bytes)`)
      return undefined
  }
  return undefined
}

