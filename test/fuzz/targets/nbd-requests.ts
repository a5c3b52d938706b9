/**
 * nbd-requests: the NBD server's transmission phase, in-process. Random
 * and mutated request streams, in random pieces, go through the real
 * Transmission (transmission.ts: parseRequest, validateRequest, dispatch,
 * flow control, replies) on a fake socket, with an in-memory backend that
 * can fail every call or answer late. Every reply is parsed and checked
 * against a model built from docs/NBD.md ("Validation and error values"):
 * one final reply per request received in full, with the documented error
 * value, cookie echoed, READ data and BLOCK_STATUS descriptors well
 * formed. parseRequest and validateRequest are also checked on their own.
 */
import fc from 'fast-check'
import { CODES, UkaiError, type ErrorCode } from '../../../src/errors.js'
import type { NbdBackend } from '../../../src/frontends/nbd/exports.js'
import { FrameReader } from '../../../src/frontends/nbd/frame-reader.js'
import { transmissionFlags, type Negotiated } from '../../../src/frontends/nbd/handshake.js'
import { decodeString } from '../../../src/frontends/nbd/options.js'
import {
  MAX_PAYLOAD, NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE, NBD_SIMPLE_REPLY_MAGIC, NBD_STATE_HOLE, NBD_STATE_ZERO, NBD_STRUCTURED_REPLY_MAGIC
} from '../../../src/frontends/nbd/protocol.js'
import { encodeRequest, parseRequest, validateRequest, type NbdRequest, type SessionState } from '../../../src/frontends/nbd/requests.js'
import { Transmission } from '../../../src/frontends/nbd/transmission.js'
import { count, crash, tick, violation, within, type Stats, type Target } from '../harness.js'
import { bytes, cuts, hex, mutated, rarely, split, u32 } from '../gen.js'

// ---------------------------------------------------------------------------
// The model of docs/NBD.md's validation table

interface Session { size: number, structured: boolean, readOnly: boolean, meta: boolean }

/** The error values the table allows for a request (empty: it must run). */
export function allowedErrors (r: NbdRequest, s: Session): number[] {
  const end = BigInt(r.offset) + BigInt(r.length)
  const past = end > BigInt(s.size)
  const known = [NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES, NBD_CMD_BLOCK_STATUS]
  if (!known.includes(r.type)) return [NBD_EINVAL]
  // TRIM and WRITE_ZEROES are not advertised on a read-only export: the
  // table's first row says NBD_EINVAL, its third NBD_EPERM; either is fine.
  if (s.readOnly && (r.type === NBD_CMD_TRIM || r.type === NBD_CMD_WRITE_ZEROES)) return [NBD_EPERM, NBD_EINVAL]
  let allowed = NBD_CMD_FLAG_FUA
  if (r.type === NBD_CMD_READ && s.structured) allowed |= NBD_CMD_FLAG_DF
  if (r.type === NBD_CMD_WRITE_ZEROES) allowed |= NBD_CMD_FLAG_NO_HOLE | (s.readOnly ? 0 : NBD_CMD_FLAG_FAST_ZERO)
  if (r.type === NBD_CMD_BLOCK_STATUS) allowed |= NBD_CMD_FLAG_REQ_ONE
  if ((r.flags & ~allowed) !== 0) return [NBD_EINVAL]
  switch (r.type) {
    case NBD_CMD_READ:
      if (r.length > MAX_PAYLOAD) return [s.structured ? NBD_EOVERFLOW : NBD_EINVAL]
      return past ? [NBD_EINVAL] : []
    case NBD_CMD_WRITE:
      if (s.readOnly) return [NBD_EPERM]
      if (r.length > MAX_PAYLOAD) return [NBD_EINVAL]
      return past ? [NBD_ENOSPC] : []
    case NBD_CMD_FLUSH: return r.offset !== 0 || r.length !== 0 ? [NBD_EINVAL] : []
    case NBD_CMD_TRIM: return past ? [NBD_EINVAL] : []
    case NBD_CMD_WRITE_ZEROES: return past ? [NBD_ENOSPC] : []
    default: // BLOCK_STATUS
      if (!s.meta || r.length === 0) return [NBD_EINVAL]
      return past ? [NBD_EINVAL] : []
  }
}

