/**
 * The wire format of the handshake (proto.md, "Handshake" and "Option
 * types"): parsers for what a client sends and encoders for what a server
 * answers, plus the reverse pair for a client. Pure functions over
 * buffers; the negotiation itself is in handshake.ts.
 *
 * Parsers never throw on bad input: they return undefined (a frame that
 * cannot be resynchronised) or an OptionError naming the reply type the
 * spec asks for.
 */
import {
  IHAVEOPT, NBDMAGIC, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_MAX_STRING,
  NBD_OPTION_HEADER_SIZE, NBD_OPTION_REPLY_HEADER_SIZE, NBD_REP_ERR_INVALID, NBD_REP_MAGIC,
  NBD_EXPORT_NAME_REPLY_SIZE, NBD_EXPORT_NAME_ZEROES, NBD_HANDSHAKE_SIZE
} from './protocol.js'

export interface OptionHeader {
  option: number
  /** Bytes of option data that follow. */
  length: number
}

export interface OptionError {
  /** An NBD_REP_ERR_* reply type. */
  error: number
  message: string
}

/** NBD_OPT_INFO and NBD_OPT_GO data. */
export interface InfoRequest {
  name: string
  /** NBD_INFO_* types asked for, in the client's order. */
  requests: number[]
}

/** NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT data. */
export interface MetaContextRequest {
  name: string
  queries: string[]
}

export const isOptionError = (v: unknown): v is OptionError =>
  typeof v === 'object' && v !== null && 'error' in v

const invalid = (message: string): OptionError => ({ error: NBD_REP_ERR_INVALID, message })

const utf8 = new TextDecoder('utf-8', { fatal: true })

/**
 * A protocol string: "a sequence of UTF-8 code points, which is not NUL
 * terminated, MUST NOT contain NUL characters ... MUST be no longer than
 * 4096 bytes" (Conventions). Undefined when `buf` breaks any of that.
 */
export function decodeString (buf: Buffer): string | undefined {
  if (buf.length > NBD_MAX_STRING || buf.includes(0)) return undefined
  try {
    return utf8.decode(buf)
  } catch {
    return undefined
  }
}

/** A string for a reply: UTF-8, no NUL, at most 4096 bytes (cut at a character edge). */
export function encodeString (s: string): Buffer {
  let b = Buffer.from(s.replaceAll('\0', ' '), 'utf8')
  if (b.length > NBD_MAX_STRING) {
    let end = NBD_MAX_STRING
    while (end > 0 && (b[end]! & 0xc0) === 0x80) end-- // not inside a multi-byte character
    b = b.subarray(0, end)
  }
  return b
}

// ---- What the client sends ----------------------------------------------

/** "C: 32 bits, client flags". */
export function parseClientFlags (buf: Buffer): number {
  return buf.readUInt32BE(0)
}

/**
 * "C: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT'); C: 32 bits, option;
 * C: 32 bits, length of option data (unsigned)". Undefined when the magic
 * is wrong: nothing after it can be trusted to be a frame boundary.
 */
export function parseOptionHeader (buf: Buffer): OptionHeader | undefined {
  if (buf.length < NBD_OPTION_HEADER_SIZE || buf.readBigUInt64BE(0) !== IHAVEOPT) return undefined
  return { option: buf.readUInt32BE(8), length: buf.readUInt32BE(12) }
}

/** NBD_OPT_EXPORT_NAME: "String, name of the export"; the whole data is the name. */
export function parseExportName (data: Buffer): string | OptionError {
  return decodeString(data) ?? invalid('export name is not a valid string (UTF-8, no NUL, at most 4096 bytes)')
}

/**
 * NBD_OPT_INFO / NBD_OPT_GO: "32 bits, length of name (unsigned); MUST be
 * no larger than the option data length - 6; String: name of the export;
 * 16 bits, number of information requests; 16 bits x n".
 */
