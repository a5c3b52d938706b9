/**
 * Input generators shared by the fuzz targets: byte streams (random, and
 * well-formed frames mutated: bits flipped, fields overwritten with edge
 * values, cut, extended, spliced) and JSON documents as text (random
 * values, deeply nested ones, huge and odd numbers, wrong types,
 * prototype-pollution keys, duplicate keys, text that is not JSON), plus
 * compact printing of both for reports.
 */
import fc from 'fast-check'

// ---------------------------------------------------------------------------
// Bytes

export const bytes = (maxLength: number): fc.Arbitrary<Buffer> =>
  fc.uint8Array({ maxLength }).map((a) => Buffer.from(a))

/** 32-bit values at the edges parsers get wrong. */
export const edgeU32 = fc.constantFrom(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 17, 28, 255, 256, 4095, 4096, 4097,
  0xffff, 0x10000, 0x10001, 0x7fffffff, 0x80000000, 0x80000001, 0xfffffffe, 0xffffffff)
export const u32 = fc.oneof({ arbitrary: fc.integer({ min: 0, max: 0xffffffff }), weight: 2 }, { arbitrary: edgeU32, weight: 1 })
export const u16 = fc.oneof(fc.integer({ min: 0, max: 0xffff }), fc.constantFrom(0, 1, 2, 3, 0x7fff, 0x8000, 0x8001, 0xffff))

type ByteOp =
  | { op: 'flip', at: number, x: number }
  | { op: 'u32', at: number, v: number }
  | { op: 'cut', at: number }
  | { op: 'junk', at: number, junk: Uint8Array }
  | { op: 'dup', at: number, len: number }
  | { op: 'drop', at: number, len: number }

const byteOp: fc.Arbitrary<ByteOp> = fc.oneof(
  { arbitrary: fc.record({ op: fc.constant('flip' as const), at: fc.nat(), x: fc.integer({ min: 1, max: 255 }) }), weight: 4 },
  { arbitrary: fc.record({ op: fc.constant('u32' as const), at: fc.nat(), v: u32 }), weight: 3 },
  { arbitrary: fc.record({ op: fc.constant('cut' as const), at: fc.nat() }), weight: 1 },
  { arbitrary: fc.record({ op: fc.constant('junk' as const), at: fc.nat(), junk: fc.uint8Array({ minLength: 1, maxLength: 48 }) }), weight: 1 },
  { arbitrary: fc.record({ op: fc.constant('dup' as const), at: fc.nat(), len: fc.integer({ min: 1, max: 64 }) }), weight: 1 },
  { arbitrary: fc.record({ op: fc.constant('drop' as const), at: fc.nat(), len: fc.integer({ min: 1, max: 16 }) }), weight: 1 }
)

function applyByteOp (b: Buffer, o: ByteOp): Buffer {
  const at = o.at % (b.length + 1)
  switch (o.op) {
    case 'flip': {
      if (b.length === 0) return b
      const out = Buffer.from(b)
      out[o.at % b.length]! ^= o.x
      return out
    }
    case 'u32': {
      if (b.length < 4) return b
      const out = Buffer.from(b)
      // Fields sit at multiples of 4 in most frames; hit those more often.
      const pos = (o.at % 2 === 0 ? (o.at >> 1) * 4 : o.at) % (b.length - 3)
      out.writeUInt32BE(o.v >>> 0, pos)
      return out
    }
    case 'cut': return b.subarray(0, at)
    case 'junk': return Buffer.concat([b.subarray(0, at), Buffer.from(o.junk), b.subarray(at)])
    case 'dup': return Buffer.concat([b.subarray(0, at + o.len), b.subarray(at, at + o.len), b.subarray(at + o.len)])
    case 'drop': return Buffer.concat([b.subarray(0, at), b.subarray(at + o.len)])
  }
}

/** Frames as made (often), or mutated by one to four byte operations. */
export function mutated (frames: fc.Arbitrary<Buffer>): fc.Arbitrary<Buffer> {
  return fc.oneof(
    { arbitrary: frames, weight: 2 },
    { arbitrary: fc.tuple(frames, fc.array(byteOp, { minLength: 1, maxLength: 4 })).map(([b, ops]) => ops.reduce(applyByteOp, b)), weight: 3 }
  )
}

