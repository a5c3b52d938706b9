/**
 * The client side of the handshake (proto.md, "Newstyle negotiation" and
 * "Fixed newstyle negotiation"): greeting, client flags, NBD_OPT_GO with
 * an NBD_INFO_BLOCK_SIZE request, and NBD_OPT_EXPORT_NAME for servers that
 * do not know NBD_OPT_GO or are not fixed newstyle; when block status is
 * wanted, NBD_OPT_STRUCTURED_REPLY and NBD_OPT_SET_META_CONTEXT for
 * base:allocation before them (a server that refuses either gives a
 * connection without block status, not an error). One option at a time,
 * as the spec requires ("The client MUST NOT send any option until it has
 * received a final reply to any option it has sent").
 */
import type { Socket } from 'node:net'
import { UkaiError } from '../errors.js'
import {
  IHAVEOPT, MAX_PAYLOAD, NBDMAGIC, NBD_EXPORT_NAME_REPLY_SIZE, NBD_EXPORT_NAME_ZEROES, NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_HANDSHAKE_SIZE, NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT, NBD_OPTION_HEADER_SIZE, NBD_OPTION_REPLY_HEADER_SIZE, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP,
  NBD_REP_FLAG_ERROR, NBD_REP_INFO, NBD_REP_MAGIC, NBD_REP_META_CONTEXT, BASE_ALLOCATION
} from '../frontends/nbd/protocol.js'
import { protocolError } from './nbd-reply-parser.js'

/** Option replies are an info item or an error message; anything bigger is not a reply we asked for. */
const MAX_OPTION_REPLY = 64 * 1024
/** "S: 64 bits, 0x00420281861253 (cliserv_magic, a magic number)", oldstyle's second magic. */
const OLDSTYLE_MAGIC = 0x00420281861253n


/**
 * Bytes received during the handshake, read one frame at a time. Chunks are
 * copied on arrival, because the socket reads into one reused buffer.
 */
export class HandshakeQueue {
  private chunks: Buffer[] = []
  private length = 0
  private waiter: { bytes: number, resolve: () => void, reject: (err: Error) => void } | undefined
  private ended: Error | undefined

  push (chunk: Buffer): void {
    if (this.ended !== undefined || chunk.length === 0) return
    this.chunks.push(Buffer.from(chunk))
    this.length += chunk.length
    const w = this.waiter
    if (w !== undefined && this.length >= w.bytes) {
      this.waiter = undefined
      w.resolve()
    }
  }

  end (err: Error): void {
    if (this.ended !== undefined) return
    this.ended = err
    const w = this.waiter
    this.waiter = undefined
    w?.reject(err)
  }

  async read (n: number): Promise<Buffer> {
    if (this.length < n) {
      if (this.ended !== undefined) throw this.ended
      await new Promise<void>((resolve, reject) => { this.waiter = { bytes: n, resolve, reject } })
    }
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks, this.length)
    this.length -= n
    this.chunks = this.length > 0 ? [all.subarray(n)] : []
    return all.subarray(0, n)
  }

  /** Whatever arrived after the last frame read (a server should send nothing). */
  rest (): Buffer[] {
    const r = this.chunks
    this.chunks = []
    this.length = 0
    return r
  }
}

export interface Negotiated {
  size: number
  transmissionFlags: number
  minBlockSize: number
  preferredBlockSize: number
  maxPayload: number
  /** NBD_OPT_STRUCTURED_REPLY was acknowledged: replies may come as structured chunks. */
  structured: boolean
  /** The context ID of base:allocation, when the server selected it (NBD_CMD_BLOCK_STATUS may be sent). */
  allocationContext?: number
}

/** "C: 64 bits, IHAVEOPT; C: 32 bits, option; C: 32 bits, length of option data; C: data". */
function encodeOption (option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(NBD_OPTION_HEADER_SIZE + data.length)
  b.writeBigUInt64BE(IHAVEOPT, 0)
  b.writeUInt32BE(option, 8)
  b.writeUInt32BE(data.length, 12)
  data.copy(b, NBD_OPTION_HEADER_SIZE)
  return b
}

/** NBD_OPT_GO data: "32 bits, length of name; String: name; 16 bits, number of information requests; 16 bits x n". */
function encodeGo (name: Buffer, infos: number[]): Buffer {
  const b = Buffer.allocUnsafe(4 + name.length + 2 + 2 * infos.length)
  b.writeUInt32BE(name.length, 0)
  name.copy(b, 4)
  b.writeUInt16BE(infos.length, 4 + name.length)
  infos.forEach((info, i) => b.writeUInt16BE(info, 6 + name.length + 2 * i))
  return b
}