export function parseInfoRequest (data: Buffer): InfoRequest | OptionError {
  if (data.length < 6) return invalid(`option data of ${data.length} bytes is shorter than the 6 bytes required`)
  const nameLength = data.readUInt32BE(0)
  if (nameLength > data.length - 6) return invalid(`export name length ${nameLength} exceeds the option data`)
  const name = decodeString(data.subarray(4, 4 + nameLength))
  if (name === undefined) return invalid('export name is not a valid string (UTF-8, no NUL, at most 4096 bytes)')
  const count = data.readUInt16BE(4 + nameLength)
  const rest = data.length - 6 - nameLength
  if (rest !== count * 2) return invalid(`${count} information requests need ${count * 2} bytes, the option has ${rest}`)
  const requests: number[] = []
  for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(6 + nameLength + 2 * i))
  return { name, requests }
}

/**
 * NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: "32 bits, length
 * of export name; String, name of export; 32 bits, number of queries; Zero
 * or more queries, each being: 32 bits, length of query; String". "If the
 * option request is syntactically invalid (such as a query length that
 * would require reading beyond the original length given in the option
 * header), the server MUST fail the request with NBD_REP_ERR_INVALID."
 */
export function parseMetaContextRequest (data: Buffer): MetaContextRequest | OptionError {
  if (data.length < 8) return invalid(`option data of ${data.length} bytes is shorter than the 8 bytes required`)
  const nameLength = data.readUInt32BE(0)
  if (nameLength > data.length - 8) return invalid(`export name length ${nameLength} exceeds the option data`)
  const name = decodeString(data.subarray(4, 4 + nameLength))
  if (name === undefined) return invalid('export name is not a valid string (UTF-8, no NUL, at most 4096 bytes)')
  let pos = 4 + nameLength
  const count = data.readUInt32BE(pos)
  pos += 4
  // Each query takes at least its 4-byte length: a count the data cannot
  // hold is refused before any loop runs on it.
  if (count > (data.length - pos) / 4) return invalid(`${count} queries cannot fit in the option data`)
  const queries: string[] = []
  for (let i = 0; i < count; i++) {
    if (data.length - pos < 4) return invalid(`query ${i} is cut short`)
    const len = data.readUInt32BE(pos)
    pos += 4
    if (len > data.length - pos) return invalid(`query ${i} length ${len} exceeds the option data`)
    const q = decodeString(data.subarray(pos, pos + len))
    if (q === undefined) return invalid(`query ${i} is not a valid string`)
    queries.push(q)
    pos += len
  }
  if (pos !== data.length) return invalid(`${data.length - pos} bytes after the last query`)
  return { name, queries }
}

// ---- What the server answers --------------------------------------------

/** "S: NBDMAGIC; S: IHAVEOPT; S: 16 bits, handshake flags". */
export function encodeHandshake (flags: number): Buffer {
  const b = Buffer.allocUnsafe(NBD_HANDSHAKE_SIZE)
  b.writeBigUInt64BE(NBDMAGIC, 0)
  b.writeBigUInt64BE(IHAVEOPT, 8)
  b.writeUInt16BE(flags, 16)
  return b
}

/**
 * "S: 64 bits, 0x3e889045565a9; S: 32 bits, the option as sent by the
 * client to which this is a reply; S: 32 bits, reply type; S: 32 bits,
 * length of the reply; S: any data as required by the reply".
 */
export function encodeOptionReply (option: number, type: number, data?: Buffer): Buffer {
  const len = data?.length ?? 0
  const b = Buffer.allocUnsafe(NBD_OPTION_REPLY_HEADER_SIZE + len)
  b.writeBigUInt64BE(NBD_REP_MAGIC, 0)
  b.writeUInt32BE(option >>> 0, 8)
  b.writeUInt32BE(type >>> 0, 12)
  b.writeUInt32BE(len, 16)
  data?.copy(b, NBD_OPTION_REPLY_HEADER_SIZE)
  return b
}

/** "All error replies MAY have some data set, in which case that data is an error message string". */
export function encodeOptionError (option: number, error: number, message: string): Buffer {
  return encodeOptionReply(option, error, encodeString(message))
}

/** NBD_REP_SERVER: "32 bits, length of name (unsigned); String, name of the export". */
export function encodeServerData (name: string): Buffer {
  const n = Buffer.from(name, 'utf8')
  const b = Buffer.allocUnsafe(4 + n.length)
  b.writeUInt32BE(n.length, 0)
  n.copy(b, 4)
  return b
}

