/**
 * Fuzzing the option and request parsers through a live server: random
 * bytes and mutated (flipped, cut, extended) well-formed frames, sent in
 * random pieces. Whatever arrives, the connection must end cleanly once
 * the client leaves, the node must stay up, and afterwards a well-formed
 * client must be served correctly with every image released.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import fc from 'fast-check'
import { TestClient, descriptors, enterTransmission, sendInPieces, startNbd, until, type NbdFixture } from '../../../test/helpers/nbd.js'
import { encodeClientFlags, encodeInfoRequest, encodeMetaContextRequest, encodeOption } from './options.js'
import { BASE_ALLOCATION, MAX_PAYLOAD, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLUSH, NBD_CMD_WRITE } from './protocol.js'
import { encodeRequest } from './requests.js'

const SIZE = 1 << 20
const BLOCK = 64 * 1024

/** Frames as made, or with some bytes flipped, cut short, or extended with junk. */
const mutated = (frames: fc.Arbitrary<Buffer>): fc.Arbitrary<Buffer> => fc.oneof(
  { arbitrary: frames, weight: 3 },
  { arbitrary: fc.tuple(frames, fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { minLength: 1, maxLength: 4 })).map(([b, flips]) => {
    const out = Buffer.from(b)
    if (out.length > 0) for (const [at, x] of flips) out[at % out.length] ^= x
    return out
  }), weight: 2 },
  { arbitrary: fc.tuple(frames, fc.nat()).map(([b, cut]) => b.subarray(0, cut % (b.length + 1))), weight: 1 },
  { arbitrary: fc.tuple(frames, fc.uint8Array({ minLength: 1, maxLength: 64 })).map(([b, junk]) => Buffer.concat([b, Buffer.from(junk)])), weight: 1 }
)

const u32 = fc.integer({ min: 0, max: 0xffffffff })
const exportName = fc.oneof(fc.constantFrom('fuzz', '', 'nope', 'replica/fuzz', '../fuzz'), fc.string({ maxLength: 12 }))

/** One option frame; the length field is usually right. */
const optionFrame: fc.Arbitrary<Buffer> = fc.tuple(
  fc.oneof(fc.integer({ min: 0, max: 12 }), u32),
  fc.oneof(
    fc.constant(Buffer.alloc(0)),
    fc.tuple(exportName, fc.array(fc.integer({ min: 0, max: 5 }), { maxLength: 4 })).map(([n, infos]) => encodeInfoRequest(n, infos)),
    fc.tuple(exportName, fc.array(fc.oneof(fc.constantFrom(BASE_ALLOCATION, 'base:', 'qemu:x'), fc.string({ maxLength: 10 })), { maxLength: 3 }))
      .map(([n, q]) => encodeMetaContextRequest(n, q)),
    exportName.map((n) => Buffer.from(n)),
    fc.uint8Array({ maxLength: 40 }).map((a) => Buffer.from(a))
  ),
  fc.option(u32, { freq: 8 })
).map(([option, data, badLength]) => {
  const frame = encodeOption(option, data)
  if (badLength !== null) frame.writeUInt32BE(badLength, 12)
  return frame
})

const handshake: fc.Arbitrary<Buffer> = fc.oneof(
  fc.uint8Array({ maxLength: 200 }).map((a) => Buffer.from(a)),
  mutated(fc.tuple(fc.constantFrom(0, 1, 2, 3, 4, 0xffffffff), fc.array(optionFrame, { maxLength: 6 }))
    .map(([flags, opts]) => Buffer.concat([encodeClientFlags(flags), ...opts])))
)

/** The handshake of a client that enters transmission on 'fuzz'. */
const enter = (structured: boolean, byName: boolean): Buffer => enterTransmission('fuzz', structured, byName)