const isPowerOfTwo = (n: number): boolean => n > 0 && (n & (n - 1)) === 0

function exportSize (b: Buffer, at: number): number {
  const size = b.readBigUInt64BE(at)
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolError(`export size ${size} is too large`)
  return Number(size)
}

/** The largest payload this client sends: the server's maximum, at most 2^25, a multiple of the minimum block size. */
function effectiveMaxPayload (min: number, max: number): number {
  const capped = Math.min(max, MAX_PAYLOAD)
  return Math.max(min, capped - (capped % min))
}

export class Handshake {
  private readonly queue: HandshakeQueue
  private socket: Socket
  private readonly name: Buffer
  /** Runs the TLS handshake after NBD_OPT_STARTTLS; undefined: plain text. */
  private readonly upgrade: (() => Promise<Socket>) | undefined
  private readonly exportName: string
  /** NBD_OPT_ABORT was sent: the socket should end gracefully rather than be destroyed. */
  softDisconnect = false

  /** Ask for structured replies and base:allocation. */
  private readonly wantStatus: boolean
  private structured = false
  private allocationContext: number | undefined

  constructor (socket: Socket, queue: HandshakeQueue, exportName: string, upgrade?: () => Promise<Socket>, blockStatus = false) {
    this.socket = socket
    this.wantStatus = blockStatus
    this.upgrade = upgrade
    this.queue = queue
    this.exportName = exportName
    this.name = Buffer.from(exportName, 'utf8')
  }

  async run (): Promise<Negotiated> {
    // "S: 64 bits, NBDMAGIC; S: 64 bits, IHAVEOPT; S: 16 bits, handshake flags".
    const greeting = await this.queue.read(NBD_HANDSHAKE_SIZE)
    if (greeting.readBigUInt64BE(0) !== NBDMAGIC) throw this.refused('not an NBD server (bad NBDMAGIC)')
    const magic = greeting.readBigUInt64BE(8)
    if (magic === OLDSTYLE_MAGIC) throw this.refused('the server speaks oldstyle negotiation, which is not supported')
    if (magic !== IHAVEOPT) throw this.refused('bad IHAVEOPT magic')
    const flags = greeting.readUInt16BE(16)
    const fixed = (flags & NBD_FLAG_FIXED_NEWSTYLE) !== 0
    const noZeroes = (flags & NBD_FLAG_NO_ZEROES) !== 0
    // "NBD_FLAG_C_NO_ZEROES: MUST NOT be set if the server did not set
    // NBD_FLAG_NO_ZEROES"; "Clients MUST NOT set any other flags".
    const clientFlags = Buffer.allocUnsafe(4)
    clientFlags.writeUInt32BE((fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0), 0)
    this.socket.write(clientFlags)
    if (this.upgrade !== undefined) {
      // "The client MUST NOT send NBD_OPT_STARTTLS unless the server is fixed newstyle".
      if (!fixed) throw this.refused('the server is not fixed newstyle, so it cannot speak TLS')
      await this.startTls(this.upgrade)
    }
    // "In non-fixed newstyle only one option can be set (NBD_OPT_EXPORT_NAME)".
    if (fixed) {
      if (this.wantStatus) await this.blockStatusOptions()
      const go = await this.go()
      if (go !== undefined) return this.withStatus(go)
    }
    return this.withStatus(await this.exportNameOption(noZeroes))
  }

  private withStatus (n: Negotiated): Negotiated {
    return { ...n, structured: this.structured, ...(this.allocationContext !== undefined ? { allocationContext: this.allocationContext } : {}) }
  }

