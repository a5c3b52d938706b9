/**
 * NBD clients that abuse the server, each observation of the issue as a
 * regression test: clients that send requests and never read the replies
 * (memory, other clients starved, work done after they left), READ
 * headers followed by a disconnect, a WRITE whose payload never arrives
 * (the image's writer slot held), a handshake that never ends, too many
 * connections, and one request that causes unbounded work.
 *
 * The first tests run a real `ukai server` process and read its resident
 * set from /proc; the others run the server in this process with short
 * timeouts and small budgets. Assertions are on bounded quantities (bytes
 * held, requests executed, a connection ended, a slot released); the only
 * time limits are generous upper bounds, the figures are the benchmark's
 * (bench/lib/abuse.mjs).
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { readFile } from 'node:fs/promises'
import { TestClient, startNbd, until, type NbdFixture } from './helpers/nbd.js'
import { TestNode } from './helpers/node-process.js'
import { BufferBudget } from '../src/frontends/nbd/budget.js'
import type { ExportProvider, NbdBackend } from '../src/frontends/nbd/exports.js'
import { encodeOption } from '../src/frontends/nbd/options.js'
import {
  MAX_PAYLOAD, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_FLAG_READ_ONLY,
  NBD_OPT_LIST, NBD_OPTION_HEADER_SIZE
} from '../src/frontends/nbd/protocol.js'
import { encodeRequest } from '../src/frontends/nbd/requests.js'
import { DISCARD_STEP_BLOCKS, DISPATCH_PER_TURN, MAX_INFLIGHT } from '../src/frontends/nbd/transmission.js'

const MiB = 2 ** 20

/** `n` READ request headers of `length` bytes each, cycling over the first `span` bytes. */
function readHeaders (n: number, length: number, span: number): Buffer {
  const out: Buffer[] = []
  for (let i = 0; i < n; i++) {
    out.push(encodeRequest({ type: NBD_CMD_READ, flags: 0, offset: (i * length) % span, length, cookieHi: 0xabad, cookieLo: i }))
  }
  return Buffer.concat(out)
}

/** A client in transmission on `image` that stops reading, then pipelines `headers`. */
async function abuser (socket: string, image: string, headers: Buffer): Promise<TestClient> {
  const c = await TestClient.connect(socket)
  await c.greet()
  await c.go(image)
  c.socket.pause()
  c.write(headers)
  return c
}

/** A client that connects, negotiates and reads 4 KiB; resolves with what it took. */
async function goodRead (socket: string, image: string): Promise<{ handshakeMs: number, readMs: number }> {
  const t0 = performance.now()
  const c = await TestClient.connect(socket)
  try {
    await c.greet()
    await c.go(image)
    const t1 = performance.now()
    const r = await c.read(0, 4096)
    assert.equal(r.error, 0)
    return { handshakeMs: t1 - t0, readMs: performance.now() - t1 }
  } finally {
    await c.close()
  }
}

