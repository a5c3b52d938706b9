/**
 * nbd-options: the NBD server's handshake, in-process. Random and mutated
 * option streams go through the real `negotiate` (handshake.ts) over a real
 * FrameReader (frame-reader.ts), delivered in random pieces, against an
 * in-memory export provider; the option data parsers (options.ts) are also
 * called on their own with random and mutated data.
 */
import fc from 'fast-check'
import { imageNotFound, UkaiError } from '../../../src/errors.js'
import type { ExportProvider, NbdBackend, OpenExport } from '../../../src/frontends/nbd/exports.js'
import { FrameReader } from '../../../src/frontends/nbd/frame-reader.js'
import { HardDisconnect, negotiate, type Negotiated } from '../../../src/frontends/nbd/handshake.js'
import {
  decodeString, encodeClientFlags, encodeInfoRequest, encodeMetaContextRequest, encodeOption, isOptionError,
  parseExportName, parseInfoRequest, parseMetaContextRequest, parseOptionHeader
} from '../../../src/frontends/nbd/options.js'
import {
  BASE_ALLOCATION, NBD_EXPORT_NAME_REPLY_SIZE, NBD_EXPORT_NAME_ZEROES, NBD_HANDSHAKE_SIZE, NBD_OPTION_REPLY_HEADER_SIZE,
  NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID, NBD_REP_FLAG_ERROR, NBD_REP_MAGIC
} from '../../../src/frontends/nbd/protocol.js'
import { count, crash, tick, violation, type Stats, type Target } from '../harness.js'
import { bytes, cuts, hex, mutated, rarely, split, u32 } from '../gen.js'

const SIZE = 1 << 20

const nullBackend: NbdBackend = {
  blockSize: 65536,
  read: async () => 0,
  write: async () => {},
  flush: async () => {},
  trim: async () => {},
  zero: async () => {},
  extents: async () => [],
  zeroIsFast: async () => true
}

/** Exports: 'fuzz' writable, 'ro' read-only, 'busy' listed but refusing to open (as an image another process holds could). */
export const fakeExports = (opened: string[]): ExportProvider => ({
  list: () => ['fuzz', 'ro', 'busy'],
  describe: (name) => name === 'fuzz' ? { size: SIZE, readOnly: false } : name === 'ro' ? { size: 4096, readOnly: true } : name === 'busy' ? { size: 0, readOnly: false } : undefined,
  open: async (name): Promise<OpenExport> => {
    if (name === 'busy') throw new UkaiError('UKAI_ERR_IO', 'cannot open')
    if (name !== 'fuzz' && name !== 'ro') throw imageNotFound(name)
    opened.push(name)
    return { name, size: name === 'fuzz' ? SIZE : 4096, readOnly: name === 'ro', backend: nullBackend, close: async () => {} }
  }
})

const exportName = fc.oneof(fc.constantFrom('fuzz', 'ro', 'busy', '', 'nope', 'fuzz\0', 'x'.repeat(4097)), fc.string({ maxLength: 12 }))
const optionNumber = fc.oneof({ arbitrary: fc.integer({ min: 0, max: 12 }), weight: 4 }, { arbitrary: u32, weight: 1 })

/** Option data as clients send it, before mutation. */
const optionData: fc.Arbitrary<Buffer> = fc.oneof(
  fc.constant(Buffer.alloc(0)),
  fc.tuple(exportName, fc.array(fc.oneof(fc.integer({ min: 0, max: 5 }), fc.integer({ min: 0, max: 0xffff })), { maxLength: 5 }))
    .map(([n, infos]) => encodeInfoRequest(n, infos)),
  fc.tuple(exportName, fc.array(fc.oneof(fc.constantFrom(BASE_ALLOCATION, 'base:', 'qemu:dirty-bitmap:x', ''), fc.string({ maxLength: 10 })), { maxLength: 4 }))
    .map(([n, q]) => encodeMetaContextRequest(n, q)),
  exportName.map((n) => Buffer.from(n)),
  bytes(48)
)

