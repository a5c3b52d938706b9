/** The fine records of the image model: what a resync of an out-of-sync block must copy. */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { GRANULE, ImageMeta, MAX_CHANGED_RANGES, validateImage } from './image.js'
import { decodeStored, encodeStored } from './codec.js'
import { decodeHeader, decodeImage, encodeImageKeys, headerKey } from './keys.js'
import { RangeSet } from './range-set.js'

const A = '10.0.0.1:22222'
const B = '10.0.0.2:22222'
const MiB = 2 ** 20
const PER = MiB / GRANULE

function image (): ImageMeta {
  const m = new ImageMeta({ name: 'vm', size: 8 * MiB, blockSize: MiB })
  m.addLocation(A, 0, 8, true)
  m.addLocation(B, 0, 8, true)
  return m
}

test('a block marked out of sync with what it missed gets a fine record of those granules', () => {
  const m = image()
  m.markOutOfSync(B, 2, RangeSet.of(2 * PER + 3, 2 * PER + 5))
  m.addChanged(B, RangeSet.of(2 * PER + 10, 2 * PER + 11))
  assert.deepEqual(m.changedIn(2, [B])?.toJSON(), [[2 * PER + 3, 2 * PER + 5], [2 * PER + 10, 2 * PER + 11]])
  assert.deepEqual(m.replicasOf(2).map((r) => r.inSync), [true, false])
  validateImage(m, 22222)
})

test('without what it missed, or once it is in sync again, a block has no fine record (copied whole)', () => {
  const m = image()
  m.markOutOfSync(B, 1, undefined)
  assert.equal(m.changedIn(1, [B]), undefined)
  // Already out of sync without a record: what it misses later adds nothing.
  m.markOutOfSync(B, 1, RangeSet.of(PER, PER + 1))
  assert.equal(m.changedIn(1, [B]), undefined)
  m.addChanged(B, RangeSet.of(PER, PER + 2))
  assert.equal(m.changedIn(1, [B]), undefined)
  m.markOutOfSync(B, 3, RangeSet.of(3 * PER, 3 * PER + 1))
  m.setSync(B, 3, 4, true)
  assert.equal(m.locations.get(B)!.fine.isEmpty, true)
  assert.equal(m.locations.get(B)!.changed.isEmpty, true)
  // A later mark starts from nothing, never from an old record.
  m.markOutOfSync(B, 3, RangeSet.of(3 * PER + 7, 3 * PER + 8))
  assert.deepEqual(m.changedIn(3, [B])?.toJSON(), [[3 * PER + 7, 3 * PER + 8]])
  // A mark of unknown extent drops the record.
  m.markOutOfSync(B, 3, undefined)
  assert.equal(m.changedIn(3, [B]), undefined)
})

test('targets of one copy: one without a record makes the block a whole copy', () => {
  const m = image()
  m.addLocation('10.0.0.3:22222', 0, 8, true)
  m.markOutOfSync(B, 0, RangeSet.of(0, 1))
  m.markOutOfSync('10.0.0.3:22222', 0, RangeSet.of(5, 6))
  assert.deepEqual(m.changedIn(0, [B, '10.0.0.3:22222'])?.toJSON(), [[0, 1], [5, 6]])
  m.dropFine('10.0.0.3:22222', 0, 1)
  assert.equal(m.changedIn(0, [B, '10.0.0.3:22222']), undefined)
})

test('a record grown past its limit falls back to whole blocks for what grew it', () => {
  const big = 256 * MiB
  const per = big / GRANULE
  const m = new ImageMeta({ name: 'vm', size: 4 * big, blockSize: big })
  m.addLocation(A, 0, 4, true)
  m.addLocation(B, 0, 4, true)
  m.markOutOfSync(B, 0, RangeSet.of(0, 1))
  m.markOutOfSync(B, 1, RangeSet.of(per, per + 1))
  const many = new RangeSet()
  for (let i = 0; i <= MAX_CHANGED_RANGES; i++) many.add(per + 2 * i, per + 2 * i + 1)
  m.addChanged(B, many)
  assert.equal(m.changedIn(1, [B]), undefined)
  assert.deepEqual(m.changedIn(0, [B])?.toJSON(), [[0, 1]])
  validateImage(m, 22222)
})

test('placement that shrinks, and images whose blocks are not whole granules, keep no records', () => {
  const m = image()
  m.markOutOfSync(B, 4, RangeSet.of(4 * PER, 4 * PER + 1))
  m.removeBlocks(B, 4, 5)
  assert.equal(m.locations.get(B)!.fine.isEmpty, true)
  const odd = new ImageMeta({ name: 'odd', size: 50_000_000, blockSize: 5_000_000 })
  odd.addLocation(A, 0, 10, true)
  odd.addLocation(B, 0, 10, true)
  odd.markOutOfSync(B, 0, RangeSet.of(0, 1))
  assert.equal(odd.changedIn(0, [B]), undefined)
})

test('validation refuses records of blocks in sync, and granules outside the records', () => {
  const m = image()
  m.locations.get(B)!.fine.add(0, 1)
  assert.throws(() => validateImage(m, 22222), /fine record of blocks \[0, 1\) that are not all out of sync/)
  const n = image()
  n.markOutOfSync(B, 0, RangeSet.of(0, 1))
  n.locations.get(B)!.changed.add(PER, PER + 1)
  assert.throws(() => validateImage(n, 22222), /changed granules \[256, 257\) outside its fine records/)
})

test('fine records survive both encodings (the stored keys and the metadata document)', () => {
  const m = image()
  m.markOutOfSync(B, 5, RangeSet.of(5 * PER + 1, 5 * PER + 9))
  m.markOutOfSync(B, 6, undefined)
  const doc = encodeStored(m)
  assert.deepEqual(doc.locations[B]!.fine, [[5, 6]])
  const back = decodeStored(JSON.parse(JSON.stringify(doc)), 22222)
  assert.deepEqual(back.changedIn(5, [B])?.toJSON(), [[5 * PER + 1, 5 * PER + 9]])
  assert.equal(back.changedIn(6, [B]), undefined)
  assert.equal(encodeStored(image()).locations[B]!.fine, undefined, 'an image without records stores none')
  const keys = encodeImageKeys(m, 'inc', 'now')
  const header = decodeHeader(keys.get(headerKey('vm'))!, 'vm')
  const segments = [...keys].filter(([k]) => k !== headerKey('vm')).map(([key, value]) => ({ key, value }))
  const decoded = decodeImage(header, segments, 7)
  assert.deepEqual(decoded.changedIn(5, [B])?.toJSON(), [[5 * PER + 1, 5 * PER + 9]])
  assert.deepEqual(decoded.locations.get(B)!.outOfSync.toJSON(), [[5, 7]])
})
