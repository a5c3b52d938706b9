/**
 * The move's rate (the control-api fuzz target's finding: a move at 1
 * byte per second of an image with data ran on in the node with no end in
 * sight, holding the image, so that nothing could destroy it and a second
 * move of it followed the first one for ever).
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { UkaiError } from '../errors.js'
import { MIN_MOVE_RATE, checkMoveRate, moveImage, type MoveHost } from './move.js'

/** A host whose metadata read is where a move starts work: reaching it means the request was accepted. */
function host (): MoveHost & { reached: number } {
  const h = {
    reached: 0,
    defaultPort: 22222,
    meta: async () => { h.reached++; throw new UkaiError('UKAI_ERR_NOT_FOUND', 'reached') },
    addLocation: async () => { throw new Error('not expected') },
    removeLocation: async () => { throw new Error('not expected') },
    sync: async () => { throw new Error('not expected') }
  }
  return h
}

test('a move slower than MIN_MOVE_RATE is refused before it starts, as bad input', async () => {
  for (const rate of [1, 0.5, 4096, MIN_MOVE_RATE - 1, 0, -1, Number.NaN, Infinity]) {
    const h = host()
    await assert.rejects(moveImage(h, 'vm', { to: '127.0.0.1:9', rate }, () => {}), (err: UkaiError) => {
      assert.equal(err.code, 'UKAI_ERR_INVALID_ARGUMENT', String(rate))
      assert.match(err.message, /at least 1048576 \(1M\)/)
      return true
    })
    assert.equal(h.reached, 0, `rate ${rate}: nothing started`)
  }
  assert.throws(() => checkMoveRate('100M'), /bytes per second/)
  // What the request held is shown, whatever it is (the fuzz target's rate {"toString": ""} and one nested 3,165 lists deep).
  assert.throws(() => checkMoveRate({ toString: '' }), (err: UkaiError) => err.code === 'UKAI_ERR_INVALID_ARGUMENT')
  let deep: unknown = null
  for (let i = 0; i < 100_000; i++) deep = [deep]
  assert.throws(() => checkMoveRate(deep), (err: UkaiError) => err.code === 'UKAI_ERR_INVALID_ARGUMENT')
})

test('a move at MIN_MOVE_RATE or faster, or without a rate, goes ahead', async () => {
  for (const rate of [MIN_MOVE_RATE, 100 * MIN_MOVE_RATE, undefined]) {
    const h = host()
    await assert.rejects(moveImage(h, 'vm', { to: '127.0.0.1:9', ...(rate !== undefined ? { rate } : {}) }, () => {}), /reached/)
    assert.equal(h.reached, 1)
  }
})
