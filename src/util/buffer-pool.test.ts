import { test } from 'node:test'
import assert from 'node:assert/strict'
import { BufferPool } from './buffer-pool.js'

const pool = (): BufferPool => new BufferPool({ min: 64 * 1024, max: 4 * 2 ** 20, retain: 2 * 2 ** 20 })

test('a buffer given back is handed out again for a request of its size class, and only once', () => {
  const p = pool()
  const a = p.take(100_000)
  assert.equal(a.length, 100_000)
  assert.equal(a.buffer.byteLength, 131072)
  p.give(a)
  assert.equal(p.idleBytes, 131072)
  const b = p.take(70_000)
  assert.equal(b.buffer, a.buffer, 'the same memory, for a request of the same class')
  assert.equal(b.length, 70_000)
  assert.equal(p.idleBytes, 0)
  // Given back twice by mistake: the second is ignored, so two takers never share it.
  p.give(a)
  p.give(a)
  const c = p.take(70_000)
  const d = p.take(70_000)
  assert.notEqual(c.buffer, d.buffer)
})

test('small and oversized requests are plain allocations, never pooled', () => {
  const p = pool()
  const small = p.take(4096 + 16)
  const huge = p.take(8 * 2 ** 20)
  p.give(small)
  p.give(huge)
  p.give(Buffer.alloc(128 * 1024)) // not the pool's
  assert.equal(p.idleBytes, 0)
})

test('idle bytes stay within retain', () => {
  const p = pool()
  const held = Array.from({ length: 6 }, () => p.take(512 * 1024))
  for (const b of held) p.give(b)
  assert.equal(p.idleBytes, 2 * 2 ** 20, 'four of the six kept, the rest left to the collector')
})
