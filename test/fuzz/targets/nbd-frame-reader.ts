/**
 * nbd-frame-reader: the FrameReader (frame-reader.ts) both NBD server
 * phases read from, against a model (one flat byte array). Random
 * sequences of push / take / peek / skip / read / discard / end, with
 * chunks of every size, so frames span chunks and the chunk list is
 * compacted.
 */
import fc from 'fast-check'
import { UkaiError } from '../../../src/errors.js'
import { FrameReader } from '../../../src/frontends/nbd/frame-reader.js'
import { crash, tick, violation, type Target } from '../harness.js'

type Op =
  | { op: 'push', data: Uint8Array }
  | { op: 'take' | 'peek' | 'skip' | 'takeInto' | 'read' | 'discard', n: number }
  | { op: 'end', custom: boolean }

const size = fc.oneof({ arbitrary: fc.integer({ min: 0, max: 40 }), weight: 4 }, { arbitrary: fc.integer({ min: 0, max: 400 }), weight: 1 })

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { arbitrary: fc.record({ op: fc.constant('push' as const), data: fc.oneof(fc.uint8Array({ minLength: 0, maxLength: 3 }), fc.uint8Array({ maxLength: 64 })) }), weight: 8 },
  { arbitrary: fc.record({ op: fc.constantFrom('take' as const, 'peek' as const, 'skip' as const, 'takeInto' as const), n: size }), weight: 4 },
  { arbitrary: fc.record({ op: fc.constantFrom('read' as const, 'discard' as const), n: size }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('end' as const), custom: fc.boolean() }), weight: 1 }
)

export interface FrameReaderInput { ops: Op[] }

/** How a pending call must fail once the reader ended: with the custom end() error, or the reader's own UKAI_ERR_CONNECT. */
interface Failing { fail: Error | undefined }

class Model {
  bytes: number[] = []
  ended: Failing | undefined
  push (d: Uint8Array): void { if (this.ended === undefined) this.bytes.push(...d) }
  take (n: number): Buffer { return Buffer.from(this.bytes.splice(0, n)) }
}

const same = (a: Buffer, b: Buffer): boolean => a.length === b.length && a.equals(b)

const failedRight = (err: unknown, f: Failing): boolean =>
  f.fail !== undefined ? err === f.fail : err instanceof UkaiError && err.code === 'UKAI_ERR_CONNECT'

