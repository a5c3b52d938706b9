import { test } from 'node:test'
import assert from 'node:assert/strict'
import { UnflushedGranules } from './unflushed-granules.js'

test('unflushed granules: kept per block, merged, dropped per block, and counted against the limit in all', () => {
  const u = new UnflushedGranules(3)
  assert.equal(u.add(0, [0, 2]), true)
  assert.equal(u.add(0, [2, 3]), true, 'touching ranges merge')
  assert.equal(u.add(1, [20, 21]), true)
  assert.deepEqual([...u.of(0).ranges()], [[0, 3]])
  assert.deepEqual([...u.of(1).ranges()], [[20, 21]])
  assert.deepEqual([...u.of(2).ranges()], [], 'a block never written has none')
  u.of(0).add(10, 11)
  assert.deepEqual([...u.of(0).ranges()], [[0, 3]], 'of() gives a copy')
  assert.equal(u.add(0, [5, 6]), true)
  assert.equal(u.rangeCount, 3)
  assert.equal(u.add(1, [30, 31]), false, 'past the limit, all blocks together')
  u.drop(1)
  assert.equal(u.rangeCount, 2)
  assert.deepEqual([...u.of(1).ranges()], [])
  assert.equal(u.add(2, [40, 41]), true)
})
