/**
 * Transmission replies (proto.md, "Simple reply message" and "Structured
 * reply chunk message"): encoders for a server and a header parser for a
 * client. A reply that carries data is allocated once with room for its
 * header, so the data can be read straight into it and the whole reply
 * written with one call.
 */
import { encodeString } from './options.js'
import {
  NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_SIMPLE_REPLY_MAGIC, NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_HEADER_SIZE, NBD_STRUCTURED_REPLY_MAGIC
} from './protocol.js'
import type { Cookie } from './requests.js'
import type { BufferPool } from '../../util/buffer-pool.js'

/** Where a READ's data starts in a buffer from allocSimpleRead. */
export const SIMPLE_DATA_OFFSET = NBD_SIMPLE_REPLY_SIZE
/** Where a READ's data starts in a buffer from allocOffsetData (header, then 64-bit offset). */
export const OFFSET_DATA_OFFSET = NBD_STRUCTURED_REPLY_HEADER_SIZE + 8

/** One descriptor of an NBD_REPLY_TYPE_BLOCK_STATUS chunk. */
export interface BlockDescriptor {
  length: number
  /** NBD_STATE_* flags. */
  flags: number
}

/** "S: 32 bits, 0x67446698; S: 32 bits, error (MAY be zero); S: 64 bits, cookie". */
function putSimpleHeader (b: Buffer, c: Cookie, error: number): void {
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0)
  b.writeUInt32BE(error, 4)
  b.writeUInt32BE(c.cookieHi, 8)
  b.writeUInt32BE(c.cookieLo, 12)
}

/**
 * "S: 32 bits, 0x668e33ef; S: 16 bits, flags; S: 16 bits, type; S: 64
 * bits, cookie; S: 32 bits, length of payload (unsigned)".
 */
function putStructuredHeader (b: Buffer, c: Cookie, flags: number, type: number, length: number): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0)
  b.writeUInt16BE(flags, 4)
  b.writeUInt16BE(type, 6)
  b.writeUInt32BE(c.cookieHi, 8)
  b.writeUInt32BE(c.cookieLo, 12)
  b.writeUInt32BE(length, 16)
}

/** A simple reply without data (every command but a successful READ). */
export function encodeSimpleReply (c: Cookie, error: number): Buffer {
  const b = Buffer.allocUnsafe(NBD_SIMPLE_REPLY_SIZE)
  putSimpleHeader(b, c, error)
  return b
}

/**
 * A successful simple READ reply; the caller fills `length` bytes at
 * SIMPLE_DATA_OFFSET. With `pool`, the buffer is the pool's (the caller
 * gives it back).
 */
export function allocSimpleRead (c: Cookie, length: number, pool?: BufferPool): Buffer {
  const b = pool?.take(NBD_SIMPLE_REPLY_SIZE + length) ?? Buffer.allocUnsafe(NBD_SIMPLE_REPLY_SIZE + length)
  putSimpleHeader(b, c, 0)
  return b
}

/**
 * An NBD_REPLY_TYPE_OFFSET_DATA chunk ("64 bits: offset; length - 8
 * bytes: data"); the caller fills `length` bytes at OFFSET_DATA_OFFSET.
 * "length MUST be at least 9": `length` must be at least 1. With `pool`,
 * as allocSimpleRead.
 */
export function allocOffsetData (c: Cookie, flags: number, offset: number, length: number, pool?: BufferPool): Buffer {
  const b = pool?.take(OFFSET_DATA_OFFSET + length) ?? Buffer.allocUnsafe(OFFSET_DATA_OFFSET + length)
  putStructuredHeader(b, c, flags, NBD_REPLY_TYPE_OFFSET_DATA, 8 + length)
  putOffset(b, NBD_STRUCTURED_REPLY_HEADER_SIZE, offset)
  return b
}

/** NBD_REPLY_TYPE_OFFSET_HOLE: "64 bits: offset; 32 bits: hole size (MUST be nonzero)". */
export function encodeOffsetHole (c: Cookie, flags: number, offset: number, size: number): Buffer {
  const b = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_SIZE + 12)
  putStructuredHeader(b, c, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12)
  putOffset(b, NBD_STRUCTURED_REPLY_HEADER_SIZE, offset)
  b.writeUInt32BE(size, NBD_STRUCTURED_REPLY_HEADER_SIZE + 8)
  return b
}

