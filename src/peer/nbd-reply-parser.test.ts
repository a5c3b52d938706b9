/**
 * The reply parser with structured replies negotiated: well-formed chunk
 * streams (reads answered in pieces of data and holes in any order,
 * interleaved with other requests' chunks, block status, error chunks,
 * simple replies to writes) parse the same however the stream is cut;
 * each way a chunk can break the protocol is reported as an error that
 * ends the connection; and random or mutated streams never throw.
 */
import { describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import fc from 'fast-check'
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_READ, NBD_CMD_WRITE, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE, NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC
} from '../frontends/nbd/protocol.js'
import { ReplyParser, protocolError, type InFlightRequest, type StatusExtent } from './nbd-reply-parser.js'
import type { UkaiError } from '../errors.js'

const CONTEXT = 7

function chunk (cookie: number, flags: number, type: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(20)
  h.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0)
  h.writeUInt16BE(flags, 4)
  h.writeUInt16BE(type, 6)
  h.writeUInt32BE(Math.floor(cookie / 2 ** 32), 8)
  h.writeUInt32BE(cookie >>> 0, 12)
  h.writeUInt32BE(payload.length, 16)
  return Buffer.concat([h, payload])
}

function simple (cookie: number, error: number): Buffer {
  const h = Buffer.alloc(16)
  h.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0)
  h.writeUInt32BE(error, 4)
  h.writeUInt32BE(Math.floor(cookie / 2 ** 32), 8)
  h.writeUInt32BE(cookie >>> 0, 12)
  return h
}

const u64 = (n: number): Buffer => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b }
const u32 = (n: number): Buffer => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b }
const u16 = (n: number): Buffer => { const b = Buffer.alloc(2); b.writeUInt16BE(n); return b }

const data = (cookie: number, offset: number, bytes: Buffer, flags = 0): Buffer => chunk(cookie, flags, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(offset), bytes]))
const hole = (cookie: number, offset: number, n: number, flags = 0): Buffer => chunk(cookie, flags, NBD_REPLY_TYPE_OFFSET_HOLE, Buffer.concat([u64(offset), u32(n)]))
const none = (cookie: number): Buffer => chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, Buffer.alloc(0))
const status = (cookie: number, extents: StatusExtent[], context = CONTEXT, flags = NBD_REPLY_FLAG_DONE): Buffer =>
  chunk(cookie, flags, NBD_REPLY_TYPE_BLOCK_STATUS, Buffer.concat([u32(context), ...extents.flatMap((e) => [u32(e.length), u32(e.flags)])]))
const errorChunk = (cookie: number, error: number, message = '', flags = NBD_REPLY_FLAG_DONE, type = NBD_REPLY_TYPE_ERROR, offset?: number): Buffer =>
  chunk(cookie, flags, type, Buffer.concat([u32(error), u16(Buffer.byteLength(message)), Buffer.from(message), ...(offset === undefined ? [] : [u64(offset)])]))

interface Request extends InFlightRequest { dest: Buffer | null }

interface Outcome { completed: Map<number, number>, statuses: Map<number, StatusExtent[]>, error: UkaiError | undefined }

/** Runs the parser over `pieces` against `requests`; checks it never throws and that an error is final. */
function run (requests: Map<number, Request>, pieces: Buffer[]): Outcome {
  const completed = new Map<number, number>()
  const statuses = new Map<number, StatusExtent[]>()
  const inFlight = (cookie: number): Request | undefined => completed.has(cookie) ? undefined : requests.get(cookie)
  const parser = new ReplyParser({
    payloadOf: (cookie) => inFlight(cookie)?.dest,
    requestOf: (cookie) => inFlight(cookie),
    complete: (cookie, error) => {
      assert.ok(inFlight(cookie) !== undefined, `one completion for cookie ${cookie}`)
      completed.set(cookie, error)
    },
    status: (cookie, context, extents) => {
      // As the client does (nbd-client.ts): a context that was not negotiated breaks the protocol.
      if (context !== CONTEXT) return protocolError(`unexpected status chunk for context ${context}`)
      statuses.set(cookie, extents)
      return undefined
    }
  }, true)
  let error: UkaiError | undefined
  for (const p of pieces) {
    const e = parser.push(p)
    if (error !== undefined) assert.equal(e, error, 'an error is final')
    error = e
  }
  if (error !== undefined) assert.equal(error.code, 'UKAI_ERR_IO')
  return { completed, statuses, error }
}

