import { test } from 'node:test'
import assert from 'node:assert/strict'
import fc from 'fast-check'
import { transmissionFlags } from './handshake.js'
import {
  MAX_PAYLOAD, NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_RESIZE, NBD_CMD_TRIM,
  NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_EPERM, NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_TRIM, NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR, NBD_REQUEST_SIZE
} from './protocol.js'
import {
  allocOffsetData, allocSimpleRead, encodeBlockStatus, encodeSimpleReply, encodeStructuredError, parseReplyHeader
} from './replies.js'
import { encodeRequest, parseRequest, validateRequest, type NbdRequest, type SessionState } from './requests.js'

const SIZE = 1 << 20
const rw: SessionState = { size: SIZE, flags: transmissionFlags(false, true), structured: true, allocationContext: 1 }
const ro: SessionState = { size: SIZE, flags: transmissionFlags(true, false), structured: false, allocationContext: undefined }
const req = (type: number, o: Partial<NbdRequest> = {}): NbdRequest =>
  ({ type, flags: 0, offset: 0, length: 512, cookieHi: 1, cookieLo: 2, ...o })
const errorOf = (r: NbdRequest, s: SessionState): number => validateRequest(r, s)?.error ?? 0

test('request header: magic, flags, type, cookie, 64-bit offset, length', () => {
  const r = req(NBD_CMD_WRITE, { flags: NBD_CMD_FLAG_FUA, offset: 2 ** 40 + 7, length: 4096, cookieHi: 0xffffffff, cookieLo: 0x80000001 })
  const b = encodeRequest(r)
  assert.equal(b.length, NBD_REQUEST_SIZE)
  assert.deepEqual(parseRequest(b), r)
  const bad = Buffer.from(b)
  bad[0] ^= 0x80
  assert.equal(parseRequest(bad), undefined)
  // An offset of 2^64 - 1 is far past any export: it parses, then fails the range check.
  b.fill(0xff, 16, 24)
  const huge = parseRequest(b)!
  assert.ok(huge.offset > Number.MAX_SAFE_INTEGER)
  assert.equal(errorOf({ ...huge, type: NBD_CMD_READ, flags: 0 }, rw), NBD_EINVAL)
})

test('transmission flags: only what is implemented; writing features only when writable', () => {
  const w = transmissionFlags(false, false)
  assert.equal(w & NBD_FLAG_READ_ONLY, 0)
  assert.notEqual(w & NBD_FLAG_SEND_TRIM, 0)
  assert.notEqual(w & NBD_FLAG_SEND_FAST_ZERO, 0)
  assert.equal(w & NBD_FLAG_SEND_DF, 0, 'DF only with structured replies')
  assert.notEqual(transmissionFlags(false, true) & NBD_FLAG_SEND_DF, 0)
  const r = transmissionFlags(true, false)
  assert.notEqual(r & NBD_FLAG_READ_ONLY, 0)
  assert.equal(r & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_FAST_ZERO), 0)
  assert.notEqual(r & NBD_FLAG_CAN_MULTI_CONN, 0)
  assert.equal(w & NBD_FLAG_CAN_MULTI_CONN, 0)
})

