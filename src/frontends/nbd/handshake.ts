/**
 * The server's side of the fixed newstyle handshake (proto.md,
 * "Handshake"): the greeting, the client flags, then option haggling until
 * the client enters transmission (NBD_OPT_GO, NBD_OPT_EXPORT_NAME) or
 * leaves (NBD_OPT_ABORT, a closed connection).
 *
 * Options are handled one at a time: "The client MUST NOT send any option
 * until it has received a final reply to any option it has sent". A
 * frame that cannot be parsed as an option (wrong magic) or a violation
 * the spec answers with a hard disconnect throws HardDisconnect; anything
 * else gets an error reply and haggling goes on.
 *
 * TLS (proto.md, "TLS support"): a listener with a TLS identity runs in
 * FORCEDTLS mode. Before NBD_OPT_STARTTLS every option but NBD_OPT_ABORT
 * is answered NBD_REP_ERR_TLS_REQD (NBD_OPT_EXPORT_NAME, which has no
 * error reply, ends the connection); after it, the same haggling runs over
 * TLS and the export is opened for the identity in the client's
 * certificate. A listener without one runs in NOTLS mode.
 */
import { toUkaiError } from '../../errors.js'
import type { PeerIdentity } from '../../tls/identity.js'
import type { ExportInfo, ExportProvider, OpenExport } from './exports.js'
import {
  encodeExportNameReply, encodeHandshake, encodeInfoBlockSize, encodeInfoExport, encodeInfoName,
  encodeMetaContextData, encodeOptionError, encodeOptionReply, encodeServerData, isOptionError,
  parseClientFlags, parseExportName, parseInfoRequest, parseMetaContextRequest, parseOptionHeader
} from './options.js'
import {
  BASE_ALLOCATION, MAX_PAYLOAD, MIN_BLOCK_SIZE, NBD_CLIENT_FLAGS_SIZE, NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO_NAME, NBD_OPTION_HEADER_SIZE,
  NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_ERR_INVALID, NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_UNKNOWN, NBD_OPT_STARTTLS, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_META_CONTEXT,
  NBD_REP_SERVER, PREFERRED_BLOCK_SIZE, optionName
} from './protocol.js'

/** Option data this server reads; longer data is skipped and answered NBD_REP_ERR_TOO_BIG. */
export const MAX_OPTION_DATA = 64 * 1024
/** Options one connection may send before it is taken for a denial of service. */
export const MAX_OPTIONS = 16 * 1024
/** The metadata context ID of base:allocation. */
export const ALLOCATION_CONTEXT_ID = 1

/** How the handshake reads and writes; the connection provides it. */
export interface HandshakeIO {
  /** The next `n` bytes; rejects when the peer is gone. */
  read: (n: number) => Promise<Buffer>
  /** Drops the next `n` bytes as they arrive. */
  discard: (n: number) => Promise<void>
  write: (buf: Buffer) => void
  /**
   * FORCEDTLS mode: runs the TLS handshake once NBD_OPT_STARTTLS is
   * acknowledged; resolves with the verified identity of the client,
   * rejects (the connection ends) when the client cannot prove one.
   */
  startTls?: () => Promise<PeerIdentity | undefined>
}

export interface HandshakeOptions {
  exports: ExportProvider
  /** Who opens the export (for the volume's opener list and messages). */
  who: string
  /** True once the server is shutting down. */
  shuttingDown: () => boolean
}

/** The outcome of a handshake that entered transmission. */
export interface Negotiated {
  export: OpenExport
  /** Transmission flags sent to the client. */
  flags: number
  structured: boolean
  /** Context ID of base:allocation when selected for this export. */
  allocationContext: number | undefined
}

/** The spec lets (or makes) the server drop the connection without a reply. */
export class HardDisconnect extends Error {
  constructor (message: string) {
    super(message)
    this.name = 'HardDisconnect'
  }
}

/**
 * The transmission flags of an export. Only what is implemented is
 * advertised ("The server MUST NOT set the flag for features it does not
 * support"). NBD_FLAG_CAN_MULTI_CONN only for read-only exports: every
 * connection shares the image's one Volume, so flushes are visible to all,
 * but a second connection of a writer would be served read-only (one
 * writer per image), which a multi-connection writer cannot use.
 */
