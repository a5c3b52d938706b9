/**
 * peer-client: the real NbdClient (nbd-client.ts) over a unix socket
 * against a scripted server in this process. The server sends a valid
 * handshake (often) or a random/mutated one, then either answers each
 * request it parses (with random error values, sometimes not at all) or
 * sends random/mutated reply bytes, and may close or go silent. The client
 * connects, runs a few concurrent reads, writes, flushes, trims and write
 * zeroes (in range or not, aligned or not), and closes.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { createServer, type Server, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import { CODES, UkaiError } from '../../../src/errors.js'
import {
  NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT, NBD_OPT_GO, NBD_REP_ACK, NBD_REP_INFO,
  NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, IHAVEOPT
} from '../../../src/frontends/nbd/protocol.js'
import { NbdClient } from '../../../src/peer/nbd-client.js'
import { crash, hang, violation, type Target } from '../harness.js'
import { bytes, hex, mutated, rarely, split } from '../gen.js'
import { greeting, optReply, serverStream } from './peer-reply.js'

const SIZE = 1 << 20
const TIMEOUT_MS = 25
/** Unsettled this long (well past TIMEOUT_MS): a hang. */
const LIMIT_MS = 3000

/** A handshake the client accepts: fixed newstyle, NBD_INFO_EXPORT, maybe NBD_INFO_BLOCK_SIZE, ACK. */
const validHandshake = fc.record({
  flags: fc.constantFrom(
    NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_HAS_FLAGS,
    0
  ),
  block: fc.option(fc.record({ min: fc.constantFrom(1, 512, 4096), max: fc.constantFrom(4096, 8192, 65536, 1 << 25) })),
  noZeroes: fc.boolean()
}).map(({ flags, block, noZeroes }) => {
  const ex = Buffer.alloc(12)
  ex.writeUInt16BE(NBD_INFO_EXPORT, 0)
  ex.writeBigUInt64BE(BigInt(SIZE), 2)
  ex.writeUInt16BE(flags, 10)
  const parts = [greeting(noZeroes ? 3 : 1), optReply(NBD_OPT_GO, NBD_REP_INFO, ex)]
  if (block !== null) {
    const b = Buffer.alloc(14)
    b.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0)
    b.writeUInt32BE(block.min, 2)
    b.writeUInt32BE(4096, 6)
    b.writeUInt32BE(block.max, 10)
    parts.push(optReply(NBD_OPT_GO, NBD_REP_INFO, b))
  }
  parts.push(optReply(NBD_OPT_GO, NBD_REP_ACK))
  return Buffer.concat(parts)
})

type Answer =
  | { kind: 'echo', errors: number[], skipEvery: number | null }
  | { kind: 'bytes', bytes: Buffer }
  | { kind: 'silent' }
  | { kind: 'close' }

interface Op { op: 'read' | 'write' | 'flush' | 'trim' | 'zero', offset: number, length: number, flag: boolean }

export interface ClientInput {
  handshake: Buffer
  pieces: number[]
  answer: Answer
  ops: Op[]
  name: string
}

const opArb: fc.Arbitrary<Op> = fc.record({
  op: fc.constantFrom('read' as const, 'write' as const, 'flush' as const, 'trim' as const, 'zero' as const),
  offset: fc.oneof({ arbitrary: fc.integer({ min: 0, max: 255 }).map((k) => k * 4096), weight: 5 }, { arbitrary: fc.constantFrom(1, 511, SIZE - 512, SIZE, SIZE + 4096, -1, 0.5, 2 ** 53), weight: 1 }),
  length: fc.oneof({ arbitrary: fc.integer({ min: 0, max: 16 }).map((k) => k * 4096), weight: 5 }, { arbitrary: fc.constantFrom(1, 513, 0, 65536 + 512, -5), weight: 1 }),
  flag: fc.boolean()
})

