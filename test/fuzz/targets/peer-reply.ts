/**
 * peer-reply: the peer NBD client's parsers, in-process. The transmission
 * reply parser (nbd-reply-parser.ts ReplyParser) gets random and mutated
 * simple-reply streams cut at random points, against a table of requests
 * in flight; the client handshake (nbd-handshake.ts Handshake over a
 * HandshakeQueue) gets random and mutated server greetings and option
 * replies (NBD_OPT_GO answers, errors, the NBD_OPT_EXPORT_NAME fallback).
 */
import fc from 'fast-check'
import { CODES, UkaiError } from '../../../src/errors.js'
import {
  IHAVEOPT, MAX_PAYLOAD, NBDMAGIC, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_REP_ACK,
  NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC
} from '../../../src/frontends/nbd/protocol.js'
import { Handshake, HandshakeQueue, type Negotiated } from '../../../src/peer/nbd-handshake.js'
import { ReplyParser, errorCodeForNbd } from '../../../src/peer/nbd-reply-parser.js'
import { count, crash, tick, violation, type Stats, type Target } from '../harness.js'
import { bytes, cuts, edgeU32, hex, mutated, split, u16, u32 } from '../gen.js'

// ---------------------------------------------------------------------------
// Transmission replies

interface Reply { cookie: number, read: number | null, error: number }

const replyArb: fc.Arbitrary<Reply> = fc.record({
  cookie: fc.oneof(fc.integer({ min: 1, max: 64 }), fc.constantFrom(2 ** 32, 2 ** 32 + 1, 2 ** 53 - 1)),
  read: fc.oneof({ arbitrary: fc.constant(null), weight: 1 }, { arbitrary: fc.integer({ min: 0, max: 300 }), weight: 2 }),
  error: fc.oneof({ arbitrary: fc.constant(0), weight: 4 }, { arbitrary: fc.oneof(fc.constantFrom(1, 5, 12, 22, 28, 75, 95, 108), u32), weight: 1 })
})

/** A stream of replies and the in-flight table that matches it. */
function encodeReplies (replies: Reply[]): { table: Map<number, number | null>, bytes: Buffer } {
  const table = new Map<number, number | null>()
  const parts: Buffer[] = []
  for (const r of replies) {
    if (table.has(r.cookie)) continue
    table.set(r.cookie, r.read)
    const h = Buffer.alloc(16)
    h.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0)
    h.writeUInt32BE(r.error >>> 0, 4)
    h.writeUInt32BE(Math.floor(r.cookie / 2 ** 32), 8)
    h.writeUInt32BE(r.cookie >>> 0, 12)
    parts.push(h)
    if (r.read !== null && r.error === 0) parts.push(Buffer.alloc(r.read, r.cookie & 0xff))
  }
  return { table, bytes: Buffer.concat(parts) }
}

export interface ReplyInput {
  replies: Reply[]
  /** The stream as sent: the encoded replies, mutated, or random bytes. */
  stream: { kind: 'valid' } | { kind: 'mutated', bytes: Buffer } | { kind: 'random', bytes: Buffer }
  pieces: number[]
}

/** Runs the parser; checks it never throws, an error is final and UKAI_ERR_IO, completions are for requests in flight, once. */
function parse (table: Map<number, number | null>, pieces: Buffer[]): { completed: Map<number, { error: number, data: Buffer | null }>, failed: boolean } {
  const bufs = new Map<number, Buffer>()
  const completed = new Map<number, { error: number, data: Buffer | null }>()
  const parser = new ReplyParser({
    payloadOf: (cookie) => {
      if (!table.has(cookie) || completed.has(cookie)) return undefined
      const len = table.get(cookie)!
      if (len === null) return null
      let b = bufs.get(cookie)
      if (b === undefined) bufs.set(cookie, b = Buffer.alloc(len))
      return b
    },
    complete: (cookie, error) => {
      if (!table.has(cookie)) throw violation(`complete() for cookie ${cookie}, which is not in flight`)
      if (completed.has(cookie)) throw violation(`complete() twice for cookie ${cookie}`)
      completed.set(cookie, { error, data: bufs.get(cookie) ?? null })
    }
  })
  let error: UkaiError | undefined
  for (const p of pieces) {
    let e: UkaiError | undefined
    try {
      e = parser.push(p)
    } catch (err) {
      if ((err as Error).name === 'Finding') throw err
      throw crash(`ReplyParser.push threw ${(err as Error)?.name}: ${(err as Error)?.message}`, err)
    }
    if (error !== undefined && e !== error) throw violation('ReplyParser: a protocol error was not final (a later push returned something else)')
    if (e !== undefined && !(e instanceof UkaiError && e.code === 'UKAI_ERR_IO')) throw crash(`ReplyParser.push returned ${String(e)}, not a UKAI_ERR_IO`)
    error = e
  }
  return { completed, failed: error !== undefined }
}