const sessionState = (s: Session): SessionState => ({
  size: s.size, flags: transmissionFlags(s.readOnly, s.structured), structured: s.structured, allocationContext: s.meta ? 1 : undefined
})

// ---------------------------------------------------------------------------
// Inputs

const SIZES = [0, 1, 512, 4096, 65536, 1 << 20, (1 << 20) + 1, 2 ** 40]

const sessionArb: fc.Arbitrary<Session> = fc.record({
  size: fc.oneof({ arbitrary: fc.constantFrom(...SIZES.slice(0, 7)), weight: 9 }, { arbitrary: fc.constant(SIZES[7]!), weight: 1 }),
  structured: fc.boolean(),
  readOnly: fc.oneof({ arbitrary: fc.constant(false), weight: 3 }, { arbitrary: fc.constant(true), weight: 1 }),
  meta: fc.boolean()
  // base:allocation can only be selected after structured replies (handshake.ts).
}).map((s) => ({ ...s, meta: s.meta && s.structured }))

const requestFields = (size: number) => fc.record({
  type: fc.oneof({ arbitrary: fc.integer({ min: 0, max: 8 }), weight: 8 }, { arbitrary: fc.integer({ min: 0, max: 0xffff }), weight: 1 }),
  flags: fc.oneof({ arbitrary: fc.constant(0), weight: 4 }, { arbitrary: fc.integer({ min: 0, max: 31 }), weight: 3 }, { arbitrary: fc.integer({ min: 0, max: 0xffff }), weight: 1 }),
  cookieHi: u32,
  offset: fc.oneof(
    { arbitrary: fc.integer({ min: 0, max: Math.min(size, 2 ** 31) }), weight: 4 },
    { arbitrary: fc.integer({ min: 0, max: 4096 }).map((k) => Math.max(0, size - k)), weight: 2 },
    { arbitrary: fc.constantFrom(0, size, size + 1, 2 ** 32, 2 ** 53 - 1), weight: 1 }
  ),
  length: fc.oneof(
    { arbitrary: fc.integer({ min: 0, max: 4096 }), weight: 6 },
    { arbitrary: fc.constantFrom(0, 1, Math.min(size, 0xffffffff), MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xffffffff), weight: 1 }
  ),
  payload: rarely(fc.integer({ min: 0, max: 5000 }), 5)
})

type Fields = ReturnType<typeof requestFields> extends fc.Arbitrary<infer F> ? F : never

/** A request frame; cookies count up, so replies can be matched (until a mutation says otherwise). */
function frame (r: Fields, i: number): Buffer {
  const header = encodeRequest({ ...r, cookieLo: i })
  if (r.type !== NBD_CMD_WRITE) return header
  const n = r.payload ?? Math.min(r.length, 16384)
  return Buffer.concat([header, Buffer.alloc(n, 0x5a)])
}

/** Request frames (random, or well-formed and mutated) for an export of `size` bytes. */
export const requestStream = (size: number): fc.Arbitrary<Buffer> => fc.oneof(
  { arbitrary: bytes(300), weight: 1 },
  {
    arbitrary: mutated(fc.array(requestFields(size), { minLength: 1, maxLength: 12 }).map((rs) => Buffer.concat(rs.map((r, i) => frame(r, i + 1))))),
    weight: 8
  }
)

type Fault = 'none' | 'late' | ErrorCode