/** One request frame, a WRITE with a payload of the claimed length or not. */
const requestFrame: fc.Arbitrary<Buffer> = fc.record({
  type: fc.oneof({ arbitrary: fc.integer({ min: 0, max: 9 }), weight: 5 }, { arbitrary: fc.integer({ min: 0, max: 0xffff }), weight: 1 }),
  flags: fc.oneof({ arbitrary: fc.constant(0), weight: 4 }, { arbitrary: fc.integer({ min: 0, max: 31 }), weight: 2 }, { arbitrary: fc.integer({ min: 0, max: 0xffff }), weight: 1 }),
  cookieHi: u32,
  cookieLo: u32,
  offset: fc.oneof(fc.integer({ min: 0, max: SIZE }), fc.constantFrom(0, SIZE - 1, SIZE, 2 ** 53 - 1)),
  length: fc.oneof(fc.integer({ min: 0, max: 4096 }), fc.constantFrom(0, 1, SIZE, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xffffffff)),
  payload: fc.option(fc.integer({ min: 0, max: 5000 }), { freq: 4 })
}).map((r) => {
  const header = encodeRequest(r)
  if (r.type !== NBD_CMD_WRITE) return header
  const n = r.payload ?? Math.min(r.length, 8192)
  return Buffer.concat([header, Buffer.alloc(n, 0x5a)])
})

const transmission: fc.Arbitrary<Buffer> = fc.tuple(
  fc.boolean(), fc.boolean(),
  fc.oneof(
    fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)),
    mutated(fc.array(requestFrame, { minLength: 1, maxLength: 8 }).map((fs) => Buffer.concat(fs)))
  )
).map(([structured, byName, tail]) => Buffer.concat([enter(structured, byName), tail]))

describe('NBD parsers under fuzzing', { timeout: 300_000 }, () => {
  let fx: NbdFixture
  /** Internal errors the server reported (a bug, even if it kept the node up). */
  const warnings: string[] = []

  before(async () => {
    fx = await startNbd()
    fx.node.on('warning', (m: string) => warnings.push(m))
    await fx.node.createImage({ name: 'fuzz', size: SIZE, block_size: BLOCK })
    await fx.node.createImage({ name: 'disk', size: SIZE, block_size: BLOCK })
  })
  after(async () => { await fx?.cleanup() })

  /**
   * Sends `bytes` in the given pieces, then closes the sending side; the
   * server must then close the connection. Replies are read and dropped.
   */
  const exchange = async (bytes: Buffer, pieces: number[]): Promise<void> => {
    const { closed } = await sendInPieces(fx.socket, bytes, pieces)
    let timer: NodeJS.Timeout | undefined
    await Promise.race([closed, new Promise((_resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`the server kept the connection open after the client left (${bytes.length} bytes: ${bytes.subarray(0, 64).toString('hex')})`)), 20_000)
    })]).finally(() => clearTimeout(timer))
  }

  /** After the storm: a well-formed client is served, and nothing is left open. */
  const wellFormed = async (): Promise<void> => {
    await until(() => fx.server.connectionCount === 0, 'every fuzzing connection to end')
    assert.deepEqual(warnings, [], 'no internal error on any connection')
    assert.equal(fx.node.isOpen('fuzz'), false, 'the fuzzed image was released')
    const c = await TestClient.connect(fx.socket)
    try {
      await c.greet()
      await c.go('disk')
      const data = randomBytes(3 * BLOCK + 5)
      assert.equal((await c.writeAt(BLOCK - 7, data)).error, 0)
      assert.equal((await c.send(NBD_CMD_FLUSH)).error, 0)
      const r = await c.read(BLOCK - 7, data.length)
      assert.ok(r.data?.equals(data), 'data read back after fuzzing')
      const st = await c.send(NBD_CMD_BLOCK_STATUS, { offset: 0, length: SIZE })
      assert.equal(st.error, 0)
      assert.ok(descriptors(st).length > 0)
    } finally { await c.close() }
  }

  const pieces = fc.array(fc.integer({ min: 1, max: 64 }), { maxLength: 6 })

  test('option haggling: random and mutated option frames', async () => {
    await fc.assert(fc.asyncProperty(handshake, pieces, async (bytes, p) => {
      await exchange(bytes, p)
      assert.deepEqual(warnings, [])
    }), { numRuns: 250 })
    await wellFormed()
  })

  test('transmission: random and mutated request frames after a valid handshake', async () => {
    await fc.assert(fc.asyncProperty(transmission, pieces, async (bytes, p) => {
      await exchange(bytes, p)
      assert.deepEqual(warnings, [])
    }), { numRuns: 250 })
    // The frames reached the volume, not only the parser.
    const stats = fx.node.stats('fuzz')
    assert.ok(stats.writes > 0 && stats.reads > 0, `fuzzing wrote ${stats.writes} and read ${stats.reads} times`)
    await wellFormed()
  })
})
