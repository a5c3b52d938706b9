/**
 * The move's rate (the control-api fuzz target's finding: a move at 1
 * byte per second of an image with data ran on in the node with no end in
 * sight, holding the image, so that nothing could destroy it and a second
 * move of it followed the first one for ever).
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { UkaiError } from '../errors.js'
import { ImageMeta, emptyLocation } from '../metadata/image.js'
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

/** An image of 2^28 blocks (1 TiB of 4 KiB) on 127.0.0.1:7, in sync but for `gap` (out of sync there, and nowhere else). */
function largeImage (gap?: number): ImageMeta {
  const st = emptyLocation()
  st.blocks.add(0, 2 ** 28)
  if (gap !== undefined) st.outOfSync.add(gap, gap + 1)
  return new ImageMeta({ name: 'big', size: 2 ** 40, blockSize: 4096, locations: new Map([['127.0.0.1:7', st]]) })
}

test('a move of a large image checks that every block has a copy run by run, not block by block (the control-api-large target: 2^28 blocks held the event loop for seconds)', async () => {
  let added = 0
  let looks = 0
  /** The image, counting the blocks the move looks at one by one. */
  const counted = (meta: ImageMeta): ImageMeta => {
    const of = meta.replicasOf.bind(meta)
    meta.replicasOf = (b) => { looks++; return of(b) }
    return meta
  }
  const h: MoveHost = {
    defaultPort: 22222,
    meta: async () => counted(largeImage()),
    addLocation: async () => { added++; throw new UkaiError('UKAI_ERR_NOT_FOUND', 'step') },
    removeLocation: async () => { throw new Error('not expected') },
    sync: async () => { throw new Error('not expected') }
  }
  await assert.rejects(moveImage(h, 'big', { to: '127.0.0.1:8', start: 3 }, () => {}), /step/)
  assert.equal(added, 1, 'the check passed and the first step began')
  assert.ok(looks <= 4, `${looks} blocks looked at one by one`)
  // A block out of sync on its only location: refused, naming it, even deep in the image.
  looks = 0
  h.meta = async () => counted(largeImage(2 ** 27 + 5))
  await assert.rejects(moveImage(h, 'big', { to: '127.0.0.1:8' }, () => {}), (err: UkaiError) => {
    assert.equal(err.code, 'UKAI_ERR_UNAVAILABLE')
    assert.deepEqual(err.details, { block: 2 ** 27 + 5 })
    return true
  })
  assert.equal(added, 1, 'nothing started')
  assert.ok(looks <= 4, `${looks} blocks looked at one by one`)
})