export interface RequestsInput {
  session: Session
  stream: Buffer
  pieces: number[]
  fault: Fault
  zeroFast: boolean
  /** The server starts closing after this many pieces (null: never). */
  shutdownAt: number | null
  /** Lengths of the extents the backend reports, in its block size units (0: an empty extent). */
  extents: number[]
  /** A header for parseRequest / validateRequest on their own. */
  header: Buffer
  /** A byte budget (budget.ts) small enough that requests wait for room. */
  tightBudget: boolean
  /** How the client leaves: half-closes (end: every request received is answered) or is gone (gone(), when the transmission has it). */
  leave: 'end' | 'gone'
}

const FAULTS: ErrorCode[] = ['UKAI_ERR_IO', 'UKAI_ERR_NO_SPACE', 'UKAI_ERR_UNAVAILABLE', 'UKAI_ERR_READ_ONLY', 'UKAI_ERR_SHUTDOWN', 'UKAI_ERR_TIMEOUT', 'UKAI_ERR_FENCED', 'UKAI_ERR_OUT_OF_RANGE']

const inputArb: fc.Arbitrary<RequestsInput> = sessionArb.chain((session) => fc.record({
  session: fc.constant(session),
  stream: requestStream(session.size),
  pieces: cuts,
  fault: fc.oneof({ arbitrary: fc.constant('none' as Fault), weight: 6 }, { arbitrary: fc.constant('late' as Fault), weight: 2 }, { arbitrary: fc.constantFrom(...FAULTS), weight: 2 }),
  zeroFast: fc.boolean(),
  shutdownAt: rarely(fc.nat({ max: 6 }), 10),
  extents: fc.array(fc.integer({ min: 0, max: 3 }), { minLength: 1, maxLength: 5 }),
  header: fc.oneof(mutated(requestFields(session.size).map((r) => frame(r, 7).subarray(0, NBD_REQUEST_SIZE))), bytes(NBD_REQUEST_SIZE)),
  tightBudget: fc.boolean(),
  leave: fc.oneof({ arbitrary: fc.constant('end' as const), weight: 4 }, { arbitrary: fc.constant('gone' as const), weight: 1 })
}))

// ---------------------------------------------------------------------------
// Fakes

const BLOCK = 65536
const scratch = Buffer.alloc(64)

class FakeSocket {
  destroyed = false
  writable = true
  writableLength = 0
  readonly writes: Buffer[] = []
  ended = false
  write (b: Buffer): boolean {
    if (this.destroyed || this.ended) throw violation('a reply was written to a socket already ended or destroyed')
    this.writes.push(b)
    return true
  }

  cork (): void {}
  uncork (): void {}
  pause (): void {}
  resume (): void {}
  end (): void { this.ended = true; this.writable = false }
  destroy (): void { this.destroyed = true; this.writable = false }
}

function backend (input: RequestsInput, outOfRange: string[]): NbdBackend {
  const size = input.session.size
  const check = (what: string, offset: number, length: number): void => {
    if (!(offset >= 0 && length >= 0 && offset + length <= size)) outOfRange.push(`${what}(${offset}, ${length}) on an export of ${size} bytes`)
  }
  const act = async (): Promise<void> => {
    if (input.fault === 'late') { await tick(); return }
    if (input.fault !== 'none') throw new UkaiError(input.fault, 'injected by the fuzzer')
  }
  return {
    blockSize: BLOCK,
    read: async (offset, buf) => { check('read', offset, buf.length); await act(); buf.fill(scratch[0]!); return buf.length },
    write: async (offset, data) => { check('write', offset, data.length); await act() },
    flush: async () => { await act() },
    trim: async (offset, length) => { check('trim', offset, length); await act() },
    zero: async (offset, length) => { check('zero', offset, length); await act() },
    extents: async (offset, length) => {
      check('extents', offset, length)
      await act()
      const out = []
      let at = offset
      for (const [i, k] of input.extents.entries()) {
        const len = i === input.extents.length - 1 ? offset + length - at : Math.min(k * BLOCK, offset + length - at)
        out.push({ offset: at, length: len, hole: (k & 1) === 1, zero: k >= 2 })
        at += len
      }
      return out
    },
    zeroIsFast: async (offset, length) => { check('zeroIsFast', offset, length); await act(); return input.zeroFast }
  }
}