/** Where a byte stream is cut into the pieces that arrive one by one. */
export const cuts = fc.array(fc.nat({ max: 4096 }), { maxLength: 8 })

/** Splits `b` at the cut points (each taken modulo the length). */
export function split (b: Buffer, at: number[]): Buffer[] {
  const points = [...new Set(at.map((c) => c % (b.length + 1)))].sort((x, y) => x - y)
  const out: Buffer[] = []
  let prev = 0
  for (const c of points) {
    if (c > prev) out.push(b.subarray(prev, c))
    prev = Math.max(prev, c)
  }
  if (prev < b.length) out.push(b.subarray(prev))
  return out
}

// ---------------------------------------------------------------------------
// JSON documents, as trees rendered to text

export type J =
  | { t: 'lit', text: string }
  | { t: 'str', v: string }
  | { t: 'arr', items: J[] }
  | { t: 'obj', entries: Array<[string, J]> }
  /** `depth` levels of arrays or single-key objects around `leaf`. */
  | { t: 'deep', depth: number, kind: 'arr' | 'obj', key: string, leaf: J }
  /** Text that need not be JSON at all. */
  | { t: 'raw', text: string }

export const lit = (text: string): J => ({ t: 'lit', text })
export const str = (v: string): J => ({ t: 'str', v })
export const num = (n: number): J => ({ t: 'lit', text: String(n) })
export const arr = (items: J[]): J => ({ t: 'arr', items })
export const obj = (o: Record<string, J>): J => ({ t: 'obj', entries: Object.entries(o) })

/** The JSON text of a tree; deep nests are written without recursion. */
export function render (j: J): string {
  const out: string[] = []
  const walk = (n: J): void => {
    switch (n.t) {
      case 'lit': case 'raw': out.push(n.text); return
      case 'str': out.push(JSON.stringify(n.v)); return
      case 'arr':
        out.push('[')
        n.items.forEach((x, i) => { if (i > 0) out.push(','); walk(x) })
        out.push(']')
        return
      case 'obj':
        out.push('{')
        n.entries.forEach(([k, v], i) => { if (i > 0) out.push(','); out.push(JSON.stringify(k), ':'); walk(v) })
        out.push('}')
        return
      case 'deep': {
        const open = n.kind === 'arr' ? '[' : `{${JSON.stringify(n.key)}:`
        out.push(open.repeat(n.depth))
        walk(n.leaf)
        out.push((n.kind === 'arr' ? ']' : '}').repeat(n.depth))
      }
    }
  }
  walk(j)
  return out.join('')
}

/** Keys that reach Object.prototype or shadow its methods when code is careless. */
export const POLLUTING_KEYS = ['__proto__', 'constructor', 'prototype', 'toString', 'valueOf', 'hasOwnProperty', '__defineGetter__', 'then']

/** Number literals that break naive checks: beyond 2^53, beyond double range, negative zero, fractions, exponents. */
export const ODD_NUMBERS = ['0', '-0', '1', '-1', '0.5', '1.5', '1e400', '-1e400', '1e-400', '2e308', '1E3', '1e2', '4294967295', '4294967296',
  '9007199254740991', '9007199254740992', '9007199254740993', '-9007199254740993', '18446744073709551615', '18446744073709551616',
  '123456789012345678901234567890123456789', '0.30000000000000004', '65536', '65535', '1048576', '67108864', '1099511627776']

const numberText: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom(...ODD_NUMBERS),
  fc.integer({ min: -1000, max: 1 << 30 }).map(String),
  fc.double({ noNaN: true, noDefaultInfinity: true }).map((d) => JSON.stringify(d))
)