/** NBD_REPLY_TYPE_NONE: "length MUST be 0 ... MUST always be used with the NBD_REPLY_FLAG_DONE bit set". */
export function encodeStructuredNone (c: Cookie): Buffer {
  const b = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_SIZE)
  putStructuredHeader(b, c, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0)
  return b
}

/**
 * NBD_REPLY_TYPE_ERROR, the final chunk: "32 bits: error (MUST be
 * nonzero); 16 bits: message length; message length bytes: optional
 * string suitable for direct display to a human being".
 */
export function encodeStructuredError (c: Cookie, error: number, message: string): Buffer {
  const msg = encodeString(message)
  const b = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_SIZE + 6 + msg.length)
  putStructuredHeader(b, c, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6 + msg.length)
  b.writeUInt32BE(error, NBD_STRUCTURED_REPLY_HEADER_SIZE)
  b.writeUInt16BE(msg.length, NBD_STRUCTURED_REPLY_HEADER_SIZE + 4)
  msg.copy(b, NBD_STRUCTURED_REPLY_HEADER_SIZE + 6)
  return b
}

/**
 * NBD_REPLY_TYPE_BLOCK_STATUS: "32 bits, metadata context ID" then per
 * descriptor "32 bits, length of the extent (unsigned, MUST be nonzero);
 * 32 bits, status flags". `descriptors` must not be empty.
 */
export function encodeBlockStatus (c: Cookie, flags: number, contextId: number, descriptors: BlockDescriptor[]): Buffer {
  const length = 4 + 8 * descriptors.length
  const b = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_SIZE + length)
  putStructuredHeader(b, c, flags, NBD_REPLY_TYPE_BLOCK_STATUS, length)
  let pos = NBD_STRUCTURED_REPLY_HEADER_SIZE
  b.writeUInt32BE(contextId, pos)
  pos += 4
  for (const d of descriptors) {
    b.writeUInt32BE(d.length, pos)
    b.writeUInt32BE(d.flags, pos + 4)
    pos += 8
  }
  return b
}

function putOffset (b: Buffer, at: number, offset: number): void {
  b.writeUInt32BE(Math.floor(offset / 2 ** 32), at)
  b.writeUInt32BE(offset % 2 ** 32, at + 4)
}

// ---- The client's side ----------------------------------------------------

export interface ReplyHeader extends Cookie {
  structured: boolean
  /** Simple replies: the error field. Structured: 0 (errors are in error chunks). */
  error: number
  /** Structured replies only. */
  flags: number
  type: number
  /** Structured replies: payload length. Simple: 0 (a READ's data length is the client's to know). */
  length: number
  /** Bytes of header consumed. */
  size: number
}

/** Parses a reply header; undefined for an unknown magic or too few bytes. */
export function parseReplyHeader (buf: Buffer): ReplyHeader | undefined {
  if (buf.length < 4) return undefined
  const magic = buf.readUInt32BE(0)
  if (magic === NBD_SIMPLE_REPLY_MAGIC && buf.length >= NBD_SIMPLE_REPLY_SIZE) {
    return { structured: false, error: buf.readUInt32BE(4), cookieHi: buf.readUInt32BE(8), cookieLo: buf.readUInt32BE(12), flags: 0, type: 0, length: 0, size: NBD_SIMPLE_REPLY_SIZE }
  }
  if (magic === NBD_STRUCTURED_REPLY_MAGIC && buf.length >= NBD_STRUCTURED_REPLY_HEADER_SIZE) {
    return {
      structured: true,
      error: 0,
      flags: buf.readUInt16BE(4),
      type: buf.readUInt16BE(6),
      cookieHi: buf.readUInt32BE(8),
      cookieLo: buf.readUInt32BE(12),
      length: buf.readUInt32BE(16),
      size: NBD_STRUCTURED_REPLY_HEADER_SIZE
    }
  }
  return undefined
}