// ---------------------------------------------------------------------------
// The model of the stream, and the replies

interface Expected { req: NbdRequest, errors: number[] }

/** Requests the server must answer: headers in full (and a valid WRITE's payload), up to a bad magic or NBD_CMD_DISC. */
function modelStream (b: Buffer, s: Session): { requests: Expected[], hard: boolean } {
  const requests: Expected[] = []
  let pos = 0
  while (pos + NBD_REQUEST_SIZE <= b.length) {
    const req = parseModel(b.subarray(pos, pos + NBD_REQUEST_SIZE))
    if (req === undefined) return { requests, hard: true }
    if (req.type === NBD_CMD_DISC) break
    const errors = allowedErrors(req, s)
    const payload = req.type === NBD_CMD_WRITE ? req.length : 0
    // A refused WRITE is answered at once, its payload drained as it comes.
    if (errors.length === 0 && pos + NBD_REQUEST_SIZE + payload > b.length) break
    requests.push({ req, errors })
    pos += NBD_REQUEST_SIZE + payload
  }
  return { requests, hard: false }
}

function parseModel (h: Buffer): NbdRequest | undefined {
  if (h.readUInt32BE(0) !== NBD_REQUEST_MAGIC) return undefined
  return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookieHi: h.readUInt32BE(8), cookieLo: h.readUInt32BE(12), offset: Number(h.readBigUInt64BE(16)), length: h.readUInt32BE(24) }
}

const key = (hi: number, lo: number): string => `${hi}:${lo}`