const cut = (b: Buffer, cuts: number[]): Buffer[] => {
  const at = [...new Set(cuts.map((c) => c % (b.length + 1)))].sort((x, y) => x - y)
  const out: Buffer[] = []
  let prev = 0
  for (const c of at) { out.push(b.subarray(prev, c)); prev = c }
  out.push(b.subarray(prev))
  return out
}

const read = (offset: number, length: number): Request => ({ type: NBD_CMD_READ, offset, length, dest: Buffer.alloc(length, 0xee) })
const blockStatus = (offset: number, length: number): Request => ({ type: NBD_CMD_BLOCK_STATUS, offset, length, dest: null })
const write = (offset: number, length: number): Request => ({ type: NBD_CMD_WRITE, offset, length, dest: null })

/** One request's reply, as a list of chunks in the order it sends them (other requests' chunks may come between). */
interface Scripted { request: Request, chunks: Buffer[], expect: { error: number, contents?: Buffer, extents?: StatusExtent[] } }

/** A READ of `length` bytes answered in pieces (data or holes) sent in `order`, the last flagged DONE or followed by NONE. */
const readArb = fc.record({
  length: fc.integer({ min: 1, max: 5000 }),
  cuts: fc.array(fc.nat(), { maxLength: 6 }),
  holes: fc.array(fc.boolean(), { minLength: 7, maxLength: 7 }),
  order: fc.array(fc.nat(), { minLength: 7, maxLength: 7 }),
  noneLast: fc.boolean(),
  error: fc.oneof({ arbitrary: fc.constant(0), weight: 3 }, { arbitrary: fc.constantFrom(5, 22, 28), weight: 1 })
})

function scriptRead (cookie: number, offset: number, r: fc.RecordValue<{ length: number, cuts: number[], holes: boolean[], order: number[], noneLast: boolean, error: number }>): Scripted {
  const contents = randomBytes(r.length)
  const bounds = [...new Set([0, ...r.cuts.map((c) => c % r.length), r.length])].sort((a, b) => a - b)
  const pieces: Array<(flags: number) => Buffer> = []
  for (let i = 0; i + 1 < bounds.length; i++) {
    const [s, e] = [bounds[i]!, bounds[i + 1]!]
    if (r.holes[i % 7] === true) {
      contents.fill(0, s, e)
      pieces.push((f) => hole(cookie, offset + s, e - s, f))
    } else {
      pieces.push((f) => data(cookie, offset + s, contents.subarray(s, e), f))
    }
  }
  // "MAY send the content chunks in any order".
  const sorted = pieces.map((p, i) => ({ p, k: r.order[i % 7]! * 100 + i })).sort((a, b) => a.k - b.k).map((x) => x.p)
  const chunks = sorted.map((p, i) => p(!r.noneLast && r.error === 0 && i === sorted.length - 1 ? NBD_REPLY_FLAG_DONE : 0))
  if (r.error !== 0) chunks.push(errorChunk(cookie, r.error, 'no such luck'))
  else if (r.noneLast) chunks.push(none(cookie))
  return { request: read(offset, r.length), chunks, expect: { error: r.error, ...(r.error === 0 ? { contents } : {}) } }
}

const statusArb = fc.array(fc.record({ length: fc.integer({ min: 1, max: 2 ** 20 }), flags: fc.integer({ min: 0, max: 3 }) }), { minLength: 1, maxLength: 20 })

