import { test } from 'node:test'
import assert from 'node:assert/strict'
import { POOLED_MAX, POOLED_MIN, PayloadPool } from './payload-pool.js'

test('payload pool: a buffer handed back is given again for the same size, once', () => {
  const pool = new PayloadPool(4 * POOLED_MIN)
  const a = pool.take(POOLED_MIN)
  assert.equal(a.length, POOLED_MIN)
  pool.give(a)
  pool.give(a)
  assert.equal(pool.idleBytes, POOLED_MIN, 'handed back twice, kept once')
  assert.equal(pool.take(2 * POOLED_MIN).buffer === a.buffer, false, 'another size gets another buffer')
  assert.equal(pool.take(POOLED_MIN), a)
  assert.notEqual(pool.take(POOLED_MIN), a, 'given out once')
  assert.equal(pool.idleBytes, 0)
})

test('payload pool: small, large and foreign buffers are left to the GC, and so is anything past the idle limit', () => {
  const pool = new PayloadPool(2 * POOLED_MIN)
  pool.give(pool.take(POOLED_MIN - 1))
  pool.give(pool.take(POOLED_MAX + 4096))
  // A view of a larger buffer is not the pool's.
  pool.give(Buffer.allocUnsafeSlow(2 * POOLED_MIN).subarray(0, POOLED_MIN))
  assert.equal(pool.idleBytes, 0)
  const bufs = [pool.take(POOLED_MIN), pool.take(POOLED_MIN), pool.take(POOLED_MIN)]
  for (const b of bufs) pool.give(b)
  assert.equal(pool.idleBytes, 2 * POOLED_MIN)
})