  /**
   * NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_SET_META_CONTEXT selecting
   * base:allocation for this export. "clients SHOULD be prepared to also
   * handle NBD_REP_ERR_UNSUP; in this case, no structured replies will be
   * sent": any error reply leaves the connection without them.
   */
  private async blockStatusOptions (): Promise<void> {
    this.socket.write(encodeOption(NBD_OPT_STRUCTURED_REPLY))
    const sr = await this.reply(NBD_OPT_STRUCTURED_REPLY, 'NBD_OPT_STRUCTURED_REPLY')
    if (sr.type >= NBD_REP_FLAG_ERROR) return
    if (sr.type !== NBD_REP_ACK) throw this.refused(`unexpected option reply type ${sr.type} to NBD_OPT_STRUCTURED_REPLY`)
    this.structured = true
    // "32 bits, length of export name; String, name of export; 32 bits, number of queries; 32 bits, length of query; String, query".
    const query = Buffer.from(BASE_ALLOCATION, 'ascii')
    const data = Buffer.allocUnsafe(4 + this.name.length + 4 + 4 + query.length)
    data.writeUInt32BE(this.name.length, 0)
    this.name.copy(data, 4)
    data.writeUInt32BE(1, 4 + this.name.length)
    data.writeUInt32BE(query.length, 8 + this.name.length)
    query.copy(data, 12 + this.name.length)
    this.socket.write(encodeOption(NBD_OPT_SET_META_CONTEXT, data))
    let context: number | undefined
    for (;;) {
      const { type, length, data: reply } = await this.reply(NBD_OPT_SET_META_CONTEXT, 'NBD_OPT_SET_META_CONTEXT')
      // "NBD_REP_META_CONTEXT: 32 bits, NBD metadata context ID; String, name of the metadata context".
      if (type === NBD_REP_META_CONTEXT) {
        if (length < 4) throw this.refused(`NBD_REP_META_CONTEXT of length ${length}`)
        if (reply.subarray(4).toString('utf8') === BASE_ALLOCATION) context = reply.readUInt32BE(0)
        continue
      }
      if (type === NBD_REP_ACK) break
      // An error: "replaces all previously-set metadata contexts (including when this command fails)".
      if (type >= NBD_REP_FLAG_ERROR) { context = undefined; break }
      throw this.refused(`unexpected option reply type ${type} to NBD_OPT_SET_META_CONTEXT`)
    }
    this.allocationContext = context
  }

  /** One option reply to `option`: "S: 64 bits, 0x3e889045565a9; S: 32 bits, option; S: 32 bits, reply type; S: 32 bits, length". */
  private async reply (option: number, name: string): Promise<{ type: number, length: number, data: Buffer }> {
    const h = await this.queue.read(NBD_OPTION_REPLY_HEADER_SIZE)
    if (h.readBigUInt64BE(0) !== NBD_REP_MAGIC) throw this.refused('bad option reply magic')
    const replied = h.readUInt32BE(8)
    const type = h.readUInt32BE(12)
    const length = h.readUInt32BE(16)
    if (replied !== option) throw this.refused(`reply to option ${replied}, but ${name} was sent`)
    if (length > MAX_OPTION_REPLY) throw this.refused(`option reply of ${length} bytes`)
    return { type, length, data: await this.queue.read(length) }
  }

  /** NBD_OPT_STARTTLS: on its ACK, the TLS handshake; everything after goes over TLS. */
  private async startTls (upgrade: () => Promise<Socket>): Promise<void> {
    this.socket.write(encodeOption(NBD_OPT_STARTTLS))
    const { type, data } = await this.reply(NBD_OPT_STARTTLS, 'NBD_OPT_STARTTLS')
    if (type !== NBD_REP_ACK) {
      this.abort()
      const text = data.toString('utf8')
      throw this.refused(`the server does not speak TLS (${type >= NBD_REP_FLAG_ERROR ? repErrorName(type) : `reply type ${type}`}${text === '' ? '' : `: ${text}`})`)
    }
    this.socket = await upgrade()
  }