const inputArb: fc.Arbitrary<ClientInput> = fc.record({
  handshake: fc.oneof({ arbitrary: validHandshake, weight: 6 }, { arbitrary: mutated(validHandshake), weight: 2 }, { arbitrary: serverStream, weight: 2 }),
  pieces: fc.array(fc.nat({ max: 200 }), { maxLength: 4 }),
  answer: fc.oneof(
    { arbitrary: fc.record({ kind: fc.constant('echo' as const), errors: fc.array(fc.oneof({ arbitrary: fc.constant(0), weight: 5 }, { arbitrary: fc.constantFrom(1, 5, 12, 22, 28, 75, 95, 108, 0xffffffff), weight: 1 }), { minLength: 1, maxLength: 4 }), skipEvery: rarely(fc.integer({ min: 2, max: 5 }), 20) }), weight: 6 },
    { arbitrary: fc.record({ kind: fc.constant('bytes' as const), bytes: fc.oneof(bytes(120), mutated(fc.constant(simple(1, 0, 0)))) }), weight: 2 },
    { arbitrary: fc.constant({ kind: 'silent' as const }), weight: 1 },
    { arbitrary: fc.constant({ kind: 'close' as const }), weight: 1 }
  ),
  ops: fc.array(opArb, { maxLength: 6 }),
  name: fc.oneof(fc.constantFrom('replica/vm1', '', 'x'.repeat(4097)), fc.string({ maxLength: 6 }))
})

function simple (cookie: number, error: number, data: number): Buffer {
  const b = Buffer.alloc(16 + data)
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0)
  b.writeUInt32BE(error >>> 0, 4)
  b.writeUInt32BE(Math.floor(cookie / 2 ** 32), 8)
  b.writeUInt32BE(cookie >>> 0, 12)
  return b
}

/** The scripted server's side of one connection. */
function serve (s: Socket, input: ClientInput): void {
  s.on('error', () => {})
  for (const p of split(input.handshake, input.pieces)) s.write(p)
  const a = input.answer
  if (a.kind === 'close') { s.end(); return }
  if (a.kind === 'silent') return
  let buf = Buffer.alloc(0)
  let phase: 'flags' | 'options' | 'requests' = 'flags'
  let sentBytes = false
  let n = 0
  s.on('data', (chunk: Buffer) => {
    buf = Buffer.concat([buf, chunk])
    for (;;) {
      if (phase === 'flags') {
        if (buf.length < 4) return
        buf = buf.subarray(4)
        phase = 'options'
      } else if (phase === 'options') {
        if (buf.length < 8) return
        if (buf.readBigUInt64BE(0) !== IHAVEOPT) { phase = 'requests'; continue }
        if (buf.length < 16) return
        const len = buf.readUInt32BE(12)
        if (buf.length < 16 + len) return
        buf = buf.subarray(16 + len)
      } else {
        if (a.kind === 'bytes') {
          if (!sentBytes) { sentBytes = true; s.write(a.bytes); s.end() }
          return
        }
        if (buf.length < 28) return
        if (buf.readUInt32BE(0) !== NBD_REQUEST_MAGIC) { s.destroy(); return }
        const type = buf.readUInt16BE(6)
        const cookie = Number(buf.readBigUInt64BE(8))
        const length = buf.readUInt32BE(24)
        const payload = type === NBD_CMD_WRITE ? length : 0
        if (buf.length < 28 + payload) return
        buf = buf.subarray(28 + payload)
        if (type === NBD_CMD_DISC) { s.end(); return }
        const i = n++
        if (a.skipEvery !== null && i % a.skipEvery === a.skipEvery - 1) continue // never answered: the client times out
        const error = a.errors[i % a.errors.length]!
        s.write(simple(cookie, error, type === NBD_CMD_READ && error === 0 ? length : 0))
      }
    }
  })
}

/** What the cases reached (reported with the results; the slice checks it is not nothing). */
export const stats = { connected: 0, refused: 0, opsOk: 0, opsFailed: 0 }

interface Ctx { dir: string, server: Server, path: string, current: ClientInput | undefined, sockets: Set<Socket> }

const isTableError = (e: unknown): boolean => e instanceof UkaiError && e.code in CODES && e.code !== 'UKAI_ERR_INTERNAL'

async function settle<T> (p: Promise<T>, ms: number, what: string): Promise<{ ok: true, v: T } | { ok: false, err: unknown }> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([
      p.then((v) => ({ ok: true as const, v }), (err: unknown) => ({ ok: false as const, err })),
      new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(hang(`${what} did not settle within ${ms} ms`)), ms) })
    ])
  } finally { clearTimeout(timer) }
}

