import { test } from 'node:test'
import assert from 'node:assert/strict'
import { LeavingReplicas } from './leaving.js'

test('a range being left stays refused until the revision that removed it is here; a failed removal gives it back', () => {
  const l = new LeavingReplicas()
  const a = l.leave('vm', 2, 5)
  assert.deepEqual([1, 2, 4, 5].map((b) => l.has('vm', b, 10)), [false, true, true, false])
  assert.equal(l.has('other', 2, 10), false)
  a.removed(12)
  assert.equal(l.has('vm', 3, 11), true, 'the view before the removal still has the block here')
  assert.equal(l.has('vm', 3, 12), false, 'the view with the removal refuses the block for that reason')
  const b = l.leave('vm', 0, 8)
  assert.equal(l.has('vm', 7, 12), true)
  b.cancel()
  assert.equal(l.has('vm', 7, 12), false)
})