function checkReplies (out: Buffer, m: { requests: Expected[], hard: boolean }, input: RequestsInput, complete: boolean): void {
  const s = input.session
  const byCookie = new Map<string, Expected>()
  for (const e of m.requests) {
    const k = key(e.req.cookieHi, e.req.cookieLo)
    // Two requests with one cookie: replies cannot be told apart; check framing only where unambiguous.
    if (byCookie.has(k)) return
    byCookie.set(k, e)
  }
  const answered = new Set<string>()
  let pos = 0
  while (pos < out.length) {
    if (out.length - pos < 16) throw violation(`${out.length - pos} stray bytes after the last reply`)
    const magic = out.readUInt32BE(pos)
    const k = key(out.readUInt32BE(pos + 8), out.readUInt32BE(pos + 12))
    const e = byCookie.get(k)
    if (e === undefined) throw violation(`a reply with cookie ${k}, which no request received in full carried`)
    if (answered.has(k)) throw violation(`a second reply to cookie ${k} after its final one`)
    const r = e.req
    let error: number
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      error = out.readUInt32BE(pos + 4)
      pos += 16
      if (r.type === NBD_CMD_READ && error === 0) {
        if (s.structured) throw violation(`a simple reply to a READ (cookie ${k}) with structured replies negotiated`)
        pos += r.length
        if (pos > out.length) throw violation(`the READ reply to cookie ${k} is cut short`)
      }
      if (s.structured && error !== 0) throw violation(`a simple error reply (cookie ${k}) with structured replies negotiated`)
      if (r.type === NBD_CMD_BLOCK_STATUS && error === 0) throw violation(`a simple reply to BLOCK_STATUS (cookie ${k})`)
    } else if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
      if (!s.structured) throw violation(`a structured reply (cookie ${k}) without structured replies negotiated`)
      if (out.length - pos < 20) throw violation('a structured reply header cut short')
      const flags = out.readUInt16BE(pos + 4)
      const type = out.readUInt16BE(pos + 6)
      const len = out.readUInt32BE(pos + 16)
      const payload = out.subarray(pos + 20, pos + 20 + len)
      pos += 20 + len
      if (payload.length !== len) throw violation(`a structured reply (cookie ${k}) cut short`)
      if ((flags & NBD_REPLY_FLAG_DONE) === 0) throw violation(`a structured chunk without NBD_REPLY_FLAG_DONE (cookie ${k}); the server sends one chunk per reply`)
      if (type === NBD_REPLY_TYPE_ERROR) {
        if (len < 6) throw violation('an error chunk shorter than 6 bytes')
        error = payload.readUInt32BE(0)
        const msgLen = payload.readUInt16BE(4)
        if (msgLen !== len - 6) throw violation(`an error chunk with message length ${msgLen} in ${len - 6} bytes`)
        if (error === 0) throw violation('an error chunk with error 0')
        if (msgLen > 0 && decodeString(payload.subarray(6)) === undefined) throw violation('an error chunk whose message is not a valid protocol string')
      } else {
        error = 0
        if (r.type === NBD_CMD_READ) {
          if (r.length === 0 ? type !== NBD_REPLY_TYPE_NONE || len !== 0 : type !== NBD_REPLY_TYPE_OFFSET_DATA || len !== 8 + r.length) {
            throw violation(`READ of ${r.length} (cookie ${k}) answered with chunk type ${type} of ${len} bytes`)
          }
          if (r.length > 0 && Number(payload.readBigUInt64BE(0)) !== r.offset) throw violation(`READ at ${r.offset} answered with data at ${payload.readBigUInt64BE(0)}`)
        } else if (r.type === NBD_CMD_BLOCK_STATUS) {
          if (type !== NBD_REPLY_TYPE_BLOCK_STATUS || len < 12 || (len - 4) % 8 !== 0) throw violation(`BLOCK_STATUS answered with chunk type ${type} of ${len} bytes`)
          if (payload.readUInt32BE(0) !== 1) throw violation(`BLOCK_STATUS reply with context id ${payload.readUInt32BE(0)}, not the one selected (1)`)
          const n = (len - 4) / 8
          if ((r.flags & NBD_CMD_FLAG_REQ_ONE) !== 0 && n !== 1) throw violation(`BLOCK_STATUS with REQ_ONE answered with ${n} descriptors`)
          let total = 0
          for (let i = 0; i < n; i++) {
            const dl = payload.readUInt32BE(4 + 8 * i)
            const df = payload.readUInt32BE(8 + 8 * i)
            if (dl === 0) throw violation('a block status descriptor of length 0')
            if ((df & ~(NBD_STATE_HOLE | NBD_STATE_ZERO)) !== 0) throw violation(`block status flags 0x${df.toString(16)}`)
            total += dl
          }
          if (total > r.length) throw violation(`BLOCK_STATUS of ${r.length} bytes answered for ${total}`)
        } else {
          throw violation(`a structured chunk of type ${type} to ${r.type}`)
        }
      }
    } else {
      throw violation(`a reply with magic 0x${magic.toString(16)} at byte ${pos} of the output`)
    }
    answered.add(k)
    checkError(e, error, input, k)
    count(stats, 'replies by error value', String(error))
  }
  if (complete && !m.hard) {
    for (const e of m.requests) {
      const k = key(e.req.cookieHi, e.req.cookieLo)
      if (!answered.has(k)) throw violation(`request type ${e.req.type} (cookie ${k}, ${e.req.length} bytes at ${e.req.offset}) was received in full and never answered`)
    }
  }
}