/** Rejects when `p` takes longer than `ms`: a generous bound, not a measurement. */
async function within<T> (p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([p, new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: not done after ${ms / 1000} s`)), ms)
    })])
  } finally { clearTimeout(timer) }
}

async function memory (pid: number): Promise<{ rss: number, hwm: number }> {
  const text = await readFile(`/proc/${pid}/status`, 'utf8')
  const kb = (k: string): number => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(text)?.[1]) * 1024
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') }
}

const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))

describe('NBD abuse: a real node', { timeout: 240_000 }, () => {
  let node: TestNode
  const reads = async (): Promise<number> => (await node.api<{ reads: number }>('GET', '/v1/images/img/stats')).body.reads
  /** Waits until no connection has the image open (every abusive connection ended), at most `ms`. */
  const released = async (ms: number): Promise<void> => {
    const start = Date.now()
    for (;;) {
      const open = (await node.api<{ open_images: string[] }>('GET', '/v1/node')).body.open_images
      if (!open.includes('img')) return
      if (Date.now() - start > ms) throw new Error(`the image is still open ${ms / 1000} s after the clients left`)
      await sleep(100)
    }
  }

  before(async () => {
    node = await TestNode.start({ nbd: true })
    const r = await node.cli('image', 'create', 'img', '-s', '4G', '-b', '64M')
    assert.equal(r.code, 0, r.stderr)
  })
  after(async () => { await node?.destroy() })

  test('20 clients that pipeline 32 MiB READs and never read the replies: RSS stays bounded, others are served, nothing runs after they leave', async () => {
    const start = await memory(node.pid!)
    // 400 requests of 32 MiB each: 12.5 GiB of replies asked for per client.
    const abusers = await Promise.all(Array.from({ length: 20 }, async () => await abuser(node.nbdSocket!, 'img', readHeaders(400, 32 * MiB, 2 * 2 ** 30))))
    // Every observation is made, then all are checked (one failure does not hide the others).
    const failures: string[] = []
    // Time for the node to take in what they sent (on the old code RSS
    // passed a gigabyte within the first second).
    await sleep(2000)
    // A well-behaved client is served (a new handshake and a read) while they hold on.
    await within(goodRead(node.nbdSocket!, 'img'), 30_000, 'a new client\'s handshake and 4 KiB read during the abuse')
      .catch((err: Error) => failures.push(err.message))
    const peak = await memory(node.pid!)
    const grown = peak.hwm - start.rss
    if (grown >= 384 * MiB) failures.push(`the node's RSS grew by ${(grown / MiB).toFixed(0)} MiB (VmHWM ${(peak.hwm / MiB).toFixed(0)} MiB, ${(start.rss / MiB).toFixed(0)} MiB before)`)
    const before = await reads()
    for (const c of abusers) c.socket.destroy()
    await released(60_000).catch((err: Error) => failures.push(err.message))
    const ran = await reads() - before
    if (ran > abusers.length) failures.push(`${ran} READs executed after their clients left`)
    assert.deepEqual(failures, [])
  })

  test('84 KB of READ headers then a disconnect: a handful run, not 3000, and a new client is served meanwhile', async () => {
    const before = await reads()
    const c = await TestClient.connect(node.nbdSocket!)
    await c.greet()
    await c.go('img')
    c.write(readHeaders(3000, 32 * MiB, 2 * 2 ** 30))
    c.socket.destroy()
    const failures: string[] = []
    await within(goodRead(node.nbdSocket!, 'img'), 30_000, 'a new client\'s handshake and read after the disconnect')
      .catch((err: Error) => failures.push(err.message))
    await released(60_000).catch((err: Error) => failures.push(err.message))
    const ran = await reads() - before - 1
    // What was in flight when the client left (the budget admits four
    // 32 MiB READs at once), never what was still queued.
    if (ran > 16) failures.push(`${ran} of the 3000 READs executed`)
    assert.deepEqual(failures, [])
  })
})

/** Requests that reached a backend, and a gate to hold reads. */
interface Spy {
  exports: ExportProvider
  reads: number
  calls: Array<{ op: string, offset: number, length: number, turn: number }>
  gate: Promise<void> | undefined
  open: number
}

/**
 * One in-memory export 'mem' of `size` bytes (1 MiB blocks) whose reads
 * can be held at a gate. `turn` counts event-loop turns, so a test can see
 * how many requests started in one.
 */
function spy (size: number, countTurns = false): Spy & { stopTurns: () => void } {
  let turn = 0
  let stopped = false
  const tick = (): void => { if (!stopped) { turn++; setImmediate(tick) } }
  if (countTurns) setImmediate(tick)
  const s: Spy & { stopTurns: () => void } = {
    reads: 0,
    calls: [],
    gate: undefined,
    open: 0,
    stopTurns: () => { stopped = true },
    exports: undefined as unknown as ExportProvider
  }
  const record = (op: string, offset: number, length: number): void => { s.calls.push({ op, offset, length, turn }) }
  const backend: NbdBackend = {
    blockSize: MiB,
    read: async (offset, buf) => {
      s.reads++
      record('read', offset, buf.length)
      if (s.gate !== undefined) await s.gate
      return buf.length
    },
    write: async (offset, data) => record('write', offset, data.length),
    flush: async () => {},
    trim: async (offset, length) => record('trim', offset, length),
    zero: async (offset, length) => record('zero', offset, length),
    extents: async (offset, length) => [{ offset, length, hole: false, zero: false }],
    zeroIsFast: async () => true
  }
  s.exports = {
    list: () => Array.from({ length: 500 }, (_, i) => `mem${i === 0 ? '' : `-a-long-export-name-to-make-the-list-big-${String(i).padStart(4, '0')}`}`),
    describe: (name) => name === 'mem' ? { size, readOnly: false } : undefined,
    open: async (name) => {
      if (name !== 'mem') throw new Error('no such export')
      s.open++
      return { name, size, readOnly: false, backend, close: async () => { s.open-- } }
    }
  }
  return s
}

