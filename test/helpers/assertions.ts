/**
 * Small helpers shared by tests: a seeded random source (so a failing run
 * can be replayed from its seed), an assertion on UkaiError codes, and a
 * wait for a condition.
 */
import assert from 'node:assert/strict'
import { UkaiError, type ErrorCode } from '../../src/errors.js'

/** mulberry32: a small seeded PRNG returning numbers in [0, 1). */
export function prng (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6D2B79F5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** Asserts that `p` rejects with a UkaiError of `code` (and a message matching `message`). */
export async function rejectsWith (p: Promise<unknown>, code: ErrorCode, message?: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof UkaiError, `expected a UkaiError, got ${String(err)}`)
    assert.equal(err.code, code, err.message)
    if (message !== undefined) assert.match(err.message, message)
    return true
  })
}

/** Resolves once `check` answers true; fails the test ("timed out waiting: what") after `ms`. */
export async function waitUntil (what: string, check: () => Promise<boolean>, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms
  while (!await check()) {
    assert.ok(Date.now() < deadline, `timed out waiting: ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 200))
  }
}