/** One option frame; the length field usually matches the data. */
const optionFrame: fc.Arbitrary<Buffer> = fc.tuple(
  optionNumber,
  optionData,
  rarely(fc.oneof(u32, fc.constantFrom(65536, 65537, 100_000)), 10),
  rarely(fc.integer({ min: 65_537, max: 70_000 }), 40)
).map(([option, data, badLength, skipped]) => {
  // Data longer than the server reads: skipped as it arrives, answered NBD_REP_ERR_TOO_BIG.
  if (skipped !== null) return withLength(encodeOption(option), skipped, Buffer.alloc(skipped, 0x41))
  const frame = encodeOption(option, data)
  if (badLength !== null) frame.writeUInt32BE(badLength >>> 0, 12)
  return frame
})

function withLength (header: Buffer, length: number, data: Buffer): Buffer {
  const h = Buffer.from(header)
  h.writeUInt32BE(length, 12)
  return Buffer.concat([h, data])
}

/** The usual opening moves, so later options meet every state of the haggler. */
const prelude = fc.array(fc.constantFrom(
  encodeOption(NBD_OPT_STRUCTURED_REPLY),
  encodeOption(NBD_OPT_LIST),
  encodeOption(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('fuzz', [BASE_ALLOCATION])),
  encodeOption(NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest('fuzz', [])),
  encodeOption(NBD_OPT_INFO, encodeInfoRequest('fuzz', [0, 1, 2, 3]))
), { maxLength: 3 })

const ending = fc.constantFrom(
  Buffer.alloc(0),
  encodeOption(NBD_OPT_GO, encodeInfoRequest('fuzz', [])),
  encodeOption(NBD_OPT_GO, encodeInfoRequest('ro', [1])),
  encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from('fuzz')),
  encodeOption(NBD_OPT_ABORT)
)

/** A client's side of the handshake: random bytes, or client flags and options, mutated. */
export const optionStream: fc.Arbitrary<Buffer> = fc.oneof(
  { arbitrary: bytes(200), weight: 1 },
  {
    arbitrary: mutated(fc.tuple(fc.oneof(fc.constantFrom(0, 1, 2, 3), u32), prelude, fc.array(optionFrame, { maxLength: 5 }), ending)
      .map(([flags, pre, opts, end]) => Buffer.concat([encodeClientFlags(flags >>> 0), ...pre, ...opts, end]))),
    weight: 6
  }
)

export interface OptionsInput {
  stream: Buffer
  pieces: number[]
  /** The server starts shutting down after this many pieces (null: never). */
  shutdownAt: number | null
  /** Option data for the parsers on their own. */
  data: Buffer
}

/**
 * Checks what the server wrote: the greeting, then option replies, each a
 * whole frame with the reply magic and a length that matches its data;
 * error replies carry a valid protocol string; an NBD_OPT_EXPORT_NAME
 * reply may only come last.
 */
function checkReplies (writes: Buffer[], negotiated: Negotiated | undefined): void {
  if (writes.length === 0 || writes[0]!.length !== NBD_HANDSHAKE_SIZE) throw violation('the server did not start with the 18-byte greeting')
  for (let i = 1; i < writes.length; i++) {
    const w = writes[i]!
    const last = i === writes.length - 1
    if (w.length >= 8 && w.readBigUInt64BE(0) === NBD_REP_MAGIC) {
      if (w.length < NBD_OPTION_REPLY_HEADER_SIZE) throw violation(`option reply ${i} is ${w.length} bytes, shorter than its header`)
      const len = w.readUInt32BE(16)
      if (len !== w.length - NBD_OPTION_REPLY_HEADER_SIZE) throw violation(`option reply ${i} claims ${len} bytes of data and has ${w.length - NBD_OPTION_REPLY_HEADER_SIZE}`)
      const type = w.readUInt32BE(12)
      if (type >= NBD_REP_FLAG_ERROR && len > 0 && decodeString(w.subarray(NBD_OPTION_REPLY_HEADER_SIZE)) === undefined) {
        throw violation(`error reply ${i} (type 0x${type.toString(16)}) carries a message that is not a valid protocol string`)
      }
      continue
    }
    if (last && negotiated !== undefined && (w.length === NBD_EXPORT_NAME_REPLY_SIZE || w.length === NBD_EXPORT_NAME_REPLY_SIZE + NBD_EXPORT_NAME_ZEROES)) continue
    throw violation(`write ${i} of the server is not an option reply: ${hex(w, 40)}`)
  }
}