export const oddString: fc.Arbitrary<string> = fc.oneof(
  fc.string({ maxLength: 12 }),
  fc.constantFrom('', ' ', '.', '..', '../etc', '-a', 'a b', 'a/b', 'a%2Fb', '\u0000', 'é', '\ud800', '💥', 'a'.repeat(129), 'x'.repeat(5000),
    'true', 'null', '0', '[]', '{}', ...POLLUTING_KEYS),
  fc.string({ unit: 'grapheme', maxLength: 8 })
)

export const anyKey: fc.Arbitrary<string> = fc.oneof(
  { arbitrary: fc.constantFrom(...POLLUTING_KEYS), weight: 2 },
  { arbitrary: fc.string({ maxLength: 8 }), weight: 2 },
  { arbitrary: fc.constantFrom('name', 'size', 'block_size', 'used_size', 'blocks', 'locations', 'hypervisors', 'format', 'revision',
    'generation', 'start', 'end', 'location', 'hypervisor', 'synced', 'sync_status', 'out_of_sync'), weight: 2 }
)

/**
 * Nesting depth: shallow mostly, then around where JSON.stringify runs out
 * of stack (a few thousand levels), then far beyond it.
 */
export const depth: fc.Arbitrary<number> = fc.oneof(
  { arbitrary: fc.integer({ min: 1, max: 40 }), weight: 40 },
  { arbitrary: fc.integer({ min: 100, max: 6000 }), weight: 30 },
  { arbitrary: fc.constant(10_000), weight: 6 },
  { arbitrary: fc.constant(50_000), weight: 2 },
  { arbitrary: fc.constant(200_000), weight: 1 }
)

const rawText: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom('', ' ', '{', '[', '{"a":', '{"a" 1}', '[1,]', 'nul', 'NaN', 'Infinity', '01', '"\\x"', '"\\ud800"', '{"a":1}{', '\ufeff{}', '/*c*/{}'),
  fc.string({ maxLength: 16 })
)

export interface JsonArbs {
  leaf: fc.Arbitrary<J>
  value: fc.Arbitrary<J>
  deep: fc.Arbitrary<J>
}

function makeJson (): JsonArbs {
  const leaf: fc.Arbitrary<J> = fc.oneof(
    fc.constantFrom(lit('null'), lit('true'), lit('false')),
    numberText.map(lit),
    oddString.map(str)
  )
  const deepOf = (inner: fc.Arbitrary<J>): fc.Arbitrary<J> => fc.record({
    t: fc.constant('deep' as const), depth, kind: fc.constantFrom('arr' as const, 'obj' as const), key: anyKey, leaf: inner
  })
  const { value } = fc.letrec<{ value: J }>((tie) => ({
    value: fc.oneof({ depthSize: 'small', withCrossShrink: true },
      { arbitrary: leaf, weight: 5 },
      { arbitrary: fc.array(tie('value'), { maxLength: 4 }).map(arr), weight: 2 },
      { arbitrary: fc.array(fc.tuple(anyKey, tie('value')), { maxLength: 4 }).map((entries): J => ({ t: 'obj', entries })), weight: 2 },
      { arbitrary: deepOf(leaf), weight: 1 }
    )
  }))
  return { leaf, value, deep: deepOf(value) }
}

export const json = makeJson()

type JOp =
  | { op: 'replace', at: number, value: J }
  | { op: 'add', at: number, key: string, value: J }
  | { op: 'remove', at: number }
  | { op: 'dupKey', at: number, value: J }
  | { op: 'wrap', at: number, kind: 'arr' | 'obj', depth: number, key: string }
  | { op: 'raw', at: number, text: string }

const jOp: fc.Arbitrary<JOp> = fc.oneof(
  { arbitrary: fc.record({ op: fc.constant('replace' as const), at: fc.nat(), value: json.value }), weight: 5 },
  { arbitrary: fc.record({ op: fc.constant('add' as const), at: fc.nat(), key: anyKey, value: json.value }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('remove' as const), at: fc.nat() }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('dupKey' as const), at: fc.nat(), value: json.value }), weight: 1 },
  { arbitrary: fc.record({ op: fc.constant('wrap' as const), at: fc.nat(), kind: fc.constantFrom('arr' as const, 'obj' as const), depth, key: anyKey }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('raw' as const), at: fc.nat(), text: rawText }), weight: 1 }
)

