import { test } from 'node:test'
import assert from 'node:assert/strict'
import { setTimeout as delay } from 'node:timers/promises'
import { allSettledOrThrow } from './settle.js'

test('a failure is thrown only once every other part has finished', async () => {
  let slowDone = false
  const slow = delay(30).then(() => { slowDone = true })
  const failing = Promise.reject(new Error('piece 1 failed'))
  await assert.rejects(allSettledOrThrow([failing, slow]), /piece 1 failed/)
  assert.equal(slowDone, true, 'the slow part finished before the rejection reached the caller')
})

test('the first rejection in order is the one thrown; values come in order when all succeed', async () => {
  await assert.rejects(allSettledOrThrow([delay(20).then(() => { throw new Error('first') }), Promise.reject(new Error('second'))]), /first/)
  assert.deepEqual(await allSettledOrThrow([delay(10).then(() => 1), Promise.resolve(2)]), [1, 2])
})