test('validation: the spec\'s "Error values" for each kind of bad request', () => {
  // Valid requests.
  for (const r of [
    req(NBD_CMD_READ, { offset: SIZE - 512 }), req(NBD_CMD_WRITE, { flags: NBD_CMD_FLAG_FUA }), req(NBD_CMD_FLUSH, { length: 0 }),
    req(NBD_CMD_TRIM, { length: SIZE }), req(NBD_CMD_WRITE_ZEROES, { flags: NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_FUA }),
    req(NBD_CMD_BLOCK_STATUS, { flags: NBD_CMD_FLAG_REQ_ONE }), req(NBD_CMD_READ, { flags: NBD_CMD_FLAG_DF }),
    req(NBD_CMD_READ, { length: 0 }), req(NBD_CMD_READ, { flags: NBD_CMD_FLAG_FUA })
  ]) assert.equal(validateRequest(r, rw), undefined, `refused ${JSON.stringify(r)}`)

  const table: Array<[NbdRequest, SessionState, number]> = [
    // "The server SHOULD return NBD_EINVAL if it receives an unknown command."
    [req(NBD_CMD_CACHE), rw, NBD_EINVAL], [req(NBD_CMD_RESIZE), rw, NBD_EINVAL], [req(200), rw, NBD_EINVAL],
    // Unknown flags and flags not documented for the command.
    [req(NBD_CMD_READ, { flags: 1 << 9 }), rw, NBD_EINVAL], [req(NBD_CMD_WRITE, { flags: NBD_CMD_FLAG_NO_HOLE }), rw, NBD_EINVAL],
    [req(NBD_CMD_READ, { flags: NBD_CMD_FLAG_REQ_ONE }), rw, NBD_EINVAL], [req(NBD_CMD_TRIM, { flags: NBD_CMD_FLAG_DF }), rw, NBD_EINVAL],
    // DF needs NBD_FLAG_SEND_DF (structured replies).
    [req(NBD_CMD_READ, { flags: NBD_CMD_FLAG_DF }), ro, NBD_EINVAL],
    // Past the end: read, trim and block status EINVAL; write and write zeroes ENOSPC.
    [req(NBD_CMD_READ, { offset: SIZE - 511 }), rw, NBD_EINVAL], [req(NBD_CMD_TRIM, { offset: SIZE }), rw, NBD_EINVAL],
    [req(NBD_CMD_BLOCK_STATUS, { offset: SIZE }), rw, NBD_EINVAL],
    [req(NBD_CMD_WRITE, { offset: SIZE - 1 }), rw, NBD_ENOSPC], [req(NBD_CMD_WRITE_ZEROES, { offset: SIZE, length: 1 }), rw, NBD_ENOSPC],
    // Read-only: writes, trims and zeroes are EPERM.
    [req(NBD_CMD_WRITE), ro, NBD_EPERM], [req(NBD_CMD_TRIM), ro, NBD_EPERM], [req(NBD_CMD_WRITE_ZEROES), ro, NBD_EPERM],
    // Flush: offset and length "MUST be set to all-zero".
    [req(NBD_CMD_FLUSH, { length: 1 }), rw, NBD_EINVAL],
    // Block status: needs a context, and a length.
    [req(NBD_CMD_BLOCK_STATUS), { ...rw, allocationContext: undefined }, NBD_EINVAL], [req(NBD_CMD_BLOCK_STATUS, { length: 0 }), rw, NBD_EINVAL],
    // Payloads past the maximum: a write EINVAL, a read EOVERFLOW (structured) or EINVAL (simple).
    [req(NBD_CMD_WRITE, { length: MAX_PAYLOAD + 1 }), { ...rw, size: 2 ** 30 }, NBD_EINVAL],
    [req(NBD_CMD_READ, { length: MAX_PAYLOAD + 1 }), { ...rw, size: 2 ** 30 }, NBD_EOVERFLOW],
    [req(NBD_CMD_READ, { length: MAX_PAYLOAD + 1 }), { ...ro, size: 2 ** 30 }, NBD_EINVAL],
    // FAST_ZERO only when NBD_FLAG_SEND_FAST_ZERO was sent.
    [req(NBD_CMD_WRITE_ZEROES, { flags: NBD_CMD_FLAG_FAST_ZERO }), { ...rw, flags: rw.flags & ~NBD_FLAG_SEND_FAST_ZERO }, NBD_EINVAL]
  ]
  for (const [r, s, want] of table) assert.equal(errorOf(r, s), want, `${JSON.stringify(r)} -> ${JSON.stringify(validateRequest(r, s))}`)
  // Trims and zeroes of any length within the export are fine (no payload).
  assert.equal(validateRequest(req(NBD_CMD_WRITE_ZEROES, { length: 0xffffffff }), { ...rw, size: 2 ** 33 }), undefined)
})