/** Interleaves the scripts' chunks, keeping each one's own order. */
function interleave (scripts: Scripted[], picks: number[]): Buffer {
  const queues = scripts.map((s) => s.chunks.slice())
  const out: Buffer[] = []
  let i = 0
  while (queues.some((q) => q.length > 0)) {
    const live = queues.filter((q) => q.length > 0)
    out.push(live[(picks[i++ % Math.max(1, picks.length)] ?? 0) % live.length]!.shift()!)
  }
  return Buffer.concat(out)
}

function check (scripts: Scripted[], o: Outcome): void {
  assert.equal(o.error, undefined, o.error?.message)
  scripts.forEach((s, i) => {
    const cookie = i + 1
    assert.equal(o.completed.get(cookie), s.expect.error, `cookie ${cookie}`)
    if (s.expect.contents !== undefined) assert.ok(s.request.dest!.equals(s.expect.contents), `read ${cookie}'s contents`)
    if (s.expect.extents !== undefined) assert.deepEqual(o.statuses.get(cookie), s.expect.extents)
  })
}

describe('ReplyParser with structured replies', () => {
  test('reads in data and hole pieces, block status, errors and simple replies, interleaved, parse the same however the stream is cut', () => {
    fc.assert(fc.property(
      fc.array(fc.oneof(
        readArb.map((r) => ({ kind: 'read' as const, r })),
        statusArb.map((extents) => ({ kind: 'status' as const, extents })),
        fc.integer({ min: 0, max: 2 }).map((e) => ({ kind: 'write' as const, error: [0, 5, 28][e]! }))
      ), { minLength: 1, maxLength: 8 }),
      fc.array(fc.nat(), { maxLength: 40 }),
      fc.array(fc.nat(), { maxLength: 40 }),
      (replies, picks, cuts) => {
        const scripts: Scripted[] = replies.map((x, i) => {
          const cookie = i + 1
          const offset = cookie * 2 ** 20
          if (x.kind === 'read') return scriptRead(cookie, offset, x.r)
          if (x.kind === 'status') return { request: blockStatus(offset, 4096), chunks: [status(cookie, x.extents)], expect: { error: 0, extents: x.extents } }
          // Simple replies stay allowed for other commands.
          return { request: write(offset, 512), chunks: [x.error === 0 ? simple(cookie, 0) : errorChunk(cookie, x.error)], expect: { error: x.error } }
        })
        const requests = new Map(scripts.map((s, i) => [i + 1, s.request]))
        check(scripts, run(requests, cut(interleave(scripts, picks), cuts)))
      }), { numRuns: 300 })
  })

  test('an error chunk with an offset, and an unknown error type, err the reply; transmission goes on', () => {
    const requests = new Map([[1, read(0, 1024)], [2, write(0, 512)], [3, read(4096, 10)]])
    const o = run(requests, [Buffer.concat([
      data(1, 0, Buffer.alloc(512, 1)),
      errorChunk(1, 5, 'bad sector', 0, NBD_REPLY_TYPE_ERROR_OFFSET, 512),
      hole(1, 512, 512, NBD_REPLY_FLAG_DONE),
      errorChunk(2, 22, 'odd', NBD_REPLY_FLAG_DONE, (1 << 15) + 77),
      data(3, 4096, Buffer.alloc(10, 3), NBD_REPLY_FLAG_DONE)
    ])])
    assert.equal(o.error, undefined)
    assert.deepEqual([...o.completed], [[1, 5], [2, 22], [3, 0]])
  })

  const broken: Array<[string, Map<number, Request>, Buffer, RegExp]> = [
    ['a data chunk outside the request', new Map([[1, read(0, 100)]]), data(1, 50, Buffer.alloc(60), NBD_REPLY_FLAG_DONE), /outside the request/],
    ['overlapping content chunks', new Map([[1, read(0, 100)]]), Buffer.concat([data(1, 0, Buffer.alloc(60)), hole(1, 50, 50, NBD_REPLY_FLAG_DONE)]), /overlaps/],
    ['a read that ends short', new Map([[1, read(0, 100)]]), data(1, 0, Buffer.alloc(60), NBD_REPLY_FLAG_DONE), /ended with 60 bytes/],
    ['a hole of size 0', new Map([[1, read(0, 100)]]), hole(1, 0, 0, NBD_REPLY_FLAG_DONE), /hole size of 0/],
    ['an OFFSET_DATA chunk of 8 bytes', new Map([[1, read(0, 100)]]), chunk(1, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, u64(0)), /of length 8/],
    ['NONE without DONE', new Map([[1, write(0, 512)]]), chunk(1, 0, NBD_REPLY_TYPE_NONE, Buffer.alloc(0)), /without NBD_REPLY_FLAG_DONE/],
    ['NONE with a payload', new Map([[1, write(0, 512)]]), chunk(1, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, Buffer.alloc(4)), /of length 4/],
    ['an unknown chunk type', new Map([[1, write(0, 512)]]), chunk(1, NBD_REPLY_FLAG_DONE, 99, Buffer.alloc(4)), /unexpected reply type 99/],
    ['data for a write', new Map([[1, write(0, 512)]]), data(1, 0, Buffer.alloc(512), NBD_REPLY_FLAG_DONE), /unexpected NBD_REPLY_TYPE_OFFSET_DATA chunk for NBD_CMD_WRITE/],
    ['block status for a read', new Map([[1, read(0, 512)]]), status(1, [{ length: 512, flags: 0 }]), /unexpected NBD_REPLY_TYPE_BLOCK_STATUS/],
    ['a status chunk of a bad length', new Map([[1, blockStatus(0, 512)]]), chunk(1, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, Buffer.alloc(10)), /of length 10/],
    ['a status extent of length 0', new Map([[1, blockStatus(0, 512)]]), status(1, [{ length: 0, flags: 0 }]), /extent of length 0/],
    ['block status done without a status chunk', new Map([[1, blockStatus(0, 512)]]), none(1), /without a status chunk/],
    ['a simple reply to a read', new Map([[1, read(0, 4)]]), Buffer.concat([simple(1, 0), Buffer.alloc(4)]), /simple reply to NBD_CMD_READ/],
    ['an error chunk with error 0', new Map([[1, write(0, 512)]]), errorChunk(1, 0), /with error 0/],
    ['an error message longer than its chunk', new Map([[1, write(0, 512)]]), chunk(1, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, Buffer.concat([u32(5), u16(50), Buffer.alloc(4)])), /message of 50 bytes/],
    ['a chunk for a cookie not in flight', new Map([[1, write(0, 512)]]), none(9), /unknown cookie/]
  ]
  for (const [what, requests, bytes, message] of broken) {
    test(`refused: ${what}`, () => {
      for (const pieces of [[bytes], cut(bytes, [1, 5, 17, 21, 30])]) {
        const o = run(requests, pieces)
        assert.match(o.error?.message ?? 'no error', message)
      }
    })
  }

  test('random and mutated chunk streams either parse or report an error, never throw', () => {
    fc.assert(fc.property(
      readArb, statusArb,
      fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { maxLength: 4 }),
      fc.nat(), fc.uint8Array({ maxLength: 60 }), fc.array(fc.nat(), { maxLength: 10 }),
      (r, extents, flips, keep, junk, cuts) => {
        const a = scriptRead(1, 0, r)
        const requests = new Map([[1, a.request], [2, blockStatus(8192, 4096)]])
        const b = Buffer.concat([...a.chunks, status(2, extents), Buffer.from(junk)])
        for (const [at, x] of flips) b[at % b.length]! ^= x
        run(requests, cut(b.subarray(0, keep % (b.length + 1)), cuts))
      }), { numRuns: 500 })
  })
})
