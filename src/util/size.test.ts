import { test, describe } from 'node:test'
import assert from 'node:assert/strict'
import fc from 'fast-check'
import { UkaiError } from '../errors.js'
import { formatSize, parseSize } from './size.js'

const KiB = 2 ** 10
const MiB = 2 ** 20
const GiB = 2 ** 30
const TiB = 2 ** 40

/** Asserts `fn` throws UKAI_ERR_INVALID_ARGUMENT whose message matches `message`. */
function rejects (fn: () => unknown, message: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof UkaiError, `expected a UkaiError, got ${String(err)}`)
    assert.equal(err.code, 'UKAI_ERR_INVALID_ARGUMENT')
    assert.match(err.message, message)
    return true
  })
}

describe('parseSize', () => {
  test('plain byte counts', () => {
    assert.equal(parseSize('512'), 512)
    assert.equal(parseSize('1048576'), MiB)
    assert.equal(parseSize('512B'), 512)
    assert.equal(parseSize('  4096  '), 4096)
  })

  test('single-letter suffixes K/M/G/T are powers of 1024, in either case', () => {
    assert.equal(parseSize('4K'), 4 * KiB)
    assert.equal(parseSize('4k'), 4 * KiB)
    assert.equal(parseSize('50M'), 50 * MiB)
    assert.equal(parseSize('8G'), 8 * GiB)
    assert.equal(parseSize('8g'), 8 * GiB)
    assert.equal(parseSize('2T'), 2 * TiB)
    assert.equal(parseSize('1P'), 2 ** 50)
  })

  test('KiB, MiB ... and KB, MB ... spellings (all binary, as in qemu-img)', () => {
    assert.equal(parseSize('4KiB'), 4 * KiB)
    assert.equal(parseSize('4kib'), 4 * KiB)
    assert.equal(parseSize('64MiB'), 64 * MiB)
    assert.equal(parseSize('1GiB'), GiB)
    assert.equal(parseSize('1TiB'), TiB)
    assert.equal(parseSize('4KB'), 4 * KiB)
    assert.equal(parseSize('64MB'), 64 * MiB)
    assert.equal(parseSize('1GB'), GiB)
    assert.equal(parseSize('1TB'), TiB)
    assert.equal(parseSize('8 G'), 8 * GiB)
  })

  test('fractions that come to whole bytes', () => {
    assert.equal(parseSize('1.5G'), 1.5 * GiB)
    assert.equal(parseSize('0.5K'), 512)
    assert.equal(parseSize('2.25MiB'), 2.25 * MiB)
  })

  test('every number with every suffix', () => {
    const units: Array<[string, number]> = [
      ['', 1], ['B', 1], ['K', KiB], ['KB', KiB], ['KiB', KiB], ['M', MiB], ['MB', MiB], ['MiB', MiB],
      ['G', GiB], ['GB', GiB], ['GiB', GiB], ['T', TiB], ['TB', TiB], ['TiB', TiB]
    ]
    fc.assert(fc.property(fc.integer({ min: 1, max: 4096 }), fc.constantFrom(...units), (n, [suffix, mult]) => {
      assert.equal(parseSize(`${n}${suffix}`), n * mult)
      assert.equal(parseSize(`${n}${suffix.toLowerCase()}`), n * mult)
    }))
  })

  test('text that is not a size is rejected with a message that shows it', () => {
    for (const bad of ['', ' ', 'abc', 'G', '-1', '-1G', '+5', '1e3', '1X', '1 KiBB', '1KK', '1.', '.5', '1,5G', '0x10', '1 2', 'NaN', 'Infinity', '1iB']) {
      rejects(() => parseSize(bad), /is not a size \(examples: 8G/)
    }
    rejects(() => parseSize('five'), /size 'five' is not a size/)
  })

  test('zero is rejected', () => {
    rejects(() => parseSize('0'), /size '0' must be greater than zero/)
    rejects(() => parseSize('0G'), /must be greater than zero/)
    rejects(() => parseSize('0.0'), /must be greater than zero/)
  })

  test('sizes that are not whole bytes, or too large, are rejected', () => {
    rejects(() => parseSize('1.5'), /size '1.5' is not a whole number of bytes/)
    rejects(() => parseSize('0.3K'), /not a whole number of bytes/)
    rejects(() => parseSize('8192P'), /not a whole number of bytes below 2\^53/)
    rejects(() => parseSize('99999999999999999999'), /below 2\^53/)
  })

  test('the message and details name what was being parsed', () => {
    assert.throws(() => parseSize('lots', 'block_size'), (err: unknown) => {
      assert.ok(err instanceof UkaiError)
      assert.match(err.message, /^block_size 'lots' is not a size/)
      assert.deepEqual(err.details, { block_size: 'lots' })
      assert.equal(err.mapping.exit, 2)
      return true
    })
  })
})

describe('formatSize', () => {
  test('picks the largest binary unit', () => {
    assert.equal(formatSize(0), '0 B')
    assert.equal(formatSize(512), '512 B')
    assert.equal(formatSize(1023), '1023 B')
    assert.equal(formatSize(KiB), '1 KiB')
    assert.equal(formatSize(1536), '1.5 KiB')
    assert.equal(formatSize(64 * MiB), '64 MiB')
    assert.equal(formatSize(8 * GiB), '8 GiB')
    assert.equal(formatSize(TiB), '1 TiB')
    assert.equal(formatSize(2 ** 50), '1 PiB')
    assert.equal(formatSize(2 ** 52), '4 PiB')
  })

  test('whole multiples of a unit parse back to the same size', () => {
    fc.assert(fc.property(fc.integer({ min: 1, max: 1023 }), fc.integer({ min: 0, max: 4 }), (n, e) => {
      const bytes = n * 1024 ** e
      assert.equal(parseSize(formatSize(bytes).replace(' ', '')), bytes)
    }))
  })
})
