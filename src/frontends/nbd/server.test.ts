/**
 * The NBD server through a raw client in this process: handshake options,
 * request validation and errors, pipelining, flush and FUA, shutdown and
 * clients that leave mid-request.
 */
import { after, before, describe, test, type TestContext } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { link, lstat, readFile, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { TestClient, descriptors, startNbd, until, type NbdFixture } from '../../../test/helpers/nbd.js'
import type { ExportProvider, NbdBackend } from './exports.js'
import { encodeInfoRequest, encodeMetaContextRequest, encodeOption } from './options.js'
import {
  BASE_ALLOCATION, MAX_PAYLOAD, NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
  NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_ENOTSUP, NBD_EPERM, NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_TYPE_ERROR, NBD_REP_ACK, NBD_REP_ERR_INVALID, NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_META_CONTEXT, NBD_REP_SERVER, NBD_STATE_HOLE,
  NBD_STATE_ZERO
} from './protocol.js'
import { NbdServer, parseListenSpec } from './server.js'
import { MAX_INFLIGHT } from './transmission.js'

const MiB = 2 ** 20
const SIZE = 8 * MiB
const BLOCK = MiB

describe('NBD server', { timeout: 120_000 }, () => {
  let fx: NbdFixture
  /** A client closed when the test `t` ends (an open writer would make the next test's export read-only). */
  const opened = new Map<TestContext, TestClient[]>()
  const client = async (t: TestContext): Promise<TestClient> => {
    const c = await TestClient.connect(fx.socket)
    let list = opened.get(t)
    if (list === undefined) {
      list = []
      opened.set(t, list)
      const mine = list
      t.after(async () => await closeAll(...mine))
    }
    list.push(c)
    return c
  }
  /** Closes clients and waits until the server has ended every connection. */
  const closeAll = async (...cs: TestClient[]): Promise<void> => {
    for (const c of cs) await c.close()
    await until(() => fx.server.connectionCount === 0, 'the server to end the connections')
  }
  const blockFile = (image: string, block: number): string => join(fx.dir, 'images', image, String(block).padStart(16, '0'))
  /** Bytes a block file has allocated (its holes take none). */
  const allocated = async (path: string): Promise<number> => await stat(path).then((s) => s.blocks * 512, () => 0)

  before(async () => {
    fx = await startNbd()
    for (const name of ['disk', 'other', 'ro']) await fx.node.createImage({ name, size: SIZE, block_size: BLOCK })
  })
  after(async () => { await fx?.cleanup() })

  test('handshake: fixed newstyle greeting; LIST names the images; unknown options are NBD_REP_ERR_UNSUP and haggling goes on', async (t) => {
    const c = await client(t)
    const flags = await c.greet()
    assert.equal(flags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
    const list = await c.option(NBD_OPT_LIST)
    assert.deepEqual(list.filter((r) => r.type === NBD_REP_SERVER).map((r) => r.data.subarray(4, 4 + r.data.readUInt32BE(0)).toString()), ['disk', 'other', 'ro'])
    assert.equal(list[list.length - 1]!.type, NBD_REP_ACK)
    for (const opt of [NBD_OPT_STARTTLS, 4, 11, 999, 0x7fffffff]) {
      const r = await c.option(opt, Buffer.from('whatever'))
      assert.equal(r.length, 1)
      assert.equal(r[0]!.option, opt)
      assert.equal(r[0]!.type, NBD_REP_ERR_UNSUP)
    }
    assert.equal((await c.option(NBD_OPT_LIST, Buffer.from('x')))[0]!.type, NBD_REP_ERR_INVALID, 'LIST takes no data')
    assert.equal((await c.option(NBD_OPT_INFO, Buffer.from([0, 0, 0, 9, 1])))[0]!.type, NBD_REP_ERR_INVALID, 'malformed INFO')
    assert.equal((await c.option(NBD_OPT_INFO, encodeInfoRequest('nope', [])))[0]!.type, NBD_REP_ERR_UNKNOWN)
    assert.equal((await c.option(NBD_OPT_GO, encodeInfoRequest('', [])))[0]!.type, NBD_REP_ERR_UNKNOWN, 'no default export')
    // Too much option data: skipped unread, answered, and the next option is parsed.
    const big = await c.option(NBD_OPT_INFO, Buffer.alloc(200 * 1024))
    assert.equal(big[0]!.type, NBD_REP_ERR_TOO_BIG)
    const info = await c.option(NBD_OPT_INFO, encodeInfoRequest('disk', [NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE]))
    assert.equal(info[info.length - 1]!.type, NBD_REP_ACK)
    const types = info.filter((r) => r.type === NBD_REP_INFO).map((r) => r.data.readUInt16BE(0))
    assert.deepEqual(types.sort(), [NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE].sort())
    const bs = info.find((r) => r.data.readUInt16BE(0) === NBD_INFO_BLOCK_SIZE)!.data
    assert.deepEqual([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)], [1, 4096, MAX_PAYLOAD])
    // Still negotiating: GO works after all that.
    const { size, flags: tflags } = await c.go('disk')
    assert.equal(size, SIZE)
    assert.equal(tflags & NBD_FLAG_READ_ONLY, 0)
    assert.notEqual(tflags & NBD_FLAG_SEND_FLUSH, 0)
    assert.notEqual(tflags & NBD_FLAG_SEND_FUA, 0)
    assert.equal((await c.read(0, 512)).error, 0)
  })

  test('meta contexts: only after structured replies; base:allocation listed and selected; unknown queries ignored', async (t) => {
    const c = await client(t)
    await c.greet()
    assert.equal((await c.option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', [BASE_ALLOCATION])))[0]!.type, NBD_REP_ERR_INVALID)
    assert.equal((await c.option(NBD_OPT_STRUCTURED_REPLY))[0]!.type, NBD_REP_ACK)
    const names = (rs: Array<{ type: number, data: Buffer }>): string[] => rs.filter((r) => r.type === NBD_REP_META_CONTEXT).map((r) => r.data.subarray(4).toString())
    assert.deepEqual(names(await c.option(NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest('disk', []))), [BASE_ALLOCATION])
    assert.deepEqual(names(await c.option(NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest('disk', ['base:']))), [BASE_ALLOCATION])
    assert.deepEqual(names(await c.option(NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest('disk', ['qemu:dirty-bitmap:a']))), [])
    assert.deepEqual(names(await c.option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('disk', ['base:', 'x-y:z']))), [])
    assert.equal((await c.option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('nope', [BASE_ALLOCATION])))[0]!.type, NBD_REP_ERR_UNKNOWN)
    const set = await c.option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest('other', [BASE_ALLOCATION]))
    assert.deepEqual(names(set), [BASE_ALLOCATION])
    // Contexts were set for 'other'; the client goes to 'disk': block status is refused.
    const replies = await c.option(NBD_OPT_GO, encodeInfoRequest('disk', []))
    assert.equal(replies[replies.length - 1]!.type, NBD_REP_ACK)
    c.structured = true
    c.startTransmission()
    const r = await c.send(NBD_CMD_BLOCK_STATUS, { offset: 0, length: 4096 })
    assert.equal(r.error, NBD_EINVAL)
  })

  test('NBD_OPT_EXPORT_NAME: size, flags and 124 zero bytes unless NO_ZEROES; an unknown name ends the session', async (t) => {
    const c = await client(t)
    await c.greet(NBD_FLAG_C_FIXED_NEWSTYLE)
    c.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from('disk')))
    const reply = await c.reader.read(10 + 124)
    assert.equal(Number(reply.readBigUInt64BE(0)), SIZE)
    assert.ok(reply.subarray(10).equals(Buffer.alloc(124)))
    c.startTransmission()
    assert.equal((await c.read(0, 4096)).data?.length, 4096)

    const d = await client(t)
    await d.greet()
    d.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from('no-such-image')))
    await d.closed
    assert.equal(d.reader.length, 0, 'nothing sent before the hard disconnect')
  })

  test('NBD_OPT_ABORT is acknowledged; bad client flags and bad option magic close only that connection', async (t) => {
    const a = await client(t)
    await a.greet()
    assert.equal((await a.option(NBD_OPT_ABORT))[0]!.type, NBD_REP_ACK)
    await a.closed
    const b = await client(t)
    await b.greet(1 << 7)
    await b.closed
    const c = await client(t)
    await c.greet()
    c.write(Buffer.alloc(16, 0x42))
    await c.closed
    const ok = await client(t)
    await ok.greet()
    await ok.go('disk')
    assert.equal((await ok.read(0, 1)).error, 0)
  })

  test('read and write, simple and structured; cookies echoed; pipelined requests all answered', async (t) => {
    for (const structured of [false, true]) {
      const c = await client(t)
      await c.greet()
      await c.go('disk', { structured })
      const data = randomBytes(3 * BLOCK + 777)
      const w = await c.writeAt(BLOCK - 333, data)
      assert.equal(w.error, 0)
      const cookie: [number, number] = [0xfedcba98, 0x76543210]
      const r = await c.send(NBD_CMD_READ, { offset: BLOCK - 333, length: data.length, cookie })
      assert.deepEqual([r.cookieHi, r.cookieLo], cookie)
      assert.ok(r.data?.equals(data), 'read back equals written')
      // 64 requests in one go, before any reply.
      const parts = Array.from({ length: 32 }, (_, i) => ({ off: i * 65536, buf: randomBytes(65536) }))
      const writes = parts.map((p) => c.writeAt(p.off, p.buf))
      const reads = parts.map((p) => c.read(p.off, 65536))
      assert.ok((await Promise.all(writes)).every((x) => x.error === 0))
      await Promise.all(reads) // each answered (contents may predate the write: no ordering between in-flight requests)
      const again = await Promise.all(parts.map(async (p) => await c.read(p.off, 65536)))
      parts.forEach((p, i) => assert.ok(again[i]!.data?.equals(p.buf), `part ${i}`))
      // A zero-length read is answered (structured: NBD_REPLY_TYPE_NONE only).
      const empty = await c.read(SIZE, 0)
      assert.equal(empty.error, 0)
      assert.equal(empty.data?.length, 0)
      await closeAll(c)
    }
  })

  test('errors: past the end (read EINVAL, write ENOSPC with its payload drained), unknown command and flags EINVAL', async (t) => {
    for (const structured of [false, true]) {
      const c = await client(t)
      await c.greet()
      await c.go('disk', { structured })
      assert.equal((await c.read(SIZE - 100, 200)).error, NBD_EINVAL)
      const w = await c.writeAt(SIZE - 100, Buffer.alloc(4096, 0x55))
      assert.equal(w.error, NBD_ENOSPC)
      // The 4096 payload bytes were not taken for request headers: the next request works.
      assert.equal((await c.read(0, 16)).error, 0)
      assert.equal((await c.send(NBD_CMD_CACHE, { offset: 0, length: 4096 })).error, NBD_EINVAL)
      assert.equal((await c.send(NBD_CMD_READ, { offset: 0, length: 4096, flags: 1 << 12 })).error, NBD_EINVAL)
      assert.equal((await c.send(NBD_CMD_WRITE, { offset: 0, data: Buffer.alloc(8), flags: NBD_CMD_FLAG_NO_HOLE })).error, NBD_EINVAL)
      assert.equal((await c.send(NBD_CMD_FLUSH, { offset: 1 })).error, NBD_EINVAL)
      assert.equal((await c.send(NBD_CMD_TRIM, { offset: SIZE, length: 1 })).error, NBD_EINVAL)
      assert.equal((await c.send(NBD_CMD_WRITE_ZEROES, { offset: SIZE - 1, length: 2 })).error, NBD_ENOSPC)
      if (structured) {
        const r = await c.read(SIZE, 1)
        assert.equal(r.chunks[0]!.type, NBD_REPLY_TYPE_ERROR, 'a READ error is a structured error chunk')
        assert.match(r.message ?? '', /passes the end/)
      }
      // Nothing past the end was written.
      assert.equal((await c.read(SIZE - 4096, 4096)).data?.every((x) => x !== 0x55), true)
      await closeAll(c)
    }
  })

  test('a WRITE larger than the maximum payload is refused and its payload drained', async (t) => {
    const c = await client(t)
    await c.greet()
    await c.go('disk', { structured: false })
    const before = (await c.read(0, 4096)).data!
    const big = await c.writeAt(0, Buffer.alloc(MAX_PAYLOAD + 4096, 0x77))
    assert.equal(big.error, NBD_EINVAL)
    const r = await c.read(0, 4096)
    assert.equal(r.error, 0)
    assert.ok(r.data?.equals(before), 'the refused payload was not written')
  })

  test('WRITE_ZEROES: NO_HOLE keeps blocks allocated, otherwise a hole (always fast); BLOCK_STATUS reports it', async (t) => {
    const c = await client(t)
    await c.greet()
    await c.go('other')
    assert.equal((await c.writeAt(0, Buffer.alloc(4 * BLOCK, 0xaa))).error, 0)
    // Block 0: zeroed, still allocated (NO_HOLE).
    assert.equal((await c.send(NBD_CMD_WRITE_ZEROES, { offset: 0, length: BLOCK, flags: NBD_CMD_FLAG_NO_HOLE })).error, 0)
    assert.equal(await allocated(blockFile('other', 0)), BLOCK)
    // Block 1: zeroed and freed.
    assert.equal((await c.send(NBD_CMD_WRITE_ZEROES, { offset: BLOCK, length: BLOCK })).error, 0)
    assert.equal(await allocated(blockFile('other', 1)), 0)
    // Block 2, first half: a hole is punched, so a fast zero is done; one
    // that must stay allocated writes zeros, so it is refused with ENOTSUP
    // and nothing changes.
    assert.equal((await c.send(NBD_CMD_WRITE_ZEROES, { offset: 2 * BLOCK, length: BLOCK / 2, flags: NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE })).error, NBD_ENOTSUP)
    assert.ok((await c.read(2 * BLOCK, 16)).data?.every((x) => x === 0xaa))
    assert.equal((await c.send(NBD_CMD_WRITE_ZEROES, { offset: 2 * BLOCK, length: BLOCK / 2, flags: NBD_CMD_FLAG_FAST_ZERO })).error, 0)
    assert.equal(await allocated(blockFile('other', 2)), BLOCK / 2)
    // Whole blocks 3-7: fast.
    assert.equal((await c.send(NBD_CMD_WRITE_ZEROES, { offset: 3 * BLOCK, length: SIZE - 3 * BLOCK, flags: NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_FUA })).error, 0)
    const all = await c.read(0, SIZE)
    assert.ok(all.data?.subarray(0, 2.5 * BLOCK).every((x) => x === 0))
    assert.ok(all.data?.subarray(2.5 * BLOCK, 3 * BLOCK).every((x) => x === 0xaa))
    assert.ok(all.data?.subarray(3 * BLOCK).every((x) => x === 0))
    // base:allocation: data, hole, data, hole.
    const st = await c.send(NBD_CMD_BLOCK_STATUS, { offset: 0, length: SIZE })
    assert.equal(st.error, 0)
    assert.deepEqual(descriptors(st), [
      [BLOCK, 0], [1.5 * BLOCK, NBD_STATE_HOLE | NBD_STATE_ZERO], [BLOCK / 2, 0], [SIZE - 3 * BLOCK, NBD_STATE_HOLE | NBD_STATE_ZERO]
    ])
    const one = await c.send(NBD_CMD_BLOCK_STATUS, { offset: BLOCK / 2, length: 2 * BLOCK, flags: NBD_CMD_FLAG_REQ_ONE })
    assert.deepEqual(descriptors(one), [[BLOCK / 2, 0]])
    // A trim of block 2 frees it.
    assert.equal((await c.send(NBD_CMD_TRIM, { offset: 2 * BLOCK, length: BLOCK })).error, 0)
    assert.equal(await allocated(blockFile('other', 2)), 0)
  })

  test('FUA and FLUSH reach the volume\'s flush before the reply', async (t) => {
    const events: string[] = []
    const spy = await startNbd({ exports: spyExports(events) })
    try {
      const c = await TestClient.connect(spy.socket)
      await c.greet()
      await c.go('mem')
      await c.writeAt(0, Buffer.alloc(512, 1), NBD_CMD_FLAG_FUA)
      events.push('reply')
      await c.send(NBD_CMD_FLUSH)
      events.push('reply')
      await c.send(NBD_CMD_WRITE_ZEROES, { offset: 0, length: 512, flags: NBD_CMD_FLAG_FUA })
      events.push('reply')
      assert.deepEqual(events, ['write', 'flush', 'reply', 'flush', 'reply', 'zero', 'flush', 'reply'])
      await c.close()
    } finally { await spy.cleanup() }
  })

  test('an assembled WRITE payload is reused only once the backend released it, and never while a write still holds it', async () => {
    // Payloads this large span socket chunks: they are assembled, in a
    // buffer of the I/O buffer pool (ioBuffers in transmission.ts).
    const n = 320 * 1024
    const mem = Buffer.alloc(4 * n)
    const seen: Buffer[] = []
    const hold: Array<() => void> = []
    let keep = false
    const backend: NbdBackend = {
      blockSize: 4096,
      read: async (offset, buf) => { mem.copy(buf, 0, offset, offset + buf.length); return buf.length },
      write: async (offset, data, released) => {
        seen.push(data)
        if (keep) {
          // Held: the bytes are copied only when the test lets the write finish.
          await new Promise<void>((resolve) => hold.push(resolve))
        }
        data.copy(mem, offset)
        released?.()
      },
      flush: async () => {},
      trim: async () => {},
      zero: async () => {},
      extents: async (offset, length) => [{ offset, length, hole: false, zero: false }],
      zeroIsFast: async () => false
    }
    const exports: ExportProvider = {
      list: () => ['mem'],
      describe: (name) => name === 'mem' ? { size: mem.length, readOnly: false } : undefined,
      open: async (name) => ({ name, size: mem.length, readOnly: false, backend, close: async () => {} })
    }
    const spy = await startNbd({ exports })
    try {
      const c = await TestClient.connect(spy.socket)
      await c.greet()
      await c.go('mem')
      const data = [0, 1, 2, 3].map(() => randomBytes(n))
      assert.equal((await c.writeAt(0, data[0]!)).error, 0)
      assert.equal((await c.writeAt(n, data[1]!)).error, 0)
      assert.equal(seen[1]!.buffer, seen[0]!.buffer, 'the released buffer is reused')
      // The third write is held (not released): the fourth must get another buffer.
      keep = true
      const third = c.writeAt(2 * n, data[2]!)
      await until(() => hold.length === 1, 'the third write to reach the backend')
      keep = false
      assert.equal((await c.writeAt(3 * n, data[3]!)).error, 0)
      assert.notEqual(seen[3]!.buffer, seen[2]!.buffer, 'a buffer in use is never handed out')
      hold[0]!()
      assert.equal((await third).error, 0)
      for (let i = 0; i < 4; i++) assert.ok(mem.subarray(i * n, (i + 1) * n).equals(data[i]!), `write ${i} landed intact`)
      await c.close()
    } finally { await spy.cleanup() }
  })

  test('requests run concurrently and are answered out of order', async (t) => {
    // The first read is held until the second one has started: served one
    // at a time, the two could never finish.
    let release!: () => void
    const gate = new Promise<void>((resolve) => { release = resolve })
    const events: string[] = []
    const spy = await startNbd({
      exports: spyExports(events, {
        onRead: async (offset) => {
          if (offset === 0) await gate
          else release()
        }
      })
    })
    try {
      const c = await TestClient.connect(spy.socket)
      await c.greet()
      await c.go('mem')
      const order: number[] = []
      const first = c.read(0, 512).then((r) => { order.push(1); return r })
      const second = c.read(4096, 512).then((r) => { order.push(2); return r })
      await Promise.all([first, second])
      assert.deepEqual(order, [2, 1])
      await c.close()
    } finally { await spy.cleanup() }
  })

  test('single writer: while the image has a writer, the export is read-only (EPERM on writes), and writable again after', async (t) => {
    const volume = await fx.node.acquireVolume('ro')
    const end = volume.open(true, 'another writer')
    try {
      const c = await client(t)
      await c.greet()
      const info = await c.option(NBD_OPT_INFO, encodeInfoRequest('ro', []))
      const flagsOf = (d: Buffer): number => d.readUInt16BE(10)
      assert.notEqual(flagsOf(info[0]!.data) & NBD_FLAG_READ_ONLY, 0)
      const { flags } = await c.go('ro')
      assert.notEqual(flags & NBD_FLAG_READ_ONLY, 0)
      assert.notEqual(flags & NBD_FLAG_CAN_MULTI_CONN, 0)
      assert.equal((await c.writeAt(0, Buffer.alloc(512))).error, NBD_EPERM)
      assert.equal((await c.send(NBD_CMD_TRIM, { offset: 0, length: 512 })).error, NBD_EPERM)
      assert.equal((await c.send(NBD_CMD_WRITE_ZEROES, { offset: 0, length: 512 })).error, NBD_EPERM)
      assert.equal((await c.read(0, 512)).error, 0)
      assert.equal((await c.send(NBD_CMD_FLUSH)).error, 0)
    } finally {
      end()
      await fx.node.releaseVolume(volume)
    }
    const w = await client(t)
    await w.greet()
    const { flags } = await w.go('ro')
    assert.equal(flags & NBD_FLAG_READ_ONLY, 0)
    // This connection is the writer now: another one is served read-only.
    const r = await client(t)
    await r.greet()
    assert.notEqual((await r.go('ro')).flags & NBD_FLAG_READ_ONLY, 0)
    await w.close()
    await r.close()
  })

  test('NBD_CMD_DISC: requests in flight are answered, then the connection closes and the image is released', async (t) => {
    const c = await client(t)
    await c.greet()
    await c.go('disk')
    const data = randomBytes(BLOCK)
    const w = c.writeAt(5 * BLOCK, data)
    c.write(Buffer.from(encodeDisc()))
    assert.equal((await w).error, 0)
    await c.closed
    const d = await client(t)
    await d.greet()
    await d.go('disk')
    assert.ok((await d.read(5 * BLOCK, BLOCK)).data?.equals(data))
  })

  test('a client that half-closes after pipelining more requests than are served at once gets every reply', async (t) => {
    const c = await client(t)
    await c.greet()
    await c.go('disk', { structured: false })
    const n = MAX_INFLIGHT * 2 + 17
    const replies = Array.from({ length: n }, (_, i) => c.read((i * 4096) % SIZE, 4096))
    c.socket.end()
    // The server closes once it has answered everything it received.
    await c.closed
    assert.equal(c.inflight, 0, 'requests left unanswered')
    const all = await Promise.all(replies)
    assert.ok(all.every((r) => r.error === 0 && r.data?.length === 4096))
  })

  test('a client vanishing mid-request harms no one: its image is released and others go on', async (t) => {
    const first = await client(t)
    await first.greet()
    await first.go('disk')
    const before = (await first.read(0, 1000)).data!
    await closeAll(first)
    const other = await client(t)
    await other.greet()
    await other.go('other')
    for (const cut of [10, 28, 28 + 1000]) {
      const c = await TestClient.connect(fx.socket)
      await c.greet()
      await c.go('disk')
      const req = encodeWriteHeader(0, 65536)
      c.write(Buffer.concat([req, Buffer.alloc(1000, 0x99)]).subarray(0, cut))
      c.socket.destroy()
      await c.closed
    }
    await until(() => fx.server.connectionCount === 1, 'the vanished connections to end')
    assert.equal(fx.node.isOpen('disk'), false, 'the image is released')
    assert.equal((await other.read(0, 4096)).error, 0)
    // The half-sent write was never applied.
    const d = await client(t)
    await d.greet()
    await d.go('disk')
    assert.ok((await d.read(0, 1000)).data?.equals(before))
  })

  test('close(): a request in flight is answered first, then the connection ends', async (t) => {
    let release!: () => void
    const gate = new Promise<void>((resolve) => { release = resolve })
    const events: string[] = []
    const spy = await startNbd({ exports: spyExports(events, { onWrite: async () => await gate }) })
    try {
      const c = await TestClient.connect(spy.socket)
      await c.greet()
      await c.go('mem')
      const w = c.writeAt(0, Buffer.alloc(4096, 3))
      await until(() => events.includes('write'), 'the write to reach the backend')
      const closing = spy.server.close()
      release()
      assert.equal((await w).error, 0)
      await closing
      await c.closed
    } finally { await spy.cleanup() }
  })

  test('close(): connections in transmission and in handshake end, volumes are released, no new listen', async (t) => {
    const own = await startNbd()
    try {
      await own.node.createImage({ name: 'img', size: SIZE, block_size: BLOCK })
      const a = await TestClient.connect(own.socket)
      await a.greet()
      await a.go('img')
      assert.equal((await a.writeAt(0, randomBytes(2 * BLOCK))).error, 0)
      const b = await TestClient.connect(own.socket) // still in its handshake
      await b.greet()
      assert.equal(own.node.isOpen('img'), true)
      await own.server.close()
      await a.closed
      await b.closed
      assert.equal(own.node.isOpen('img'), false)
      assert.equal(own.server.connectionCount, 0)
      // The writer slot is free again.
      const v = await own.node.acquireVolume('img')
      v.open(true, 'after close')()
      await own.node.releaseVolume(v)
      await assert.rejects(own.server.listen(join(own.dir, 'again.sock')), /closed/)
    } finally { await own.cleanup() }
  })

  test('listen: socket paths, HOST:PORT, loopback for a bare port; a stale socket file is replaced, a live one refused', async (t) => {
    assert.deepEqual(parseListenSpec('10809'), { host: '127.0.0.1', port: 10809 })
    assert.deepEqual(parseListenSpec('0.0.0.0:10809'), { host: '0.0.0.0', port: 10809 })
    assert.deepEqual(parseListenSpec('[::1]:10809'), { host: '::1', port: 10809 })
    assert.deepEqual(parseListenSpec('localhost:1'), { host: 'localhost', port: 1 })
    assert.deepEqual(parseListenSpec('/run/ukai/nbd'), { path: '/run/ukai/nbd' })
    assert.equal((parseListenSpec('nbd.sock') as { path: string }).path.endsWith('/nbd.sock'), true)
    for (const bad of ['', 'host:', ':1', 'host:0', '70000', 'a b:1', 'host:port']) assert.throws(() => parseListenSpec(bad), /invalid NBD listen address/, bad)

    const stale = join(fx.dir, 'stale.sock')
    await writeFile(stale, '') // not a socket: never removed
    const s1 = new NbdServer(fx.node)
    await assert.rejects(s1.listen(stale), /cannot listen/)
    assert.equal(await readFile(stale, 'utf8'), '')
    await assert.rejects(new NbdServer(fx.node).listen(fx.socket), /cannot listen/, 'a socket in use is refused')
    await s1.close()
    // A socket file nobody listens on (a killed node's): a second link to a
    // socket outlives its listener, which unlinks only its own path.
    const tmp = new NbdServer(fx.node)
    const first = join(fx.dir, 'first.sock')
    const left = join(fx.dir, 'left.sock')
    await tmp.listen(first)
    await link(first, left)
    await tmp.close()
    assert.ok((await lstat(left)).isSocket())
    const s2 = new NbdServer(fx.node)
    await s2.listen(left)
    const c = await TestClient.connect(left)
    await c.greet()
    assert.equal((await c.go('disk')).size, SIZE)
    await c.close()
    await s2.close()

    // TCP on loopback.
    const tcp = new NbdServer(fx.node)
    let port = 0
    for (let i = 0; ; i++) {
      port = 20000 + Math.floor(Math.random() * 30000)
      try { await tcp.listen(`127.0.0.1:${port}`); break } catch (err) { if (i > 20) throw err }
    }
    try {
      const c = await TestClient.connect({ host: '127.0.0.1', port })
      await c.greet()
      assert.equal((await c.go('disk')).size, SIZE)
      assert.equal((await c.read(0, 512)).error, 0)
      await c.close()
    } finally { await tcp.close() }
  })
})