test('fuzz: parse(encode(r)) is r, and the validator never throws and never passes a range past the end', () => {
  const request = fc.record({
    type: fc.integer({ min: 0, max: 0xffff }),
    flags: fc.integer({ min: 0, max: 0xffff }),
    cookieHi: fc.integer({ min: 0, max: 0xffffffff }),
    cookieLo: fc.integer({ min: 0, max: 0xffffffff }),
    offset: fc.oneof(fc.integer({ min: 0, max: 2 * SIZE }), fc.constantFrom(0, SIZE, SIZE - 1, 2 ** 53 - 1)),
    length: fc.oneof(fc.integer({ min: 0, max: 2 * SIZE }), fc.constantFrom(0, 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xffffffff))
  })
  fc.assert(fc.property(request, fc.boolean(), (r, readOnly) => {
    assert.deepEqual(parseRequest(encodeRequest(r)), r)
    const s = readOnly ? ro : rw
    const v = validateRequest(r, s)
    if (v === undefined && r.type !== NBD_CMD_FLUSH) assert.ok(r.offset + r.length <= SIZE)
    if (v === undefined && readOnly) assert.ok(r.type === NBD_CMD_READ || r.type === NBD_CMD_FLUSH)
    if (v !== undefined) assert.ok([NBD_EINVAL, NBD_ENOSPC, NBD_EPERM, NBD_EOVERFLOW].includes(v.error))
  }), { numRuns: 3000 })
  fc.assert(fc.property(fc.uint8Array({ minLength: 28, maxLength: 28 }), (bytes) => {
    const r = parseRequest(Buffer.from(bytes))
    if (r !== undefined) validateRequest(r, rw)
  }))
})

test('replies: cookies echoed as sent, data after the header, errors with their message', () => {
  const c = { cookieHi: 0xdeadbeef, cookieLo: 0x01020304 }
  const s = parseReplyHeader(encodeSimpleReply(c, NBD_EPERM))!
  assert.deepEqual([s.structured, s.error, s.cookieHi, s.cookieLo], [false, NBD_EPERM, c.cookieHi, c.cookieLo])
  const read = allocSimpleRead(c, 8)
  assert.equal(read.length, 24)
  assert.equal(parseReplyHeader(read)!.error, 0)
  const data = allocOffsetData(c, NBD_REPLY_FLAG_DONE, 2 ** 33 + 5, 4)
  const h = parseReplyHeader(data)!
  assert.deepEqual([h.structured, h.length, h.flags], [true, 12, NBD_REPLY_FLAG_DONE])
  assert.equal(data.readBigUInt64BE(20), BigInt(2 ** 33 + 5))
  const e = encodeStructuredError(c, NBD_ENOSPC, 'full')
  const eh = parseReplyHeader(e)!
  assert.deepEqual([eh.type, eh.length, eh.flags], [NBD_REPLY_TYPE_ERROR, 10, NBD_REPLY_FLAG_DONE])
  assert.equal(e.readUInt32BE(20), NBD_ENOSPC)
  assert.equal(e.subarray(26).toString(), 'full')
  const bs = encodeBlockStatus(c, NBD_REPLY_FLAG_DONE, 1, [{ length: 4096, flags: 3 }, { length: 512, flags: 0 }])
  const bh = parseReplyHeader(bs)!
  assert.deepEqual([bh.type, bh.length], [NBD_REPLY_TYPE_BLOCK_STATUS, 4 + 16])
  assert.deepEqual([bs.readUInt32BE(20), bs.readUInt32BE(24), bs.readUInt32BE(28), bs.readUInt32BE(32), bs.readUInt32BE(36)], [1, 4096, 3, 512, 0])
})