function checkError (e: Expected, error: number, input: RequestsInput, k: string): void {
  const r = e.req
  if (e.errors.length > 0) {
    if (!e.errors.includes(error)) throw violation(`type ${r.type} flags 0x${r.flags.toString(16)} ${r.length} bytes at ${r.offset} (cookie ${k}): error ${error}, the table says ${e.errors.join(' or ')}`)
    return
  }
  // A valid request: the backend's answer, FAST_ZERO's refusal, or success.
  const fault = input.fault
  const fastZero = r.type === NBD_CMD_WRITE_ZEROES && (r.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0
  // Nothing to do for a zero-length READ, WRITE, TRIM or WRITE_ZEROES: the server may answer without asking the backend.
  const backendSkipped = r.length === 0 && r.type !== NBD_CMD_FLUSH && r.type !== NBD_CMD_BLOCK_STATUS
  let want: number[]
  if (fault !== 'none' && fault !== 'late') want = backendSkipped ? [CODES[fault].nbd, 0] : [CODES[fault].nbd]
  else if (fastZero && ((r.flags & NBD_CMD_FLAG_NO_HOLE) !== 0 || !input.zeroFast)) want = [NBD_ENOTSUP]
  else want = [0]
  // FAST_ZERO with NO_HOLE is refused before the backend is asked.
  if (fastZero && (r.flags & NBD_CMD_FLAG_NO_HOLE) !== 0) want.push(NBD_ENOTSUP)
  if (!want.includes(error)) throw violation(`valid request type ${r.type} flags 0x${r.flags.toString(16)} ${r.length} bytes at ${r.offset} (cookie ${k}): error ${error}, expected ${want.join(' or ')}`)
}

/** parseRequest and validateRequest alone: no throw; the validator agrees with the table. */
function single (h: Buffer, s: Session): void {
  const req = parseRequest(h)
  const model = h.length >= NBD_REQUEST_SIZE ? parseModel(h) : undefined
  if ((req === undefined) !== (model === undefined)) throw violation(`parseRequest ${req === undefined ? 'refused' : 'accepted'} ${hex(h, 28)}`)
  if (req === undefined || model === undefined) return
  if (req.offset < 2 ** 53 && !encodeRequest(req).equals(h.subarray(0, NBD_REQUEST_SIZE))) throw violation('parseRequest: the request does not re-encode to its header')
  if (req.type === NBD_CMD_DISC) return
  const bad = validateRequest(req, sessionState(s))
  const allowed = allowedErrors(model, s)
  if (bad === undefined ? allowed.length > 0 : !allowed.includes(bad.error)) {
    throw violation(`validateRequest(type ${req.type}, flags 0x${req.flags.toString(16)}, ${req.length} bytes at ${req.offset}; size ${s.size}${s.readOnly ? ', read-only' : ''}${s.structured ? ', structured' : ''}${s.meta ? ', base:allocation' : ''}) gave ${bad === undefined ? 'no error' : bad.error}, the table says ${allowed.length === 0 ? 'none' : allowed.join(' or ')}`)
  }
}

// ---------------------------------------------------------------------------
// Transmission's constructor takes a warn function, or (with the process-wide
// byte budget of budget.ts) a context with the budget, this connection's
// ledger, `account` and `warn`. One object serves both: a function that
// warns, carrying the context's fields.

interface BudgetLike { adjust: (delta: number) => void }
interface TransmissionLike { pump: () => void, end: () => void, gone?: () => void, shutdown: () => void, readonly reading: boolean, readonly done: Promise<void>, readonly reserved?: number }

let budgetModule: Promise<{ BufferBudget: new (o?: { limit?: number, reserve?: number }) => BudgetLike } | undefined> | undefined
const BUDGET_PATH = '../../../src/frontends/nbd/budget.js'

async function makeTransmission (sock: FakeSocket, reader: FrameReader, negotiated: Negotiated, warn: (m: string) => void, tight: boolean): Promise<TransmissionLike> {
  budgetModule ??= import(BUDGET_PATH).catch(() => undefined)
  const mod = await budgetModule
  const ledger = { accounted: 0 }
  const budget = mod === undefined ? undefined : new mod.BufferBudget(tight ? { limit: 64 * 1024, reserve: 4096 } : {})
  let t: TransmissionLike | undefined
  const account = (): void => {
    const held = reader.length + sock.writableLength + (t?.reserved ?? 0)
    budget?.adjust(held - ledger.accounted)
    ledger.accounted = held
  }
  const ctx = Object.assign((m: string) => warn(m), { warn, budget, ledger, account })
  const T = Transmission as unknown as new (...args: unknown[]) => TransmissionLike
  t = new T(sock, reader, negotiated, ctx)
  return t
}

const stats: Stats = {}

export const nbdRequests: Target<RequestsInput, undefined> = {
  name: 'nbd-requests',
  summary: 'NBD transmission in-process: the real Transmission (transmission.ts, requests.ts) on a fake socket and an in-memory backend (failing or late on demand), random/mutated request streams in random pieces; parseRequest/validateRequest on their own',
  contract: 'crash: pump()/end() throws, the connection reports an internal error (warn), or the backend is reached with a range the validator should have refused; hang: `done` unsettled after the client ended (limit 5 s); violation: a reply not framed as docs/NBD.md says, an unknown or repeated cookie, an error value other than the validation table gives, a request received in full and never answered, parseRequest not round-tripping',
  defaultCases: 200_000,
  shardSize: 100_000,
  msPerCase: 0.2,
  cpuShare: 1,
  caseTimeoutMs: 5000,
  sliceCases: 1000,
  arbitrary: inputArb,
  setup: async () => undefined,
  run: async (input) => {
    single(input.header, input.session)
    const s = input.session
    const sock = new FakeSocket()
    const reader = new FrameReader()
    const outOfRange: string[] = []
    const warnings: string[] = []
    const negotiated: Negotiated = {
      export: { name: 'fuzz', size: s.size, readOnly: s.readOnly, backend: backend(input, outOfRange), close: async () => {} },
      flags: transmissionFlags(s.readOnly, s.structured),
      structured: s.structured,
      allocationContext: s.meta ? 1 : undefined
    }
    const t = await makeTransmission(sock, reader, negotiated, (m) => warnings.push(m), input.tightBudget)
    const guard = (what: string, fn: () => void): void => {
      try { fn() } catch (err) { throw crash(`${what} threw ${(err as Error)?.name}: ${(err as Error)?.message}`, err) }
    }
    const pieces = split(input.stream, input.pieces)
    let shut = false
    for (let i = 0; i < pieces.length; i++) {
      if (input.shutdownAt !== null && i >= input.shutdownAt && !shut) { shut = true; guard('shutdown()', () => t.shutdown()) }
      if (!t.reading) break
      reader.push(pieces[i]!)
      guard('pump()', () => t.pump())
      if (i % 2 === 1) await tick()
    }
    reader.end()
    const gone = input.leave === 'gone' && t.gone !== undefined
    if (gone) guard('gone()', () => t.gone!())
    else guard('end()', () => t.end())
    await within(t.done, 4000, 'Transmission.done after the client ended')
    // Let replies of requests that finish after `done` (none should) show up.
    await tick()
    if (warnings.length > 0) throw crash(`the connection reported an internal error: ${warnings[0]!.split('\n')[0]}`)
    if (outOfRange.length > 0) throw crash(`the backend was called outside the export: ${outOfRange[0]}`)
    const m = modelStream(input.stream, s)
    checkReplies(Buffer.concat(sock.writes), m, input, !shut && !gone && !sock.destroyed)
    if (m.hard) count(stats, 'hard disconnects')
    if (m.hard && !shut && !sock.destroyed) throw violation('a frame without the request magic did not end the connection')
  },
  teardown: async () => {},
  stats: () => stats,
  show: (i) => `session ${JSON.stringify(i.session)}; ${i.tightBudget ? 'tight budget; ' : ''}client ${i.leave === 'end' ? 'half-closes' : 'is gone'}; fault ${i.fault}; zeroFast ${String(i.zeroFast)}; shutdownAt ${String(i.shutdownAt)}; extents ${JSON.stringify(i.extents)}; stream ${hex(i.stream, 240)}; pieces at ${JSON.stringify(i.pieces)}; header ${hex(i.header, 28)}`
}
