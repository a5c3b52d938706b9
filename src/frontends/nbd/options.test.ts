import { test } from 'node:test'
import assert from 'node:assert/strict'
import fc from 'fast-check'
import {
  decodeString, encodeInfoRequest, encodeMetaContextRequest, encodeOption, encodeOptionError, encodeString,
  isOptionError, parseExportName, parseInfoRequest, parseMetaContextRequest, parseOptionHeader, parseOptionReplyHeader
} from './options.js'
import { NBD_OPT_GO, NBD_REP_ERR_INVALID, NBD_REP_ERR_UNSUP } from './protocol.js'

const u32 = (n: number): Buffer => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b }
const u16 = (n: number): Buffer => { const b = Buffer.alloc(2); b.writeUInt16BE(n); return b }

test('option header: IHAVEOPT magic, option, length; anything else is not a frame', () => {
  const frame = encodeOption(NBD_OPT_GO, Buffer.from('xyz'))
  assert.deepEqual(parseOptionHeader(frame), { option: NBD_OPT_GO, length: 3 })
  const bad = Buffer.from(frame)
  bad[3] ^= 1
  assert.equal(parseOptionHeader(bad), undefined)
  assert.equal(parseOptionHeader(frame.subarray(0, 15)), undefined)
})

test('NBD_OPT_GO data: name length, name, info count, infos; every inconsistency is NBD_REP_ERR_INVALID', () => {
  assert.deepEqual(parseInfoRequest(encodeInfoRequest('disk', [3, 1])), { name: 'disk', requests: [3, 1] })
  assert.deepEqual(parseInfoRequest(encodeInfoRequest('', [])), { name: '', requests: [] })
  const cases: Buffer[] = [
    Buffer.alloc(5), // shorter than 6
    Buffer.concat([u32(10), Buffer.from('disk'), u16(0)]), // "MUST be no larger than the option data length - 6"
    Buffer.concat([u32(4), Buffer.from('disk'), u16(2), u16(3)]), // count says 2, one given
    Buffer.concat([u32(4), Buffer.from('disk'), u16(0), u16(3)]), // trailing bytes
    Buffer.concat([u32(4), Buffer.from('di\0k'), u16(0)]), // NUL in a string
    Buffer.concat([u32(2), Buffer.from([0xc3, 0x28]), u16(0)]) // not UTF-8
  ]
  for (const c of cases) {
    const r = parseInfoRequest(c)
    assert.ok(isOptionError(r), `accepted ${c.toString('hex')}`)
    assert.equal(r.error, NBD_REP_ERR_INVALID)
  }
})

test('meta context data: queries must fit exactly in the option data', () => {
  assert.deepEqual(parseMetaContextRequest(encodeMetaContextRequest('disk', ['base:allocation', 'qemu:dirty-bitmap:x'])),
    { name: 'disk', queries: ['base:allocation', 'qemu:dirty-bitmap:x'] })
  assert.deepEqual(parseMetaContextRequest(encodeMetaContextRequest('disk', [])), { name: 'disk', queries: [] })
  const good = encodeMetaContextRequest('disk', ['base:allocation'])
  for (const cut of [3, 7, 12, good.length - 1]) assert.ok(isOptionError(parseMetaContextRequest(good.subarray(0, cut))), `cut at ${cut}`)
  assert.ok(isOptionError(parseMetaContextRequest(Buffer.concat([good, Buffer.from([0])]))), 'trailing byte')
  // A count no data could hold is refused without looping on it.
  assert.ok(isOptionError(parseMetaContextRequest(Buffer.concat([u32(0), u32(0xffffffff)]))))
  assert.ok(isOptionError(parseMetaContextRequest(Buffer.concat([u32(0), u32(1), u32(0xfffffff0)]))))
})

test('strings: at most 4096 bytes, no NUL, valid UTF-8; replies are cut at a character edge', () => {
  assert.equal(decodeString(Buffer.from('päivää')), 'päivää')
  assert.equal(decodeString(Buffer.alloc(4097, 0x61)), undefined)
  assert.equal(decodeString(Buffer.alloc(4096, 0x61))?.length, 4096)
  assert.equal(decodeString(Buffer.from([0x61, 0])), undefined)
  const long = encodeString('ä'.repeat(3000))
  assert.ok(long.length <= 4096)
  assert.equal(decodeString(long), 'ä'.repeat(2048))
  assert.ok(isOptionError(parseExportName(Buffer.from([0xff]))))
  assert.equal(parseExportName(Buffer.from('disk')), 'disk')
})

test('option error replies carry the option, the error type and the message', () => {
  const b = encodeOptionError(77, NBD_REP_ERR_UNSUP, 'no such option')
  assert.deepEqual(parseOptionReplyHeader(b), { option: 77, type: NBD_REP_ERR_UNSUP, length: 14 })
  assert.equal(b.subarray(20).toString(), 'no such option')
})

test('fuzz: the option parsers never throw, and round-trip what an encoder made', () => {
  fc.assert(fc.property(fc.uint8Array({ maxLength: 200 }), (bytes) => {
    const b = Buffer.from(bytes)
    parseInfoRequest(b)
    parseMetaContextRequest(b)
    parseExportName(b)
    parseOptionHeader(b)
  }), { numRuns: 2000 })
  const name = fc.fullUnicodeString({ maxLength: 40 }).filter((s) => !s.includes('\0'))
  fc.assert(fc.property(name, fc.array(fc.integer({ min: 0, max: 0xffff }), { maxLength: 20 }), (n, infos) => {
    assert.deepEqual(parseInfoRequest(encodeInfoRequest(n, infos)), { name: n, requests: infos })
  }))
  fc.assert(fc.property(name, fc.array(name, { maxLength: 10 }), (n, queries) => {
    assert.deepEqual(parseMetaContextRequest(encodeMetaContextRequest(n, queries)), { name: n, queries })
  }))
})