/** The data parsers on their own: never throw; what parses re-encodes to the same bytes. */
function parsers (data: Buffer): void {
  parseOptionHeader(data)
  const name = parseExportName(data)
  if (!isOptionError(name) && !Buffer.from(name, 'utf8').equals(data)) throw violation('parseExportName: the name does not re-encode to the option data')
  const info = parseInfoRequest(data)
  if (isOptionError(info)) {
    if (info.error !== NBD_REP_ERR_INVALID) throw violation(`parseInfoRequest refused with 0x${info.error.toString(16)}, not NBD_REP_ERR_INVALID`)
  } else if (!encodeInfoRequest(info.name, info.requests).equals(data)) throw violation('parseInfoRequest: the request does not re-encode to the option data')
  const meta = parseMetaContextRequest(data)
  if (isOptionError(meta)) {
    if (meta.error !== NBD_REP_ERR_INVALID) throw violation(`parseMetaContextRequest refused with 0x${meta.error.toString(16)}, not NBD_REP_ERR_INVALID`)
  } else if (!encodeMetaContextRequest(meta.name, meta.queries).equals(data)) throw violation('parseMetaContextRequest: the request does not re-encode to the option data')
}

const stats: Stats = {}

export const nbdOptions: Target<OptionsInput, undefined> = {
  name: 'nbd-options',
  summary: 'NBD server handshake in-process: negotiate() (handshake.ts) over a FrameReader fed random/mutated option streams in random pieces; option data parsers of options.ts on their own',
  contract: 'crash: negotiate() rejects with anything but HardDisconnect or the reader\'s UKAI_ERR_CONNECT (client gone), or a parser throws; hang: negotiate() unsettled after the stream ended (limit 2 s); violation: a reply frame malformed (magic, length, message string), a parsed option that does not re-encode to its bytes, an error other than NBD_REP_ERR_INVALID from a parser',
  defaultCases: 200_000,
  shardSize: 100_000,
  msPerCase: 0.35,
  cpuShare: 1,
  caseTimeoutMs: 2000,
  sliceCases: 1000,
  arbitrary: fc.record({
    stream: optionStream,
    pieces: cuts,
    shutdownAt: rarely(fc.nat({ max: 8 }), 8),
    data: fc.oneof(mutated(optionData), bytes(64))
  }),
  setup: async () => undefined,
  run: async (input) => {
    parsers(input.data)
    const writes: Buffer[] = []
    const opened: string[] = []
    const reader = new FrameReader()
    let shuttingDown = false
    const p = negotiate({
      read: async (n) => await reader.read(n),
      discard: async (n) => await reader.discard(n),
      write: (b) => { writes.push(Buffer.from(b)) }
    }, { exports: fakeExports(opened), who: 'the fuzzer', shuttingDown: () => shuttingDown })
    let outcome: { ok: true, v: Negotiated | undefined } | { ok: false, err: unknown } | undefined
    const settled = p.then((v) => { outcome = { ok: true, v } }, (err: unknown) => { outcome = { ok: false, err } })
    const pieces = split(input.stream, input.pieces)
    for (let i = 0; i < pieces.length && outcome === undefined; i++) {
      if (input.shutdownAt !== null && i >= input.shutdownAt) shuttingDown = true
      reader.push(pieces[i]!)
      await tick()
    }
    reader.end()
    await settled
    const o = outcome!
    if (!o.ok) {
      const err = o.err
      if (err instanceof HardDisconnect) { count(stats, 'hard disconnect'); checkReplies(writes, undefined); return }
      if (err instanceof UkaiError && err.code === 'UKAI_ERR_CONNECT') { count(stats, 'client left mid-handshake'); checkReplies(writes, undefined); return }
      throw crash(`negotiate() rejected with ${(err as Error)?.name ?? typeof err}: ${(err as Error)?.message ?? String(err)}`, err)
    }
    checkReplies(writes, o.v)
    count(stats, o.v === undefined ? 'NBD_OPT_ABORT' : 'entered transmission')
    for (const w of writes.slice(1)) if (w.length >= 20 && w.readBigUInt64BE(0) === NBD_REP_MAGIC) count(stats, 'option replies', `0x${w.readUInt32BE(12).toString(16)}`)
    if (o.v !== undefined && !opened.includes(o.v.export.name)) throw violation(`negotiate() entered transmission on '${o.v.export.name}', which it never opened`)
  },
  teardown: async () => {},
  stats: () => stats,
  show: (i) => `stream ${hex(i.stream)}; pieces at ${JSON.stringify(i.pieces)}; shutdownAt ${String(i.shutdownAt)}; parser data ${hex(i.data, 64)}`
}
