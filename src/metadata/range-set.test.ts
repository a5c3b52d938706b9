import { test, describe } from 'node:test'
import assert from 'node:assert/strict'
import fc from 'fast-check'
import { RangeSet, type Range } from './range-set.js'

// The model: a plain set of block indexes in [0, N).
const N = 48

type Op = { kind: 'add' | 'remove', start: number, end: number }

const range = fc.tuple(fc.integer({ min: 0, max: N }), fc.integer({ min: 0, max: N }))
  .map(([a, b]): Range => a <= b ? [a, b] : [b, a])
const op: fc.Arbitrary<Op> = fc.tuple(fc.constantFrom('add' as const, 'add' as const, 'remove' as const), range)
  .map(([kind, [start, end]]) => ({ kind, start, end }))

function apply (model: Set<number>, o: Op): void {
  for (let x = o.start; x < o.end; x++) {
    if (o.kind === 'add') model.add(x)
    else model.delete(x)
  }
}

/** Sorted, every range non-empty, disjoint and not touching the next. */
function checkInvariant (set: RangeSet): void {
  const rs = set.toJSON()
  for (let i = 0; i < rs.length; i++) {
    const [s, e] = rs[i]!
    assert.ok(Number.isSafeInteger(s) && Number.isSafeInteger(e) && s >= 0, `bad range ${JSON.stringify(rs[i])}`)
    assert.ok(s < e, `empty range ${JSON.stringify(rs[i])} in ${JSON.stringify(rs)}`)
    if (i > 0) assert.ok(rs[i - 1]![1] < s, `ranges ${JSON.stringify(rs[i - 1])} and ${JSON.stringify(rs[i])} touch or overlap`)
  }
}

/** The model's values in [start, end) as maximal runs. */
function modelRuns (model: Set<number>, start: number, end: number): Range[] {
  const out: Range[] = []
  for (let x = start; x < end; x++) {
    if (!model.has(x)) continue
    const last = out[out.length - 1]
    if (last !== undefined && last[1] === x) last[1] = x + 1
    else out.push([x, x + 1])
  }
  return out
}

function checkAgainst (set: RangeSet, model: Set<number>, queries: Range[]): void {
  checkInvariant(set)
  for (let x = 0; x <= N + 1; x++) assert.equal(set.has(x), model.has(x), `has(${x})`)
  assert.equal(set.size, model.size)
  assert.equal(set.isEmpty, model.size === 0)
  const sorted = [...model].sort((a, b) => a - b)
  assert.equal(set.first, sorted[0])
  assert.equal(set.end, sorted.length === 0 ? undefined : sorted[sorted.length - 1]! + 1)
  assert.deepEqual([...set.values()], sorted)
  // The ranges are exactly the model's maximal runs: the representation is canonical.
  assert.deepEqual(set.toJSON(), modelRuns(model, 0, N + 2))
  for (const [s, e] of queries) {
    const inside = [...Array(e - s).keys()].map((i) => s + i)
    assert.equal(set.covers(s, e), inside.every((x) => model.has(x)), `covers(${s}, ${e})`)
    assert.equal(set.overlaps(s, e), inside.some((x) => model.has(x)), `overlaps(${s}, ${e})`)
    assert.deepEqual([...set.within(s, e)], modelRuns(model, s, e), `within(${s}, ${e})`)
  }
}

describe('RangeSet against a Set<number> model', () => {
  test('any sequence of add and remove', () => {
    fc.assert(fc.property(fc.array(op, { maxLength: 40 }), fc.array(range, { maxLength: 12 }), (ops, queries) => {
      const set = new RangeSet()
      const model = new Set<number>()
      for (const o of ops) {
        if (o.kind === 'add') assert.equal(set.add(o.start, o.end), set)
        else assert.equal(set.remove(o.start, o.end), set)
        apply(model, o)
        checkInvariant(set)
      }
      checkAgainst(set, model, queries)
    }), { numRuns: 300 })
  })

  test('addSet and removeSet are union and difference', () => {
    fc.assert(fc.property(fc.array(range, { maxLength: 8 }), fc.array(range, { maxLength: 8 }), fc.array(range, { maxLength: 8 }), (a, b, queries) => {
      const ma = new Set<number>()
      const mb = new Set<number>()
      for (const [s, e] of a) apply(ma, { kind: 'add', start: s, end: e })
      for (const [s, e] of b) apply(mb, { kind: 'add', start: s, end: e })
      const sa = new RangeSet(a)
      const sb = new RangeSet(b)
      checkAgainst(sa, ma, queries)
      checkAgainst(sa.clone().addSet(sb), new Set([...ma, ...mb]), queries)
      checkAgainst(sa.clone().removeSet(sb), new Set([...ma].filter((x) => !mb.has(x))), queries)
      // clone is independent of the original.
      const c = sa.clone()
      c.add(0, N)
      checkAgainst(sa, ma, queries)
      assert.equal(sa.equals(new RangeSet(sa.toJSON())), true)
      assert.equal(sa.equals(sb), ma.size === mb.size && [...ma].every((x) => mb.has(x)))
    }), { numRuns: 200 })
  })
})

describe('RangeSet examples', () => {
  test('adjacent ranges merge; removing the middle splits', () => {
    const s = new RangeSet([[0, 5], [5, 10]])
    assert.deepEqual(s.toJSON(), [[0, 10]])
    s.remove(3, 6)
    assert.deepEqual(s.toJSON(), [[0, 3], [6, 10]])
    s.add(3, 6)
    assert.deepEqual(s.toJSON(), [[0, 10]])
    s.add(20, 30).add(11, 19)
    assert.deepEqual(s.toJSON(), [[0, 10], [11, 19], [20, 30]])
    s.add(10, 20)
    assert.deepEqual(s.toJSON(), [[0, 30]])
  })

  test('RangeSet.of, empty ranges and empty queries', () => {
    const s = RangeSet.of(2, 4)
    assert.deepEqual(s.toJSON(), [[2, 4]])
    assert.deepEqual(RangeSet.of(3, 3).toJSON(), [])
    s.add(7, 7).remove(3, 3)
    assert.deepEqual(s.toJSON(), [[2, 4]])
    assert.equal(s.covers(9, 9), true)
    assert.equal(s.overlaps(3, 3), false)
    assert.deepEqual([...s.within(3, 3)], [])
    assert.deepEqual([...s.within(3, 2)], [])
    assert.deepEqual([...new RangeSet().within(0, 10)], [])
    assert.equal(new RangeSet().first, undefined)
    assert.equal(new RangeSet().end, undefined)
  })

  test('large indexes stay exact', () => {
    const s = RangeSet.of(0, 2 ** 32)
    assert.equal(s.size, 2 ** 32)
    s.remove(2 ** 31, 2 ** 31 + 1)
    assert.equal(s.size, 2 ** 32 - 1)
    assert.equal(s.has(2 ** 31), false)
    assert.equal(s.has(2 ** 32 - 1), true)
    assert.equal(s.covers(0, 2 ** 31), true)
    assert.equal(s.end, 2 ** 32)
  })

  test('invalid ranges throw RangeError and leave the set unchanged', () => {
    const s = RangeSet.of(1, 3)
    for (const [a, b] of [[-1, 2], [3, 2], [0.5, 2], [0, Infinity], [NaN, 1], [0, 2 ** 53]] as Range[]) {
      assert.throws(() => s.add(a, b), RangeError)
      assert.throws(() => s.remove(a, b), RangeError)
    }
    assert.throws(() => new RangeSet([[5, 4]]), /invalid block range \[5, 4\)/)
    assert.deepEqual(s.toJSON(), [[1, 3]])
  })
})