export const nbdFrameReader: Target<FrameReaderInput, undefined> = {
  name: 'nbd-frame-reader',
  summary: 'FrameReader (frame-reader.ts) against a byte-array model: random push/take/peek/skip/takeInto/read/discard/end sequences',
  contract: 'crash: an exception other than the documented RangeError of take/peek beyond the buffered length, or read/discard rejecting with anything but the end() error; hang: a read/discard whose bytes arrived left unsettled (limit 2 s); violation: any byte, length or outcome that differs from the model',
  defaultCases: 100_000,
  shardSize: 100_000,
  msPerCase: 0.12,
  cpuShare: 1,
  caseTimeoutMs: 2000,
  sliceCases: 800,
  arbitrary: fc.record({ ops: fc.array(opArb, { maxLength: 160 }) }),
  setup: async () => undefined,
  run: async ({ ops }) => {
    const r = new FrameReader()
    const m = new Model()
    /** The async read or discard in progress, with what the model expects of it. */
    let pending: { what: string, n: number, left: number, got: Buffer | undefined, err: unknown, settled: boolean, expect: Buffer | 'ok' | Failing | undefined } | undefined
    const advance = (): void => {
      // The model's side of a pending read/discard after a push or end.
      const p = pending
      if (p === undefined || p.expect !== undefined) return
      if (p.what === 'read') {
        if (m.bytes.length >= p.n) p.expect = m.take(p.n)
        else if (m.ended !== undefined) p.expect = m.ended
      } else {
        const k = Math.min(p.left, m.bytes.length)
        m.take(k)
        p.left -= k
        if (p.left === 0) p.expect = 'ok'
        else if (m.ended !== undefined) p.expect = m.ended
      }
    }
    const settle = async (step: number): Promise<void> => {
      await tick()
      const p = pending
      if (p === undefined) return
      if (p.expect === undefined) {
        if (p.settled) throw violation(`step ${step}: ${p.what}(${p.n}) settled before the model had its bytes`)
        return
      }
      if (!p.settled) throw violation(`step ${step}: ${p.what}(${p.n}) did not settle though its bytes arrived (or the reader ended)`)
      pending = undefined
      if (typeof p.expect === 'object' && !Buffer.isBuffer(p.expect)) {
        if (!failedRight(p.err, p.expect as Failing)) throw crash(`step ${step}: ${p.what}(${p.n}) ended with ${String(p.err)} instead of the end() error`, p.err)
      } else if (p.err !== undefined) {
        throw crash(`step ${step}: ${p.what}(${p.n}) rejected: ${String(p.err)}`, p.err)
      } else if (p.expect !== 'ok' && !same(p.got!, p.expect)) {
        throw violation(`step ${step}: read(${p.n}) returned ${p.got!.toString('hex')}, the model ${p.expect.toString('hex')}`)
      }
    }
    for (let step = 0; step < ops.length; step++) {
      const o = ops[step]!
      if (pending !== undefined && o.op !== 'push' && o.op !== 'end') continue // one reader at a time
      switch (o.op) {
        case 'push':
          r.push(Buffer.from(o.data))
          m.push(o.data)
          advance()
          await settle(step)
          break
        case 'end': {
          const err = o.custom ? new UkaiError('UKAI_ERR_IO', 'custom end') : undefined
          r.end(err)
          m.ended ??= { fail: err }
          advance()
          await settle(step)
          break
        }
        case 'take': case 'peek': {
          let got: Buffer
          try {
            got = o.op === 'take' ? r.take(o.n) : r.peek(o.n)
          } catch (err) {
            if (err instanceof RangeError && o.n > m.bytes.length) break
            throw crash(`step ${step}: ${o.op}(${o.n}) with ${m.bytes.length} bytes buffered threw ${String(err)}`, err)
          }
          if (o.n > m.bytes.length) throw violation(`step ${step}: ${o.op}(${o.n}) returned with only ${m.bytes.length} bytes buffered`)
          const want = o.op === 'take' ? m.take(o.n) : Buffer.from(m.bytes.slice(0, o.n))
          if (!same(got, want)) throw violation(`step ${step}: ${o.op}(${o.n}) returned ${got.toString('hex')}, the model ${want.toString('hex')}`)
          break
        }
        case 'takeInto': {
          // takeInto(target, offset, n): copies and consumes up to n bytes (a method newer than the others).
          const ti = (r as unknown as { takeInto?: (t: Buffer, o: number, n: number) => number }).takeInto
          if (ti === undefined) break
          const target = Buffer.alloc(o.n + 3, 0xee)
          let k: number
          try { k = ti.call(r, target, 3, o.n) } catch (err) { throw crash(`step ${step}: takeInto(${o.n}) threw ${String(err)}`, err) }
          const want = m.take(Math.min(o.n, m.bytes.length))
          if (k !== want.length || !same(target.subarray(3, 3 + k), want) || target.subarray(0, 3).some((b) => b !== 0xee) || target.subarray(3 + k).some((b) => b !== 0xee)) {
            throw violation(`step ${step}: takeInto(${o.n}) copied ${k} bytes ${target.subarray(3, 3 + k).toString('hex')}, the model ${want.toString('hex')}`)
          }
          break
        }
        case 'skip': {
          const n = r.skip(o.n)
          const want = Math.min(o.n, m.bytes.length)
          m.take(want)
          if (n !== want) throw violation(`step ${step}: skip(${o.n}) dropped ${n} bytes, the model ${want}`)
          break
        }
        case 'read': case 'discard': {
          const p: NonNullable<typeof pending> = { what: o.op, n: o.n, left: o.n, got: undefined, err: undefined, settled: false, expect: undefined }
          pending = p
          const started = o.op === 'read' ? r.read(o.n).then((b) => { p.got = Buffer.from(b) }) : r.discard(o.n)
          started.then(() => { p.settled = true }, (err: unknown) => { p.err = err; p.settled = true })
          advance()
          await settle(step)
          break
        }
      }
      if (r.length !== m.bytes.length) throw violation(`step ${step} (${o.op}): the reader holds ${r.length} bytes, the model ${m.bytes.length}`)
      if (r.isEnded !== (m.ended !== undefined)) throw violation(`step ${step}: isEnded is ${String(r.isEnded)}`)
    }
    if (pending !== undefined) {
      // Leave nothing waiting: end the reader and expect the pending call to fail.
      r.end()
      await tick()
      if (!pending.settled) throw violation(`${pending.what}(${pending.n}) still waits after end()`)
    }
  },
  teardown: async () => {},
  show: ({ ops }) => JSON.stringify(ops.map((o) => o.op === 'push' ? `push ${Buffer.from(o.data).toString('hex') || '(empty)'}` : o.op === 'end' ? `end${o.custom ? '(custom)' : ''}` : `${o.op}(${o.n})`))
}