const clone = (j: J): J => structuredClone(j)

/** Every node of a tree with a way to replace it, in pre-order. */
function slots (root: { v: J }): Array<{ get: () => J, set: (v: J) => void }> {
  const out: Array<{ get: () => J, set: (v: J) => void }> = []
  const visit = (get: () => J, set: (v: J) => void): void => {
    out.push({ get, set })
    const n = get()
    if (n.t === 'arr') n.items.forEach((_, i) => visit(() => n.items[i]!, (v) => { n.items[i] = v }))
    else if (n.t === 'obj') n.entries.forEach((e) => visit(() => e[1], (v) => { e[1] = v }))
    else if (n.t === 'deep') visit(() => n.leaf, (v) => { n.leaf = v })
  }
  visit(() => root.v, (v) => { root.v = v })
  return out
}

/** Applies one change to `doc` in place; what it inserts is copied (generated values are shared and must stay as generated). */
function applyJOp (doc: J, o: JOp): J {
  const root = { v: doc }
  const all = slots(root)
  const s = all[o.at % all.length]!
  const n = s.get()
  switch (o.op) {
    case 'replace': s.set(clone(o.value)); break
    case 'add':
      if (n.t === 'obj') n.entries.splice(o.at % (n.entries.length + 1), 0, [o.key, clone(o.value)])
      else if (n.t === 'arr') n.items.splice(o.at % (n.items.length + 1), 0, clone(o.value))
      else s.set(clone(o.value))
      break
    case 'remove':
      if (n.t === 'obj' && n.entries.length > 0) n.entries.splice(o.at % n.entries.length, 1)
      else if (n.t === 'arr' && n.items.length > 0) n.items.splice(o.at % n.items.length, 1)
      break
    case 'dupKey':
      if (n.t === 'obj' && n.entries.length > 0) n.entries.push([n.entries[o.at % n.entries.length]![0], clone(o.value)])
      break
    case 'wrap': s.set({ t: 'deep', depth: o.depth, kind: o.kind, key: o.key, leaf: n }); break
    case 'raw': {
      // Cut the whole text somewhere and append junk: not JSON any more (mostly).
      const text = render(root.v)
      root.v = { t: 'raw', text: text.slice(0, o.at % (text.length + 1)) + o.text }
    }
  }
  return root.v
}

/**
 * Documents that are valid (sometimes), valid with one to three changes
 * (mostly), or anything at all.
 */
export function mutatedJson (valid: fc.Arbitrary<J>): fc.Arbitrary<J> {
  return fc.oneof(
    { arbitrary: valid, weight: 2 },
    { arbitrary: fc.tuple(valid, fc.array(jOp, { minLength: 1, maxLength: 3 })).map(([d, ops]) => ops.reduce(applyJOp, clone(d))), weight: 6 },
    { arbitrary: json.value, weight: 1 },
    { arbitrary: json.deep, weight: 1 }
  )
}

// ---------------------------------------------------------------------------
// Printing

/** Long runs of one character or pair shown once with a count: `[×5000`. */
export function compact (text: string, max = 600): string {
  const runs = text.replace(/(.{1,3}?)\1{15,}/gs, (m, unit: string) => `⟨${unit}×${m.length / unit.length}⟩`)
  return runs.length > max ? `${runs.slice(0, max)}… (${text.length} chars in all)` : runs
}

export const showJson = (j: J): string => compact(render(j))

export function hex (b: Buffer, max = 160): string {
  const h = b.subarray(0, max).toString('hex')
  return b.length > max ? `${h}… (${b.length} bytes)` : `${h} (${b.length} bytes)`
}

/** `arb` one time in `oneIn`, else null (fc.option's `freq` is the other way round). */
export function rarely<V> (arb: fc.Arbitrary<V>, oneIn: number): fc.Arbitrary<V | null> {
  return fc.oneof({ arbitrary: fc.constant(null), weight: oneIn - 1 }, { arbitrary: arb, weight: 1 })
}