  /** NBD_OPT_GO with an NBD_INFO_BLOCK_SIZE request; undefined when the server answers NBD_REP_ERR_UNSUP. */
  private async go (): Promise<Negotiated | undefined> {
    this.socket.write(encodeOption(NBD_OPT_GO, encodeGo(this.name, [NBD_INFO_BLOCK_SIZE])))
    let info: { size: number, flags: number } | undefined
    // Defaults when the server does not say ("Size constraints"): minimum 1, preferred 4096, maximum 2^25.
    let min = 1
    let preferred = 4096
    let max = MAX_PAYLOAD
    for (;;) {
      const { type, length, data } = await this.reply(NBD_OPT_GO, 'NBD_OPT_GO')
      if (type === NBD_REP_INFO) {
        // "The acceptable values for the header length field are determined by the information type".
        if (length < 2) throw this.refused('NBD_REP_INFO without an information type')
        const infoType = data.readUInt16BE(0)
        if (infoType === NBD_INFO_EXPORT) {
          // "length MUST be 12": type, 64 bits size, 16 bits transmission flags.
          if (length !== 12) throw this.refused(`NBD_INFO_EXPORT of length ${length}`)
          info = { size: exportSize(data, 2), flags: data.readUInt16BE(10) }
        } else if (infoType === NBD_INFO_BLOCK_SIZE) {
          // "The length MUST be 14": type, minimum, preferred, maximum payload.
          if (length !== 14) throw this.refused(`NBD_INFO_BLOCK_SIZE of length ${length}`)
          min = data.readUInt32BE(2)
          preferred = data.readUInt32BE(6)
          max = data.readUInt32BE(10)
          // "this value MUST be a power of 2, MUST NOT be larger than 2^16";
          // the maximum "MUST be at least as large as the preferred block size".
          if (!isPowerOfTwo(min) || min > 65536) throw this.refused(`minimum block size ${min} is not a power of 2 up to 65536`)
          if (max < min) throw this.refused(`maximum payload ${max} is below the minimum block size ${min}`)
        }
        // "The client MUST ignore information replies it does not understand."
        continue
      }
      if (type === NBD_REP_ACK) {
        // "the server MUST send at least one NBD_REP_INFO, with an NBD_INFO_EXPORT information type".
        if (info === undefined) throw this.refused('NBD_REP_ACK to NBD_OPT_GO without NBD_INFO_EXPORT')
        return { size: info.size, transmissionFlags: info.flags, minBlockSize: min, preferredBlockSize: preferred, maxPayload: effectiveMaxPayload(min, max), structured: false }
      }
      if (type >= NBD_REP_FLAG_ERROR) {
        // "clients SHOULD be prepared to also handle NBD_REP_ERR_UNSUP by
        // falling back to using NBD_OPT_EXPORT_NAME".
        if (type === NBD_REP_ERR_UNSUP) return undefined
        // "All error replies MAY have some data set, in which case that data
        // is an error message string suitable for display to the user."
        const text = data.toString('utf8')
        this.abort()
        const what = `${repErrorName(type)}${text === '' ? '' : `: ${text}`}`
        throw new UkaiError(type === NBD_REP_ERR_UNKNOWN ? 'UKAI_ERR_NOT_FOUND' : 'UKAI_ERR_CONNECT',
          `NBD export '${this.exportName}' refused: ${what}`, { export: this.exportName, reply: type, message: text })
      }
      throw this.refused(`unexpected option reply type ${type} to NBD_OPT_GO`)
    }
  }

  /**
   * NBD_OPT_EXPORT_NAME: "S: 64 bits, size of the export; S: 16 bits,
   * transmission flags; S: 124 bytes, zeroes (reserved) (unless
   * NBD_FLAG_C_NO_ZEROES was negotiated)". "If the server is unwilling to
   * allow the export, it MUST terminate the session", without a reason.
   */
  private async exportNameOption (noZeroes: boolean): Promise<Negotiated> {
    this.socket.write(encodeOption(NBD_OPT_EXPORT_NAME, this.name))
    let reply: Buffer
    try {
      reply = await this.queue.read(NBD_EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : NBD_EXPORT_NAME_ZEROES))
    } catch (err) {
      if ((err as UkaiError).code !== 'UKAI_ERR_CONNECT') throw err
      throw new UkaiError('UKAI_ERR_CONNECT', `NBD export '${this.exportName}' refused: the server closed the connection after NBD_OPT_EXPORT_NAME`, { export: this.exportName }, { cause: err })
    }
    return { size: exportSize(reply, 0), transmissionFlags: reply.readUInt16BE(8), minBlockSize: 1, preferredBlockSize: 4096, maxPayload: MAX_PAYLOAD, structured: false }
  }

  /** A soft disconnect: "The client desires to abort the negotiation and terminate the session." */
  private abort (): void {
    this.socket.write(encodeOption(NBD_OPT_ABORT))
    this.softDisconnect = true
  }

  private refused (what: string): UkaiError {
    return new UkaiError('UKAI_ERR_CONNECT', `NBD handshake for export '${this.exportName}' failed: ${what}`, { export: this.exportName })
  }
}

function repErrorName (type: number): string {
  const names = ['', 'UNSUP', 'POLICY', 'INVALID', 'PLATFORM', 'TLS_REQD', 'UNKNOWN', 'SHUTDOWN', 'BLOCK_SIZE_REQD', 'TOO_BIG', 'EXT_HEADER_REQD']
  const name = names[type - NBD_REP_FLAG_ERROR]
  return name === undefined || name === '' ? `NBD_REP_ERR 0x${type.toString(16)}` : `NBD_REP_ERR_${name}`
}