function replies (input: ReplyInput): void {
  const { table, bytes: valid } = encodeReplies(input.replies)
  const s = input.stream
  const b = s.kind === 'valid' ? valid : s.bytes
  const { completed, failed } = parse(table, split(b, input.pieces))
  count(stats, 'reply streams', failed ? 'protocol error' : 'parsed')
  for (const c of completed.values()) count(stats, 'replies completed', c.error === 0 ? 'ok' : 'error')
  if (s.kind !== 'valid') return
  // Well-formed replies parse the same however they are cut.
  if (failed) throw violation('ReplyParser refused a well-formed stream of replies')
  if (completed.size !== table.size) throw violation(`ReplyParser completed ${completed.size} of ${table.size} well-formed replies`)
  const seen = new Set<number>()
  for (const r of input.replies) {
    if (seen.has(r.cookie)) continue // only the first reply per cookie was encoded
    seen.add(r.cookie)
    const c = completed.get(r.cookie)!
    if (c.error !== (r.error >>> 0)) throw violation(`the reply to cookie ${r.cookie} completed with error ${c.error}, sent ${r.error}`)
    if (r.read !== null && r.error === 0 && !c.data!.equals(Buffer.alloc(r.read, r.cookie & 0xff))) {
      throw violation(`the READ reply to cookie ${r.cookie} was not delivered intact`)
    }
  }
}

// ---------------------------------------------------------------------------
// The client's handshake

export const optReply = (option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer => {
  const h = Buffer.alloc(20)
  h.writeBigUInt64BE(NBD_REP_MAGIC, 0)
  h.writeUInt32BE(option >>> 0, 8)
  h.writeUInt32BE(type >>> 0, 12)
  h.writeUInt32BE(data.length, 16)
  return Buffer.concat([h, data])
}

const u64 = fc.oneof(
  fc.bigInt({ min: 0n, max: 2n ** 40n }),
  fc.constantFrom(0n, 1n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n)
)

const info = fc.oneof(
  fc.tuple(u64, u16).map(([size, flags]) => {
    const b = Buffer.alloc(12)
    b.writeUInt16BE(NBD_INFO_EXPORT, 0)
    b.writeBigUInt64BE(size, 2)
    b.writeUInt16BE(flags, 10)
    return optReply(NBD_OPT_GO, NBD_REP_INFO, b)
  }),
  fc.tuple(
    fc.oneof(fc.constantFrom(1, 512, 4096, 65536), edgeU32),
    fc.oneof(fc.constantFrom(4096, 65536), edgeU32),
    fc.oneof(fc.constantFrom(MAX_PAYLOAD, 65536, 4096, 1), edgeU32)
  ).map(([min, pref, max]) => {
    const b = Buffer.alloc(14)
    b.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0)
    b.writeUInt32BE(min >>> 0, 2)
    b.writeUInt32BE(pref >>> 0, 6)
    b.writeUInt32BE(max >>> 0, 10)
    return optReply(NBD_OPT_GO, NBD_REP_INFO, b)
  }),
  fc.string({ maxLength: 8 }).map((n) => optReply(NBD_OPT_GO, NBD_REP_INFO, Buffer.concat([Buffer.from([0, NBD_INFO_NAME]), Buffer.from(n)]))),
  fc.tuple(u16, bytes(16)).map(([t, d]) => optReply(NBD_OPT_GO, NBD_REP_INFO, Buffer.concat([Buffer.from([t >> 8, t & 0xff]), d])))
)