/** NBD_INFO_EXPORT: "16 bits, NBD_INFO_EXPORT; 64 bits, size; 16 bits, transmission flags". */
export function encodeInfoExport (size: number, flags: number): Buffer {
  const b = Buffer.allocUnsafe(12)
  b.writeUInt16BE(NBD_INFO_EXPORT, 0)
  b.writeBigUInt64BE(BigInt(size), 2)
  b.writeUInt16BE(flags, 10)
  return b
}

/** NBD_INFO_NAME: "16 bits, NBD_INFO_NAME; String: name of the export". */
export function encodeInfoName (name: string): Buffer {
  const n = encodeString(name)
  const b = Buffer.allocUnsafe(2 + n.length)
  b.writeUInt16BE(NBD_INFO_NAME, 0)
  n.copy(b, 2)
  return b
}

/** NBD_INFO_BLOCK_SIZE: "16 bits; 32 bits, minimum block size; 32 bits, preferred; 32 bits, maximum payload". */
export function encodeInfoBlockSize (minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.allocUnsafe(14)
  b.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0)
  b.writeUInt32BE(minimum, 2)
  b.writeUInt32BE(preferred, 6)
  b.writeUInt32BE(maximum, 10)
  return b
}

/** NBD_REP_META_CONTEXT: "32 bits, NBD metadata context ID; String, name of the metadata context". */
export function encodeMetaContextData (id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8')
  const b = Buffer.allocUnsafe(4 + n.length)
  b.writeUInt32BE(id, 0)
  n.copy(b, 4)
  return b
}

/**
 * Reply to NBD_OPT_EXPORT_NAME: "S: 64 bits, size of the export in bytes
 * (unsigned); S: 16 bits, transmission flags; S: 124 bytes, zeroes
 * (reserved) (unless NBD_FLAG_C_NO_ZEROES was negotiated by the client)".
 */
export function encodeExportNameReply (size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(NBD_EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : NBD_EXPORT_NAME_ZEROES))
  b.writeBigUInt64BE(BigInt(size), 0)
  b.writeUInt16BE(flags, 8)
  return b
}

// ---- The client's side ----------------------------------------------------

/** The server's greeting: its handshake flags, or undefined when the magic is wrong. */
export function parseHandshake (buf: Buffer): number | undefined {
  if (buf.length < NBD_HANDSHAKE_SIZE || buf.readBigUInt64BE(0) !== NBDMAGIC || buf.readBigUInt64BE(8) !== IHAVEOPT) return undefined
  return buf.readUInt16BE(16)
}

export function encodeClientFlags (flags: number): Buffer {
  const b = Buffer.allocUnsafe(4)
  b.writeUInt32BE(flags, 0)
  return b
}

export function encodeOption (option: number, data?: Buffer): Buffer {
  const len = data?.length ?? 0
  const b = Buffer.allocUnsafe(NBD_OPTION_HEADER_SIZE + len)
  b.writeBigUInt64BE(IHAVEOPT, 0)
  b.writeUInt32BE(option >>> 0, 8)
  b.writeUInt32BE(len, 12)
  data?.copy(b, NBD_OPTION_HEADER_SIZE)
  return b
}

export function encodeInfoRequest (name: string, requests: number[]): Buffer {
  const n = Buffer.from(name, 'utf8')
  const b = Buffer.allocUnsafe(6 + n.length + 2 * requests.length)
  b.writeUInt32BE(n.length, 0)
  n.copy(b, 4)
  b.writeUInt16BE(requests.length, 4 + n.length)
  requests.forEach((r, i) => b.writeUInt16BE(r, 6 + n.length + 2 * i))
  return b
}

export function encodeMetaContextRequest (name: string, queries: string[]): Buffer {
  const parts = [encodeServerData(name), encodeClientFlags(queries.length)]
  for (const q of queries) parts.push(encodeServerData(q))
  return Buffer.concat(parts)
}

export interface OptionReplyHeader {
  option: number
  type: number
  length: number
}

export function parseOptionReplyHeader (buf: Buffer): OptionReplyHeader | undefined {
  if (buf.length < NBD_OPTION_REPLY_HEADER_SIZE || buf.readBigUInt64BE(0) !== NBD_REP_MAGIC) return undefined
  return { option: buf.readUInt32BE(8), type: buf.readUInt32BE(12), length: buf.readUInt32BE(16) }
}