export const peerClient: Target<ClientInput, Ctx> = {
  name: 'peer-client',
  summary: 'the real NbdClient (nbd-client.ts) over a unix socket against a scripted in-process server: valid or random/mutated handshakes, then per-request answers with random errors (some never sent), random/mutated reply bytes, a close or silence; concurrent reads/writes/flush/trim/write-zeroes, then close()',
  contract: `crash: connect or a request rejects with anything but a UkaiError of the error table (UKAI_ERR_INTERNAL included), an 'error' event or exception escapes (uncaught), or 'close' is emitted other than once; hang: connect, a request or close() unsettled after ${LIMIT_MS} ms (the client's own timeout is ${TIMEOUT_MS} ms); violation: a request that succeeded against a server that answered it with an error`,
  defaultCases: 30_000,
  shardSize: 15_000,
  msPerCase: 4,
  cpuShare: 0.3,
  caseTimeoutMs: 5000,
  sliceCases: 80,
  arbitrary: inputArb,
  setup: async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ukai-fuzz-peer-'))
    const path = join(dir, 'fake.sock')
    const ctx: Ctx = { dir, server: createServer(), path, current: undefined, sockets: new Set() }
    ctx.server.on('connection', (s) => {
      ctx.sockets.add(s)
      s.on('close', () => ctx.sockets.delete(s))
      if (ctx.current === undefined) { s.destroy(); return }
      serve(s, ctx.current)
    })
    await new Promise<void>((resolve) => ctx.server.listen(path, resolve))
    return ctx
  },
  run: async (input, ctx, { signal }) => {
    ctx.current = input
    signal.addEventListener('abort', () => { for (const s of ctx.sockets) s.destroy() })
    const limit = LIMIT_MS
    const c = await settle(NbdClient.connect({ path: ctx.path }, input.name, { timeoutMs: TIMEOUT_MS }), limit, 'NbdClient.connect')
    if (!c.ok) {
      stats.refused++
      if (!isTableError(c.err)) throw crash(`NbdClient.connect rejected with ${(c.err as Error)?.name}: ${(c.err as Error)?.message}`, c.err)
      return
    }
    const client = c.v
    stats.connected++
    let closes = 0
    client.on('close', () => closes++)
    signal.addEventListener('abort', () => { void client.close() })
    const results = await Promise.all(input.ops.map(async (o) => {
      const p = o.op === 'read'
        ? client.read(o.offset, Buffer.alloc(Math.max(0, Math.min(o.length, 1 << 20)) | 0))
        : o.op === 'write'
          ? client.write(o.offset, Buffer.alloc(Math.max(0, Math.min(o.length, 1 << 20)) | 0, 7), o.flag)
          : o.op === 'flush' ? client.flush() : o.op === 'trim' ? client.trim(o.offset, o.length) : client.writeZeroes(o.offset, o.length, o.flag)
      return { o, r: await settle(p, limit, `${o.op}(${o.offset}, ${o.length})`) }
    }))
    for (const { o, r } of results) {
      if (r.ok) stats.opsOk++
      else stats.opsFailed++
      if (!r.ok && !isTableError(r.err)) throw crash(`${o.op}(${o.offset}, ${o.length}) rejected with ${(r.err as Error)?.name}: ${(r.err as Error)?.message}`, r.err)
      const a = input.answer
      if (r.ok && a.kind === 'echo' && a.skipEvery === null && a.errors.every((e) => e !== 0) && o.length > 0 && o.op !== 'flush') {
        // Every request the server saw failed; a success here came from nowhere (unless nothing was sent).
        if (o.op === 'read' || o.op === 'write') throw violation(`${o.op}(${o.offset}, ${o.length}) succeeded though the server failed every request`)
      }
    }
    const cl = await settle(client.close(), limit, 'close()')
    if (!cl.ok) throw crash(`close() rejected: ${(cl.err as Error)?.message}`, cl.err)
    // 'close' is emitted synchronously with the socket's close, before close() resolves.
    if (closes !== 1) throw crash(`'close' was emitted ${closes} times`)
    if (client.inFlight !== 0) throw violation(`${client.inFlight} requests still in flight after close()`)
  },
  teardown: async (ctx) => {
    for (const s of ctx.sockets) s.destroy()
    await new Promise((resolve) => ctx.server.close(resolve))
    await rm(ctx.dir, { recursive: true, force: true })
  },
  stats: () => stats,
  show: (i) => {
    const a = i.answer.kind === 'bytes' ? `bytes ${hex(i.answer.bytes, 120)}` : i.answer.kind === 'echo' ? `echo errors ${JSON.stringify(i.answer.errors)}${i.answer.skipEvery !== null ? ` (every ${i.answer.skipEvery}th unanswered)` : ''}` : i.answer.kind
    return `server handshake ${hex(i.handshake, 200)} in pieces at ${JSON.stringify(i.pieces)}; then ${a}; export ${JSON.stringify(i.name.length > 40 ? `${i.name.slice(0, 20)}…(${i.name.length})` : i.name)}; ops ${JSON.stringify(i.ops)}`
  }
}