describe('NBD abuse: the server in this process', { timeout: 120_000 }, () => {
  const SIZE = 64 * MiB
  let fx: NbdFixture

  before(async () => {
    fx = await startNbd({ handshakeTimeoutMs: 500, ioTimeoutMs: 400, maxConnections: 8 })
    await fx.node.createImage({ name: 'disk', size: SIZE, block_size: MiB })
  })
  after(async () => { await fx?.cleanup() })
  const drained = async (): Promise<void> => await until(() => fx.server.connectionCount === 0, 'every connection to end', 20_000)

  test('a WRITE whose payload never arrives: the connection ends after the I/O timeout and the writer slot is released', async () => {
    const c = await TestClient.connect(fx.socket)
    await c.greet()
    const { flags } = await c.go('disk')
    assert.equal(flags & NBD_FLAG_READ_ONLY, 0, 'the first client is the writer')
    c.write(encodeRequest({ type: NBD_CMD_WRITE, flags: 0, offset: 0, length: 65536, cookieHi: 0, cookieLo: 1 }))
    c.write(Buffer.alloc(1000, 0x77)) // and the rest never comes
    await within(c.closed, 10_000, 'the server to end the stuck connection')
    await until(() => !fx.node.isOpen('disk'), 'the image to be released')
    // The slot is free: the next client writes.
    const d = await TestClient.connect(fx.socket)
    await d.greet()
    assert.equal((await d.go('disk')).flags & NBD_FLAG_READ_ONLY, 0, 'the next client is the writer')
    assert.equal((await d.writeAt(0, Buffer.alloc(512, 1))).error, 0)
    await d.close()
    await drained()
  })

  test('half a request header, or replies never taken: the connection ends after the I/O timeout', async () => {
    const half = await TestClient.connect(fx.socket)
    await half.greet()
    await half.go('disk')
    half.write(encodeRequest({ type: NBD_CMD_READ, flags: 0, offset: 0, length: 4096, cookieHi: 0, cookieLo: 1 }).subarray(0, 13))
    const deaf = await abuser(fx.socket, 'disk', readHeaders(64, MiB, SIZE))
    await within(half.closed, 10_000, 'the server to end the connection with half a header')
    // The other client reads nothing, so it would not see its end: the server's side tells.
    await within(drained(), 20_000, 'the server to end the connection whose replies are not taken')
    assert.equal(fx.node.isOpen('disk'), false)
    deaf.socket.destroy()
  })

  test('an idle client, and one whose request takes longer than the I/O timeout, are not dropped', async () => {
    const s = spy(SIZE)
    const own = await startNbd({ exports: s.exports, ioTimeoutMs: 200 })
    try {
      const idle = await TestClient.connect(own.socket)
      await idle.greet()
      await idle.go('mem')
      let release!: () => void
      s.gate = new Promise((resolve) => { release = resolve })
      const slow = await TestClient.connect(own.socket)
      await slow.greet()
      await slow.go('mem')
      const pending = slow.read(0, 4096)
      await sleep(1500)
      release()
      s.gate = undefined
      assert.equal((await pending).error, 0)
      assert.equal((await idle.read(0, 4096)).error, 0, 'the idle client is still connected')
      assert.equal(own.server.connectionCount, 2)
      await idle.close()
      await slow.close()
    } finally {
      s.stopTurns()
      await own.cleanup()
    }
  })

  test('a handshake that never ends is cut at the handshake timeout, even when bytes trickle in', async () => {
    const silent = await TestClient.connect(fx.socket)
    await silent.greet()
    const trickle = await TestClient.connect(fx.socket)
    await trickle.greet()
    // An option of 60000 bytes, sent a byte every 50 ms.
    const opt = encodeOption(NBD_OPT_LIST, Buffer.alloc(60000))
    trickle.write(opt.subarray(0, NBD_OPTION_HEADER_SIZE))
    let i = NBD_OPTION_HEADER_SIZE
    const timer = setInterval(() => { if (!trickle.socket.destroyed) trickle.write(opt.subarray(i, ++i)) }, 50)
    try {
      await within(Promise.all([silent.closed, trickle.closed]), 10_000, 'the server to end both handshakes')
    } finally { clearInterval(timer) }
    await drained()
  })

  test('a client that sends options without reading the answers gets no more read', async () => {
    const s = spy(SIZE)
    const own = await startNbd({ exports: s.exports, handshakeTimeoutMs: 2000 })
    try {
      const c = await TestClient.connect(own.socket)
      await c.greet()
      c.socket.pause()
      // Each NBD_OPT_LIST is answered with 500 names (about 40 KB).
      c.write(Buffer.concat(Array.from({ length: 1000 }, () => encodeOption(NBD_OPT_LIST))))
      await sleep(500)
      assert.ok(own.server.bufferedBytes < 2 * MiB, `${own.server.bufferedBytes} bytes held for the connection`)
      await within(until(() => own.server.connectionCount === 0, 'the connection to end', 20_000), 10_000, 'the handshake timeout to end it')
      c.socket.destroy()
    } finally {
      s.stopTurns()
      await own.cleanup()
    }
  })

  test('connections beyond the limit are refused before the greeting; the others are served', async () => {
    const cs: TestClient[] = []
    for (let i = 0; i < 8; i++) {
      const c = await TestClient.connect(fx.socket)
      await c.greet()
      await c.go('disk')
      cs.push(c)
    }
    const extra = await TestClient.connect(fx.socket)
    await within(extra.closed, 10_000, 'the ninth connection to be closed')
    assert.equal(extra.reader.length, 0, 'no greeting')
    for (const c of cs) assert.equal((await c.read(0, 4096)).error, 0)
    await cs[1]!.close()
    await until(() => fx.server.connectionCount === 7, 'the server to see one leave')
    const again = await TestClient.connect(fx.socket)
    await again.greet()
    await again.go('disk')
    assert.equal((await again.read(0, 512)).error, 0)
    for (const c of [...cs, again]) await c.close()
    await drained()
  })

  test('a small budget: clients that never read their replies hold no more than it; a well-behaved client is served', async () => {
    const budget = new BufferBudget({ limit: 8 * MiB, reserve: 256 * 1024 })
    const own = await startNbd({ budget })
    try {
      await own.node.createImage({ name: 'img', size: SIZE, block_size: MiB })
      const abusers = await Promise.all(Array.from({ length: 6 }, async () => await abuser(own.socket, 'img', readHeaders(200, MiB, SIZE))))
      await sleep(1000)
      for (let i = 0; i < 20; i++) await within(goodRead(own.socket, 'img'), 10_000, 'a well-behaved client')
      // The budget, plus what each connection may hold beyond it: its
      // reserve and its read-ahead (64 KiB and one socket chunk).
      const bound = budget.limit + 7 * (budget.reserve + 128 * 1024)
      assert.ok(budget.peak <= bound, `${budget.peak} bytes held at the peak, bound ${bound}`)
      assert.ok(own.server.bufferedBytes <= bound)
      assert.ok(budget.waiting > 0, 'the abusers wait for room')
      for (const c of abusers) c.socket.destroy()
      await until(() => own.server.connectionCount === 0, 'the abusers\' connections to end')
      assert.equal(budget.used, 0, 'everything released')
    } finally { await own.cleanup() }
  })

  test('a client that disconnects leaves its queued requests unexecuted, and those in flight followed by none', async () => {
    const s = spy(SIZE)
    let release!: () => void
    s.gate = new Promise((resolve) => { release = resolve })
    const own = await startNbd({ exports: s.exports })
    try {
      const c = await TestClient.connect(own.socket)
      await c.greet()
      await c.go('mem')
      c.write(readHeaders(3000, 4096, SIZE))
      await until(() => s.reads > 0, 'the first reads to start')
      c.socket.destroy()
      await sleep(200)
      release()
      await until(() => own.server.connectionCount === 0, 'the connection to end')
      await until(() => s.open === 0, 'the export to be released')
      assert.ok(s.reads <= MAX_INFLIGHT + 1, `${s.reads} of the 3000 READs executed`)
    } finally {
      s.stopTurns()
      await own.cleanup()
    }
  })

  test('one client\'s pipeline of instant requests gives way to the event loop', async () => {
    const s = spy(SIZE, true)
    const own = await startNbd({ exports: s.exports })
    try {
      const c = await TestClient.connect(own.socket)
      await c.greet()
      await c.go('mem')
      const replies = Array.from({ length: 2000 }, async (_, i) => await c.read((i * 512) % SIZE, 512))
      assert.ok((await Promise.all(replies)).every((r) => r.error === 0))
      const perTurn = new Map<number, number>()
      for (const x of s.calls) perTurn.set(x.turn, (perTurn.get(x.turn) ?? 0) + 1)
      const most = Math.max(...perTurn.values())
      assert.ok(most <= DISPATCH_PER_TURN, `${most} requests started in one event-loop turn`)
      await c.close()
    } finally {
      s.stopTurns()
      await own.cleanup()
    }
  })

  test('TRIM and WRITE_ZEROES of a huge range run a few blocks at a time, covering the range exactly', async () => {
    const big = 4 * 2 ** 30 - MiB
    const s = spy(4 * 2 ** 30)
    const own = await startNbd({ exports: s.exports })
    try {
      const c = await TestClient.connect(own.socket)
      await c.greet()
      await c.go('mem')
      for (const [type, flags, op] of [[NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 'zero'], [NBD_CMD_TRIM, 0, 'trim']] as const) {
        s.calls.length = 0
        assert.equal((await c.send(type, { offset: 512, length: big, flags })).error, 0)
        const calls = s.calls.filter((x) => x.op === op)
        assert.ok(calls.every((x) => x.length <= DISCARD_STEP_BLOCKS * MiB), `${op}: a call of ${Math.max(...calls.map((x) => x.length))} bytes`)
        let at = 512
        for (const x of calls) {
          assert.equal(x.offset, at)
          at += x.length
        }
        assert.equal(at, 512 + big, `${op}: the range is covered`)
      }
      // A READ at the maximum is still one call.
      const r = await c.read(0, MAX_PAYLOAD)
      assert.equal(r.error, 0)
      await c.close()
    } finally {
      s.stopTurns()
      await own.cleanup()
    }
  })
})