export function transmissionFlags (readOnly: boolean, structured: boolean): number {
  let f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA
  if (readOnly) f |= NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN
  else f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO
  // NBD_FLAG_SEND_DF: "MUST leave this flag clear if structured replies
  // have not been negotiated". Every read is answered with one chunk, so
  // "don't fragment" always holds.
  if (structured) f |= NBD_FLAG_SEND_DF
  return f
}

/**
 * Runs the handshake. Resolves with the open export when the client
 * entered transmission, undefined when it sent NBD_OPT_ABORT. Throws
 * HardDisconnect, or the reader's error when the peer went away.
 */
export async function negotiate (io: HandshakeIO, opts: HandshakeOptions): Promise<Negotiated | undefined> {
  io.write(encodeHandshake(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
  const clientFlags = parseClientFlags(await io.read(NBD_CLIENT_FLAGS_SIZE))
  // "the server MUST drop the TCP connection if the client sets an unknown
  // flag, or a flag that does not match something advertised by the server."
  if ((clientFlags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) !== 0) {
    throw new HardDisconnect(`unknown client flags 0x${clientFlags.toString(16)}`)
  }
  // A client without NBD_FLAG_C_FIXED_NEWSTYLE is still answered in fixed
  // newstyle: "Servers MAY choose to honour fixed newstyle from clients
  // that didn't set this bit".
  const noZeroes = (clientFlags & NBD_FLAG_C_NO_ZEROES) !== 0
  const h = new Haggler(io, opts)

  for (let count = 0; ; count++) {
    // "if a server believes a client's behaviour constitutes a denial of
    // service, it MAY initiate a hard disconnect."
    if (count >= MAX_OPTIONS) throw new HardDisconnect(`more than ${MAX_OPTIONS} options`)
    const header = parseOptionHeader(await io.read(NBD_OPTION_HEADER_SIZE))
    if (header === undefined) throw new HardDisconnect('option without the IHAVEOPT magic')
    const { option, length } = header
    if (length > MAX_OPTION_DATA) {
      if (option === NBD_OPT_EXPORT_NAME) throw new HardDisconnect(`${optionName(option)} with ${length} bytes of data`)
      // "The presence of the option length in every option allows the
      // server to skip any options presented by the client that it does
      // not understand": skipped without being held in memory.
      await io.discard(length)
      h.error(option, NBD_REP_ERR_TOO_BIG, `${optionName(option)}: ${length} bytes of option data is more than this server reads (${MAX_OPTION_DATA})`)
      continue
    }
    const data = await io.read(length)
    // "If the server is in the process of being shut down it ... SHOULD
    // error further options received (other than an NBD_OPT_ABORT) with
    // NBD_REP_ERR_SHUTDOWN."
    if (opts.shuttingDown() && option !== NBD_OPT_ABORT) {
      if (option === NBD_OPT_EXPORT_NAME) throw new HardDisconnect('server shutting down')
      h.error(option, NBD_REP_ERR_SHUTDOWN, 'the server is shutting down')
      continue
    }
    if (io.startTls !== undefined && h.peer === undefined) {
      // FORCEDTLS: "the server MUST reply to any option apart from
      // NBD_OPT_STARTTLS or NBD_OPT_ABORT with NBD_REP_ERR_TLS_REQD";
      // NBD_OPT_EXPORT_NAME has no error reply: "the server MUST terminate
      // the session".
      if (option === NBD_OPT_STARTTLS) {
        // "The client MUST NOT send any data with this option."
        if (data.length !== 0) { h.error(option, NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data'); continue }
        io.write(encodeOptionReply(option, NBD_REP_ACK))
        let peer: PeerIdentity | undefined
        try {
          peer = await io.startTls()
        } catch (err) {
          throw new HardDisconnect(`TLS handshake failed: ${toUkaiError(err).message}`)
        }
        if (peer === undefined) throw new HardDisconnect('the client\'s certificate names neither a node nor a client of this cluster')
        h.peer = peer
        continue
      }
      if (option === NBD_OPT_EXPORT_NAME) throw new HardDisconnect('NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a TLS-only listener')
      if (option !== NBD_OPT_ABORT) { h.error(option, NBD_REP_ERR_TLS_REQD, `this server speaks only TLS: send NBD_OPT_STARTTLS first (${optionName(option)} refused)`); continue }
    }
    switch (option) {
      case NBD_OPT_EXPORT_NAME: return await h.exportName(data, noZeroes)
      case NBD_OPT_STARTTLS:
        // "If the server receives NBD_OPT_STARTTLS when TLS has already
        // been negotiated, it MUST reply with NBD_REP_ERR_INVALID"; in NOTLS
        // mode it is not supported.
        if (h.peer !== undefined) h.error(option, NBD_REP_ERR_INVALID, 'TLS is already on')
        else h.error(option, NBD_REP_ERR_UNSUP, 'this listener does not speak TLS')
        break
      case NBD_OPT_ABORT:
        // "The server MUST reply with NBD_REP_ACK"; "a server SHOULD ignore any data sent by the client".
        io.write(encodeOptionReply(option, NBD_REP_ACK))
        return undefined
      case NBD_OPT_LIST: h.list(data); break
      case NBD_OPT_INFO: await h.info(option, data); break
      case NBD_OPT_GO: {
        const done = await h.info(option, data)
        if (done !== undefined) return done
        break
      }
      case NBD_OPT_STRUCTURED_REPLY: h.structuredReply(data); break
      case NBD_OPT_LIST_META_CONTEXT: h.metaContext(option, data); break
      case NBD_OPT_SET_META_CONTEXT: h.metaContext(option, data); break
      default:
        // "Servers that receive messages which they do not implement MUST
        // reply to them with NBD_REP_ERR_UNSUP".
        h.error(option, NBD_REP_ERR_UNSUP, `${optionName(option)} is not supported by this server`)
    }
  }
}

/** The state of one connection's option haggling. */
class Haggler {
  private readonly io: HandshakeIO
  private readonly opts: HandshakeOptions
  private structured = false
  /** The client's verified identity, once TLS is on. */
  peer: PeerIdentity | undefined
  /** The last NBD_OPT_SET_META_CONTEXT: its export and whether base:allocation was selected. */
  private meta: { name: string, allocation: boolean } | undefined

  constructor (io: HandshakeIO, opts: HandshakeOptions) {
    this.io = io
    this.opts = opts
  }

  error (option: number, type: number, message: string): void {
    this.io.write(encodeOptionError(option, type, message))
  }

  private ack (option: number): void {
    this.io.write(encodeOptionReply(option, NBD_REP_ACK))
  }

  /** "The client MUST NOT send any additional data with the option, and the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID." */
  list (data: Buffer): void {
    if (data.length !== 0) return this.error(NBD_OPT_LIST, NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data')
    for (const name of this.opts.exports.list()) {
      this.io.write(encodeOptionReply(NBD_OPT_LIST, NBD_REP_SERVER, encodeServerData(name)))
    }
    this.ack(NBD_OPT_LIST)
  }

  structuredReply (data: Buffer): void {
    if (data.length !== 0) return this.error(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data')
    this.structured = true
    this.ack(NBD_OPT_STRUCTURED_REPLY)
  }

  /**
   * NBD_OPT_INFO and NBD_OPT_GO. Returns the negotiated session when a GO
   * succeeded (transmission starts), else undefined.
   */
  async info (option: number, data: Buffer): Promise<Negotiated | undefined> {
    const req = parseInfoRequest(data)
    if (isOptionError(req)) { this.error(option, req.error, `${optionName(option)}: ${req.message}`); return undefined }
    // "If no name is specified ... this specifies the default export (if
    // any)": this server has none; every image is named.
    if (req.name === '') { this.error(option, NBD_REP_ERR_UNKNOWN, 'there is no default export: name an image'); return undefined }
    let info: ExportInfo | undefined
    let opened: OpenExport | undefined
    if (option === NBD_OPT_GO) {
      try {
        opened = await this.opts.exports.open(req.name, this.opts.who, this.peer)
      } catch (err) {
        // NBD_REP_ERR_UNKNOWN: "The requested export is not available."
        this.error(option, NBD_REP_ERR_UNKNOWN, `export '${req.name}': ${toUkaiError(err).message}`)
        return undefined
      }
      info = opened
    } else {
      info = this.opts.exports.describe(req.name)
      if (info === undefined) { this.error(option, NBD_REP_ERR_UNKNOWN, `no export named '${req.name}'`); return undefined }
    }
    const flags = transmissionFlags(info.readOnly, this.structured)
    // "the server MUST send at least one NBD_REP_INFO, with an NBD_INFO_EXPORT information type."
    this.io.write(encodeOptionReply(option, NBD_REP_INFO, encodeInfoExport(info.size, flags)))
    if (req.requests.includes(NBD_INFO_NAME)) {
      this.io.write(encodeOptionReply(option, NBD_REP_INFO, encodeInfoName(req.name)))
    }
    // Sent whether asked for or not ("The server MAY send information
    // requests back which are not explicitly requested"): the constraints
    // are the spec's defaults, so a client that ignores them is still right.
    this.io.write(encodeOptionReply(option, NBD_REP_INFO, encodeInfoBlockSize(MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD)))
    this.ack(option)
    if (opened === undefined) return undefined
    return { export: opened, flags, structured: this.structured, allocationContext: this.allocationFor(req.name) }
  }

  /**
   * NBD_OPT_EXPORT_NAME: "If the chosen export does not exist or
   * requirements for the chosen export are not met ... the server MUST
   * terminate the session."
   */
  async exportName (data: Buffer, noZeroes: boolean): Promise<Negotiated> {
    const name = parseExportName(data)
    if (isOptionError(name)) throw new HardDisconnect(`NBD_OPT_EXPORT_NAME: ${name.message}`)
    let opened: OpenExport
    try {
      opened = await this.opts.exports.open(name, this.opts.who, this.peer)
    } catch (err) {
      throw new HardDisconnect(`NBD_OPT_EXPORT_NAME '${name}': ${toUkaiError(err).message}`)
    }
    const flags = transmissionFlags(opened.readOnly, this.structured)
    this.io.write(encodeExportNameReply(opened.size, flags, noZeroes))
    return { export: opened, flags, structured: this.structured, allocationContext: this.allocationFor(name) }
  }

  /**
   * NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT, with the one
   * context this server has, base:allocation.
   */
  metaContext (option: number, data: Buffer): void {
    const set = option === NBD_OPT_SET_META_CONTEXT
    // SET: "Issuing this command replaces all previously-set metadata
    // contexts (including when this command fails)".
    if (set) this.meta = undefined
    // "This option MUST NOT be requested unless structured replies have
    // been negotiated first. If a client attempts to do so, a server
    // SHOULD send NBD_REP_ERR_INVALID." (LIST: "MAY send".)
    if (!this.structured) return this.error(option, NBD_REP_ERR_INVALID, `${optionName(option)} needs NBD_OPT_STRUCTURED_REPLY first`)
    const req = parseMetaContextRequest(data)
    if (isOptionError(req)) return this.error(option, req.error, `${optionName(option)}: ${req.message}`)
    if (this.opts.exports.describe(req.name) === undefined) return this.error(option, NBD_REP_ERR_UNKNOWN, `no export named '${req.name}'`)
    let allocation: boolean
    if (set) {
      // "base:" alone: "the server MUST ignore this form during
      // NBD_OPT_SET_META_CONTEXT"; other unknown queries are ignored too.
      allocation = req.queries.includes(BASE_ALLOCATION)
      this.meta = { name: req.name, allocation }
    } else {
      // "If zero queries are sent, then the server MUST return all the
      // metadata contexts that are available"; "base:" is a wildcard.
      allocation = req.queries.length === 0 || req.queries.some((q) => q === 'base:' || q === BASE_ALLOCATION)
    }
    // LIST: "The metadata context ID in these replies is reserved and SHOULD be set to zero".
    if (allocation) this.io.write(encodeOptionReply(option, NBD_REP_META_CONTEXT, encodeMetaContextData(set ? ALLOCATION_CONTEXT_ID : 0, BASE_ALLOCATION)))
    this.ack(option)
  }

  /**
   * "A client MUST NOT send NBD_CMD_BLOCK_STATUS unless ... the final time
   * [NBD_OPT_SET_META_CONTEXT] was sent, it referred to the same export
   * name that was ultimately selected for transmission phase".
   */
  private allocationFor (name: string): number | undefined {
    return this.meta?.name === name && this.meta.allocation ? ALLOCATION_CONTEXT_ID : undefined
  }
}

