import { test } from 'node:test'
import assert from 'node:assert/strict'
import fc from 'fast-check'
import { FrameReader } from './frame-reader.js'

test('a frame inside one chunk is a view of it; a frame across chunks is a copy', () => {
  const r = new FrameReader()
  const a = Buffer.from('abcdef')
  const b = Buffer.from('ghij')
  r.push(a)
  r.push(b)
  const first = r.take(4)
  assert.equal(first.toString(), 'abcd')
  const spanning = r.take(4)
  assert.equal(spanning.toString(), 'efgh')
  a[0] = 0x41 // 'A'
  a[5] = 0x46 // 'F'
  assert.equal(first.toString(), 'Abcd', 'a frame inside a chunk is a view, not a copy')
  assert.equal(spanning.toString(), 'efgh', 'a frame across chunks is a copy')
  assert.equal(r.length, 2)
  assert.equal(r.peek(2).toString(), 'ij')
  assert.equal(r.length, 2, 'peek consumes nothing')
  assert.equal(r.skip(10), 2)
  assert.equal(r.length, 0)
  assert.throws(() => r.take(1), RangeError)
})

test('read waits for bytes; discard drops them as they come; end rejects a waiting reader', async () => {
  let waits = 0
  const r = new FrameReader(() => { waits++ })
  const p = r.read(5)
  r.push(Buffer.from('12'))
  r.push(Buffer.from('345'))
  assert.equal((await p).toString(), '12345')
  assert.equal(waits, 1)
  const d = r.discard(6)
  r.push(Buffer.from('abcd'))
  r.push(Buffer.from('efgh'))
  await d
  assert.equal(r.take(2).toString(), 'gh')
  const q = r.read(1)
  r.end()
  await assert.rejects(q, /closed/)
  await assert.rejects(r.read(1), /closed/)
  assert.ok(r.isEnded)
})

test('any chunking of a stream, taken in any frame sizes, gives back the stream', () => {
  fc.assert(fc.property(
    fc.uint8Array({ minLength: 0, maxLength: 600 }),
    fc.array(fc.integer({ min: 1, max: 97 }), { minLength: 1, maxLength: 40 }),
    fc.array(fc.integer({ min: 0, max: 120 }), { minLength: 1, maxLength: 40 }),
    (bytes, cuts, frames) => {
      const data = Buffer.from(bytes)
      const r = new FrameReader()
      let pos = 0
      for (let i = 0; pos < data.length; i++) {
        const n = cuts[i % cuts.length]!
        r.push(data.subarray(pos, pos + n))
        pos += n
      }
      const out: Buffer[] = []
      for (let i = 0; r.length > 0; i++) {
        const n = Math.min(frames[i % frames.length]!, r.length)
        if (i % 3 === 2) {
          const peeked = Buffer.from(r.peek(n))
          const taken = r.take(n)
          assert.ok(peeked.equals(taken))
          out.push(Buffer.from(taken))
        } else {
          out.push(Buffer.from(r.take(n)))
        }
        if (n === 0 && frames.every((f) => f === 0)) out.push(Buffer.from(r.take(r.length)))
      }
      assert.ok(Buffer.concat(out).equals(data))
    }), { numRuns: 300 })
})

test('takeInto assembles a frame piece by piece as chunks arrive, consuming only what it copies', () => {
  const r = new FrameReader()
  const out = Buffer.alloc(10)
  let at = 0
  r.push(Buffer.from('abc'))
  at += r.takeInto(out, at, 10 - at)
  assert.equal(at, 3)
  assert.equal(r.length, 0)
  r.push(Buffer.from('defg'))
  r.push(Buffer.from('hijklm'))
  at += r.takeInto(out, at, 10 - at)
  assert.equal(at, 10)
  assert.equal(out.toString(), 'abcdefghij')
  assert.equal(r.length, 3, 'the bytes after the frame stay')
  assert.equal(r.take(3).toString(), 'klm')
  assert.equal(r.takeInto(out, 0, 5), 0, 'nothing buffered: nothing copied')
})