const goAnswer: fc.Arbitrary<Buffer> = fc.oneof(
  { arbitrary: fc.tuple(fc.array(info, { maxLength: 4 }), fc.boolean()).map(([infos, ack]) => Buffer.concat([...infos, ack ? optReply(NBD_OPT_GO, NBD_REP_ACK) : Buffer.alloc(0)])), weight: 5 },
  { arbitrary: fc.tuple(fc.constantFrom(NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_POLICY, NBD_REP_ERR_INVALID, 2 ** 31 + 99), fc.string({ maxLength: 20 })).map(([t, m]) => optReply(NBD_OPT_GO, t, Buffer.from(m))), weight: 1 },
  // GO unsupported: the client falls back to NBD_OPT_EXPORT_NAME.
  { arbitrary: fc.tuple(u64, u16, fc.boolean()).map(([size, flags, zeroes]) => { const r = Buffer.alloc(zeroes ? 134 : 10); r.writeBigUInt64BE(size, 0); r.writeUInt16BE(flags, 8); return Buffer.concat([optReply(NBD_OPT_GO, NBD_REP_ERR_UNSUP), r]) }), weight: 2 },
  { arbitrary: fc.tuple(u32, u32, bytes(20)).map(([o, t, d]) => optReply(o, t, d)), weight: 1 }
)

export const greeting = (flags: number, second: bigint = IHAVEOPT): Buffer => {
  const b = Buffer.alloc(18)
  b.writeBigUInt64BE(NBDMAGIC, 0)
  b.writeBigUInt64BE(second, 8)
  b.writeUInt16BE(flags, 16)
  return b
}

/** A server's side of the handshake: random bytes, or greetings and answers to NBD_OPT_GO, mutated. */
export const serverStream: fc.Arbitrary<Buffer> = fc.oneof(
  { arbitrary: bytes(120), weight: 1 },
  {
    arbitrary: mutated(fc.oneof(
      fc.tuple(fc.oneof(fc.constantFrom(1, 3), u16), goAnswer).map(([f, a]) => Buffer.concat([greeting(f), a])),
      // Not fixed newstyle: the export-name reply straight away.
      fc.tuple(fc.constantFrom(0, 2), u64, u16).map(([f, size, flags]) => { const r = Buffer.alloc(f === 2 ? 10 : 134); r.writeBigUInt64BE(size, 0); r.writeUInt16BE(flags, 8); return Buffer.concat([greeting(f), r]) }),
      fc.constant(greeting(0, 0x00420281861253n))
    )),
    weight: 6
  }
)

export interface HandshakeInput { stream: Buffer, pieces: number[], name: string }

const isPow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0

const stats: Stats = {}