/** A DISC request header. */
function encodeDisc (): Buffer {
  const b = Buffer.alloc(28)
  b.writeUInt32BE(0x25609513, 0)
  b.writeUInt16BE(NBD_CMD_DISC, 6)
  return b
}

function encodeWriteHeader (offset: number, length: number): Buffer {
  const b = Buffer.alloc(28)
  b.writeUInt32BE(0x25609513, 0)
  b.writeUInt16BE(NBD_CMD_WRITE, 6)
  b.writeUInt32BE(offset, 20)
  b.writeUInt32BE(length, 24)
  return b
}

interface SpyHooks {
  onRead?: (offset: number) => Promise<void> | void
  onWrite?: (offset: number) => Promise<void> | void
}

/** One in-memory export, 'mem', that records the order of backend calls. */
function spyExports (events: string[], hooks: SpyHooks = {}): ExportProvider {
  const mem = Buffer.alloc(64 * 1024)
  const backend: NbdBackend = {
    blockSize: 4096,
    read: async (offset, buf) => { await hooks.onRead?.(offset); mem.copy(buf, 0, offset, offset + buf.length); return buf.length },
    write: async (offset, data) => { events.push('write'); await hooks.onWrite?.(offset); data.copy(mem, offset) },
    flush: async () => { await new Promise((resolve) => setImmediate(resolve)); events.push('flush') },
    trim: async () => { events.push('trim') },
    zero: async (offset, length) => { events.push('zero'); mem.fill(0, offset, offset + length) },
    extents: async (offset, length) => [{ offset, length, hole: false, zero: false }],
    zeroIsFast: async () => false
  }
  return {
    list: () => ['mem'],
    describe: (name) => name === 'mem' ? { size: mem.length, readOnly: false } : undefined,
    open: async (name) => {
      if (name !== 'mem') throw new Error('no such export')
      return { name, size: mem.length, readOnly: false, backend, close: async () => {} }
    }
  }
}
