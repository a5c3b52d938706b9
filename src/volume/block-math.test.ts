import { test, describe } from 'node:test'
import assert from 'node:assert/strict'
import fc from 'fast-check'
import { blockSpan, splitRange, type Piece } from './block-math.js'

/** The model: walk the range byte by byte, starting a new piece at each block change. */
function naiveSplit (offset: number, length: number, blockSize: number, limit: number): Piece[] {
  const pieces: Piece[] = []
  for (let pos = offset; pos < offset + length && pos < limit; pos++) {
    const block = Math.floor(pos / blockSize)
    const last = pieces[pieces.length - 1]
    if (last !== undefined && last.block === block) last.length++
    else pieces.push({ block, offset: pos - block * blockSize, length: 1, bufferOffset: pos - offset })
  }
  return pieces
}

describe('splitRange', () => {
  test('matches the byte-by-byte model', () => {
    fc.assert(fc.property(
      fc.integer({ min: 0, max: 600 }),
      fc.integer({ min: 0, max: 400 }),
      fc.integer({ min: 1, max: 70 }),
      fc.integer({ min: 0, max: 1000 }),
      (offset, length, blockSize, limit) => {
        assert.deepEqual(splitRange(offset, length, blockSize, limit), naiveSplit(offset, length, blockSize, limit))
      }), { numRuns: 2000 })
  })

  test('images with a last partial block: the limit is the image size or used_size', () => {
    // size = blocks * blockSize - tail: the last block is short, and nothing past size is produced.
    fc.assert(fc.property(
      fc.integer({ min: 1, max: 20 }), fc.integer({ min: 2, max: 64 }), fc.nat(), fc.nat(), fc.nat(), fc.nat(),
      (blocks, blockSize, tailSeed, offSeed, lenSeed, usedSeed) => {
        const size = blocks * blockSize - (tailSeed % blockSize)
        const used = usedSeed % (size + 1)
        const offset = offSeed % (size + blockSize)
        const length = lenSeed % (2 * size)
        for (const limit of [size, used]) {
          const pieces = splitRange(offset, length, blockSize, limit)
          assert.deepEqual(pieces, naiveSplit(offset, length, blockSize, limit))
          const total = pieces.reduce((n, p) => n + p.length, 0)
          assert.equal(total, Math.max(0, Math.min(offset + length, limit) - offset))
          for (const p of pieces) {
            assert.ok(p.length > 0)
            assert.ok(p.offset + p.length <= blockSize)
            assert.ok(p.block * blockSize + p.offset + p.length <= limit)
          }
        }
      }), { numRuns: 1000 })
  })

  test('pieces tile the clipped range in order, at image scale', () => {
    const MiB = 2 ** 20
    fc.assert(fc.property(
      fc.integer({ min: 0, max: 2 ** 42 }), fc.integer({ min: 0, max: 64 * MiB }),
      fc.constantFrom(4096, MiB, 64 * MiB, 50_000_000), fc.integer({ min: 0, max: 2 ** 42 + 64 * MiB }),
      (offset, length, blockSize, limit) => {
        const pieces = splitRange(offset, length, blockSize, limit)
        let pos = offset
        for (const p of pieces) {
          assert.equal(p.bufferOffset, pos - offset)
          assert.equal(p.block * blockSize + p.offset, pos)
          assert.ok(p.offset >= 0 && p.offset < blockSize)
          assert.ok(p.length > 0 && p.offset + p.length <= blockSize)
          pos += p.length
        }
        assert.equal(pos, Math.max(offset, Math.min(offset + length, limit)))
        // Every piece but the first starts at a block boundary; every piece but the last ends at one.
        pieces.slice(1).forEach((p) => assert.equal(p.offset, 0))
        pieces.slice(0, -1).forEach((p) => assert.equal(p.offset + p.length, blockSize))
      }), { numRuns: 1000 })
  })

  test('examples', () => {
    assert.deepEqual(splitRange(0, 10, 4, 100), [
      { block: 0, offset: 0, length: 4, bufferOffset: 0 },
      { block: 1, offset: 0, length: 4, bufferOffset: 4 },
      { block: 2, offset: 0, length: 2, bufferOffset: 8 }
    ])
    assert.deepEqual(splitRange(3, 2, 4, 100), [
      { block: 0, offset: 3, length: 1, bufferOffset: 0 },
      { block: 1, offset: 0, length: 1, bufferOffset: 1 }
    ])
    // Clipped at the limit (used_size 6): the read is short.
    assert.deepEqual(splitRange(3, 10, 4, 6), [
      { block: 0, offset: 3, length: 1, bufferOffset: 0 },
      { block: 1, offset: 0, length: 2, bufferOffset: 1 }
    ])
    // Entirely past the limit, or empty.
    assert.deepEqual(splitRange(6, 10, 4, 6), [])
    assert.deepEqual(splitRange(60, 10, 4, 6), [])
    assert.deepEqual(splitRange(2, 0, 4, 6), [])
    assert.deepEqual(splitRange(0, 10, 4, 0), [])
    // The seed's image: the last of 160 blocks of 50,000,000 bytes.
    assert.deepEqual(splitRange(8_000_000_000 - 10, 100, 50_000_000, 8_000_000_000), [
      { block: 159, offset: 49_999_990, length: 10, bufferOffset: 0 }
    ])
  })
})

describe('blockSpan', () => {
  test('is the set of blocks the range touches', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 600 }), fc.integer({ min: 0, max: 400 }), fc.integer({ min: 1, max: 70 }),
      (offset, length, blockSize) => {
        const [first, end] = blockSpan(offset, length, blockSize)
        const touched = naiveSplit(offset, length, blockSize, Infinity).map((p) => p.block)
        if (length === 0) {
          assert.equal(first, end)
          assert.equal(first, Math.floor(offset / blockSize))
        } else {
          assert.deepEqual(Array.from({ length: end - first }, (_, i) => first + i), touched)
        }
      }), { numRuns: 1000 })
  })
})