export async function handshake (input: HandshakeInput): Promise<void> {
  const queue = new HandshakeQueue()
  const sent: Buffer[] = []
  const socket = { write: (b: Buffer) => { sent.push(Buffer.from(b)); return true } }
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  const h = new Handshake(socket as any, queue, input.name)
  let outcome: { ok: true, n: Negotiated } | { ok: false, err: unknown } | undefined
  const done = h.run().then((n) => { outcome = { ok: true, n } }, (err: unknown) => { outcome = { ok: false, err } })
  for (const p of split(input.stream, input.pieces)) {
    if (outcome !== undefined) break
    queue.push(p)
    await tick()
  }
  queue.end(new UkaiError('UKAI_ERR_CONNECT', 'the fuzzer closed the connection'))
  await done
  const o = outcome!
  // What the client sent: client flags only as offered, then well-formed options.
  if (input.stream.length >= 18 && input.stream.readBigUInt64BE(0) === NBDMAGIC && input.stream.readBigUInt64BE(8) === IHAVEOPT && sent.length > 0) {
    const offered = input.stream.readUInt16BE(16)
    const cf = sent[0]!.length === 4 ? sent[0]!.readUInt32BE(0) : -1
    const allowed = ((offered & NBD_FLAG_FIXED_NEWSTYLE) !== 0 ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | ((offered & NBD_FLAG_NO_ZEROES) !== 0 ? NBD_FLAG_C_NO_ZEROES : 0)
    if (cf < 0 || (cf & ~allowed) !== 0) throw violation(`client flags ${cf} for server flags ${offered}: a flag the server did not offer`)
    for (const w of sent.slice(1)) {
      if (w.length < 16 || w.readBigUInt64BE(0) !== IHAVEOPT || w.readUInt32BE(12) !== w.length - 16) throw violation(`the client sent a malformed option: ${hex(w, 40)}`)
      const opt = w.readUInt32BE(8)
      if ((offered & NBD_FLAG_FIXED_NEWSTYLE) === 0 && opt !== NBD_OPT_EXPORT_NAME) throw violation(`option ${opt} sent to a server that is not fixed newstyle`)
    }
  }
  if (!o.ok) {
    const e = o.err
    if (e instanceof UkaiError && ['UKAI_ERR_CONNECT', 'UKAI_ERR_NOT_FOUND', 'UKAI_ERR_IO'].includes(e.code)) { count(stats, 'handshakes refused', e.code); return }
    throw crash(`Handshake.run rejected with ${(e as Error)?.name}: ${(e as Error)?.message}`, e)
  }
  const n = o.n
  count(stats, 'handshakes negotiated')
  if (!Number.isSafeInteger(n.size) || n.size < 0) throw violation(`negotiated export size ${n.size}`)
  if (!isPow2(n.minBlockSize) || n.minBlockSize > 65536) throw violation(`negotiated minimum block size ${n.minBlockSize}`)
  if (!Number.isSafeInteger(n.maxPayload) || n.maxPayload < n.minBlockSize || n.maxPayload > MAX_PAYLOAD || n.maxPayload % n.minBlockSize !== 0) {
    throw violation(`negotiated maximum payload ${n.maxPayload} with minimum block size ${n.minBlockSize}`)
  }
}

// ---------------------------------------------------------------------------

export interface PeerReplyInput { reply: ReplyInput, handshake: HandshakeInput, errorValue: number }

const replyInput: fc.Arbitrary<ReplyInput> = fc.array(replyArb, { maxLength: 12 }).chain((rs) => fc.record({
  replies: fc.constant(rs),
  stream: fc.oneof(
    { arbitrary: fc.constant({ kind: 'valid' as const }), weight: 2 },
    { arbitrary: mutated(fc.constant(encodeReplies(rs).bytes)).map((b) => ({ kind: 'mutated' as const, bytes: b })), weight: 4 },
    { arbitrary: fc.oneof(bytes(200), fc.constant(Buffer.from([0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1]))).map((b) => ({ kind: 'random' as const, bytes: b })), weight: 1 }
  ),
  pieces: fc.array(fc.nat({ max: 2000 }), { maxLength: 12 })
}))

export const peerReply: Target<PeerReplyInput, undefined> = {
  name: 'peer-reply',
  summary: 'the peer client\'s parsers in-process: ReplyParser (nbd-reply-parser.ts) on random/mutated/cut reply streams; Handshake (nbd-handshake.ts) on random/mutated server greetings and option replies',
  contract: 'crash: ReplyParser.push throws or returns anything but a UkaiError UKAI_ERR_IO, Handshake.run rejects with anything but a UkaiError UKAI_ERR_CONNECT / NOT_FOUND / IO; hang: Handshake.run unsettled after the stream ended (limit 2 s); violation: a well-formed stream cut anywhere not parsed the same, a completion twice or for a cookie not in flight, a protocol error that is not final, client flags the server did not offer, negotiated limits outside the spec (size > 2^53, minimum not a power of 2 <= 64 KiB, maximum payload not a multiple of it or above 32 MiB)',
  defaultCases: 200_000,
  shardSize: 100_000,
  msPerCase: 0.15,
  cpuShare: 1,
  caseTimeoutMs: 2000,
  sliceCases: 1000,
  arbitrary: fc.record({
    reply: replyInput,
    handshake: fc.record({ stream: serverStream, pieces: cuts, name: fc.oneof(fc.constantFrom('replica/vm1', ''), fc.string({ maxLength: 6 })) }),
    errorValue: u32
  }),
  setup: async () => undefined,
  run: async (input) => {
    const code = errorCodeForNbd(input.errorValue)
    if (!(code in CODES)) throw violation(`errorCodeForNbd(${input.errorValue}) is ${code}, not a code of the error table`)
    replies(input.reply)
    await handshake(input.handshake)
  },
  teardown: async () => {},
  stats: () => stats,
  show: (i) => {
    const r = i.reply
    const s = r.stream.kind === 'valid' ? '(the replies as encoded)' : hex(r.stream.bytes, 200)
    return `replies ${JSON.stringify(r.replies)}; reply stream ${r.stream.kind} ${s}; pieces ${JSON.stringify(r.pieces)}; server handshake ${hex(i.handshake.stream, 200)} in pieces at ${JSON.stringify(i.handshake.pieces)}, export ${JSON.stringify(i.handshake.name)}; error value ${i.errorValue}`
  }
}

