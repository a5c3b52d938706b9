/**
 * The peer NBD client against real servers: qemu-nbd serving a raw file
 * and, when installed, nbdkit's memory plugin (plain, with advertised
 * block size limits that are enforced, and without WRITE_ZEROES). A small
 * scripted server in this file covers what real servers will not do on
 * demand: refuse NBD_OPT_GO, answer out of order, send garbage, return
 * each error value, stay silent. The reply parser is fuzzed on its own.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn, execFileSync, type ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { mkdtemp, rm, stat, truncate, writeFile } from 'node:fs/promises'
import { connect as netConnect, createServer, type Server, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import { UkaiError } from '../errors.js'
import {
  IHAVEOPT, NBDMAGIC, NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL,
  NBD_EIO, NBD_ENOSPC, NBD_EPERM, NBD_ESHUTDOWN, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_NO_ZEROES,
  NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO_EXPORT, NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_REP_ACK, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_MAGIC, NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC
} from '../frontends/nbd/protocol.js'
import { NbdClient, type NbdTarget } from './nbd-client.js'
import { ReplyParser } from './nbd-reply-parser.js'
import { prng } from '../../test/helpers/assertions.js'

const MiB = 2 ** 20
const SIZE = 64 * MiB
const has = (tool: string): boolean => {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' })
    return true
  } catch { return false }
}
const HAVE_QEMU_NBD = has('qemu-nbd')
const HAVE_NBDKIT = has('nbdkit')

// ---------------------------------------------------------------------------
// Helpers


const settle = async <T>(p: Promise<T>): Promise<{ ok: true, value: T } | { ok: false, error: unknown }> =>
  await p.then((value) => ({ ok: true as const, value }), (error: unknown) => ({ ok: false as const, error }))

const isUkai = (code?: string) => (err: unknown): boolean => {
  assert.ok(err instanceof UkaiError, `expected a UkaiError, got ${String(err)}`)
  if (code !== undefined) assert.equal(err.code, code, err.message)
  return true
}

/** Every process a test started, killed if the test process leaves early. */
const children = new Set<ChildProcess>()
process.on('exit', () => {
  for (const c of children) {
    try {
      if (c.pid !== undefined) { process.kill(c.pid, 'SIGCONT'); process.kill(c.pid, 'SIGKILL') }
    } catch {}
  }
})

interface ServerProcess {
  dir: string
  socket: string
  target: NbdTarget
  pid: number
  /** Kills the server (SIGCONT first, in case a test stopped it) and removes its directory. */
  stop: () => Promise<void>
}

/** Waits until a unix socket accepts connections. */
async function waitForSocket (path: string, child: ChildProcess, stderr: () => string): Promise<void> {
  const start = Date.now()
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`server exited early: ${stderr()}`)
    if (Date.now() - start > 10_000) throw new Error(`server socket ${path} did not appear: ${stderr()}`)
    const exists = await stat(path).then(() => true, () => false)
    if (exists) {
      const ok = await new Promise<boolean>((resolve) => {
        const s = netConnect({ path })
        s.once('connect', () => { s.destroy(); resolve(true) })
        s.once('error', () => resolve(false))
      })
      if (ok) return
    }
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

/** Spawns a server on a unix socket in a fresh temp dir. `args` gets the dir and the socket path. */
async function startServer (command: string, args: (dir: string, socket: string) => string[], prepare?: (dir: string) => Promise<void>): Promise<ServerProcess> {
  const dir = await mkdtemp(join(tmpdir(), 'ukai-nbd-client-'))
  const socket = join(dir, 'nbd.sock')
  await prepare?.(dir)
  const child = spawn(command, args(dir, socket), { stdio: ['ignore', 'ignore', 'pipe'] })
  children.add(child)
  let err = ''
  child.stderr!.on('data', (c: Buffer) => { err += c.toString() })
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  try {
    await waitForSocket(socket, child, () => err)
  } catch (e) {
    child.kill('SIGKILL')
    await exited
    children.delete(child)
    await rm(dir, { recursive: true, force: true })
    throw e
  }
  return {
    dir,
    socket,
    target: { path: socket },
    pid: child.pid!,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) {
        try { process.kill(child.pid!, 'SIGCONT') } catch {}
        try { process.kill(child.pid!, 'SIGKILL') } catch {}
        await exited
      }
      children.delete(child)
      await rm(dir, { recursive: true, force: true })
    }
  }
}

/** qemu-nbd serving a 64 MiB raw file as export `disk`; --discard=unmap makes TRIM punch holes. */
const startQemuNbd = async (): Promise<ServerProcess> => await startServer('qemu-nbd',
  (dir, socket) => ['--persistent', '--shared=8', '--discard=unmap', '-f', 'raw', '-x', 'disk', '-k', socket, join(dir, 'disk.raw')],
  async (dir) => {
    await writeFile(join(dir, 'disk.raw'), '')
    await truncate(join(dir, 'disk.raw'), SIZE)
  })

const startNbdkit = async (...pluginArgs: string[]): Promise<ServerProcess> => await startServer('nbdkit',
  (_dir, socket) => ['--unix', socket, '--foreground', '--exit-with-parent', ...pluginArgs])

// ---------------------------------------------------------------------------
// The same checks against every real server

interface Flavour {
  name: string
  skip: string | false
  start: () => Promise<ServerProcess>
  exportName: string
  /** TRIM reads back as zeroes on this server (the spec does not promise it). */
  trimZeroes: boolean
  /** Connect with blockStatus: structured replies (reads of holes come as OFFSET_HOLE chunks) and base:allocation. */
  status: boolean
}

const servers: Array<Omit<Flavour, 'status'>> = [
  { name: 'qemu-nbd', skip: !HAVE_QEMU_NBD && 'qemu-nbd is not installed', start: startQemuNbd, exportName: 'disk', trimZeroes: true },
  { name: 'nbdkit memory', skip: !HAVE_NBDKIT && 'nbdkit is not installed', start: async () => await startNbdkit('memory', '64M'), exportName: '', trimZeroes: true }
]
const flavours: Flavour[] = servers.flatMap((s) => [{ ...s, status: false }, { ...s, name: `${s.name}, structured replies and block status`, status: true }])

/** Block status of [offset, offset + length), asked until all of it is told. */
async function allocationOf (client: NbdClient, offset: number, length: number): Promise<Array<{ offset: number, length: number, zero: boolean }>> {
  const out: Array<{ offset: number, length: number, zero: boolean }> = []
  for (let at = offset; at < offset + length;) {
    const extents = await client.blockStatus(at, offset + length - at)
    assert.ok(extents.length > 0 && extents[0]!.offset === at, `block status at ${at} starts there`)
    for (const e of extents) { out.push({ offset: e.offset, length: e.length, zero: e.zero }); at = e.offset + e.length }
  }
  return out
}

for (const f of flavours) {
  describe(`NbdClient against ${f.name}`, { skip: f.skip }, () => {
    let server: ServerProcess
    let client: NbdClient
    /** What the export should hold. */
    const model = Buffer.alloc(SIZE)

    before(async () => {
      server = await f.start()
      client = await NbdClient.connect(server.target, f.exportName, { timeoutMs: 10_000, blockStatus: f.status })
    })
    after(async () => {
      await client?.close()
      await server?.stop()
    })

    const check = async (offset: number, length: number): Promise<void> => {
      const buf = Buffer.alloc(length, 0xee)
      await client.read(offset, buf)
      assert.ok(buf.equals(model.subarray(offset, offset + length)), `contents differ in [${offset}, ${offset + length})`)
    }

    test('negotiates the export size and limits', () => {
      assert.equal(client.size, SIZE)
      assert.equal(client.exportName, f.exportName)
      assert.ok((client.transmissionFlags & NBD_FLAG_HAS_FLAGS) !== 0)
      assert.ok(client.maxPayload >= 2 ** 20 && client.maxPayload <= 2 ** 25, `maxPayload ${client.maxPayload}`)
      assert.equal(client.closed, false)
      assert.equal(client.hasBlockStatus, f.status)
    })

    test(f.status ? 'block status tells data from zeros, and reads of holes come back as zeros' : 'block status is refused: it was not negotiated', async () => {
      const base = 48 * MiB
      const data = randomBytes(3 * MiB)
      await client.write(base, data)
      data.copy(model, base)
      // The middle MiB made zero (a hole where the server can); the rest stays data.
      await client.writeZeroes(base + MiB, MiB)
      model.fill(0, base + MiB, base + 2 * MiB)
      if (!f.status) {
        await assert.rejects(client.blockStatus(base, 3 * MiB), isUkai('UKAI_ERR_NOT_SUPPORTED'))
        return
      }
      const extents = await allocationOf(client, base, 3 * MiB)
      assert.equal(extents.reduce((n, e) => n + e.length, 0), 3 * MiB)
      for (const e of extents) {
        const inHole = e.offset >= base + MiB && e.offset + e.length <= base + 2 * MiB
        const inData = e.offset + e.length <= base + MiB || e.offset >= base + 2 * MiB
        assert.ok(inHole || inData, `extent [${e.offset}, ${e.offset + e.length}) straddles data and zeros`)
        // Data is never called zero; the zeroed MiB is.
        assert.equal(e.zero, inHole, `extent [${e.offset}, ${e.offset + e.length})`)
      }
      // A read over data, the hole and data again: the server may answer in several chunks.
      await check(base - 4096, 3 * MiB + 8192)
      // Unallocated space at the end of the export reads as zeros too.
      await check(SIZE - 2 * MiB, MiB)
    })

    test('random writes and reads match a model', async () => {
      const seed = Date.now() >>> 0
      const rnd = prng(seed)
      for (let i = 0; i < 150; i++) {
        const length = 1 + Math.floor(rnd() * 300 * 1024)
        const offset = Math.floor(rnd() * (SIZE - length))
        if (rnd() < 0.6) {
          const data = randomBytes(length)
          await client.write(offset, data, rnd() < 0.1)
          data.copy(model, offset)
        } else {
          await check(offset, length).catch((err: Error) => { throw new Error(`seed ${seed}, op ${i}: ${err.message}`) })
        }
      }
      await check(0, SIZE)
    })

    test('200 pipelined requests in flight at once, all correct', async () => {
      const slot = 64 * 1024
      const datas = Array.from({ length: 200 }, () => randomBytes(slot))
      const writes = datas.map(async (d, i) => await client.write(i * slot, d))
      // Every request went onto the socket without waiting for a reply.
      assert.equal(client.inFlight, 200)
      await Promise.all(writes)
      datas.forEach((d, i) => d.copy(model, i * slot))
      const bufs = datas.map(() => Buffer.alloc(slot))
      const reads = bufs.map(async (b, i) => await client.read(i * slot, b))
      assert.equal(client.inFlight, 200)
      await Promise.all(reads)
      bufs.forEach((b, i) => assert.ok(b.equals(datas[i]!), `slot ${i}`))
    })

    test('a request larger than the maximum payload is split transparently', async () => {
      const length = client.maxPayload + 8 * MiB + 512
      const offset = 4096
      const data = randomBytes(length)
      await client.write(offset, data)
      data.copy(model, offset)
      await check(offset, length)
    })

    test('flush, and a FUA write', async () => {
      await client.flush()
      const data = randomBytes(8192)
      await client.write(SIZE - 8192, data, true)
      data.copy(model, SIZE - 8192)
      await check(SIZE - 8192, 8192)
    })

    test('writeZeroes (with and without noHole) and trim read back as zeroes', async () => {
      const region = 2 * MiB
      const base = 32 * MiB
      const data = randomBytes(3 * region)
      await client.write(base, data)
      data.copy(model, base)
      assert.ok((client.transmissionFlags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0, 'WRITE_ZEROES advertised')
      await client.writeZeroes(base, region)
      await client.writeZeroes(base + region, region, true)
      model.fill(0, base, base + 2 * region)
      await check(base, 3 * region)
      if ((client.transmissionFlags & NBD_FLAG_SEND_TRIM) !== 0) {
        await client.trim(base + 2 * region, region)
        if (f.trimZeroes) model.fill(0, base + 2 * region, base + 3 * region)
        await check(base, 3 * region)
      }
    })

    test('requests beyond the export or unaligned are refused before sending', async () => {
      await assert.rejects(client.read(SIZE - 4096, Buffer.alloc(8192)), isUkai('UKAI_ERR_OUT_OF_RANGE'))
      await assert.rejects(client.write(-1, Buffer.alloc(1)), isUkai('UKAI_ERR_INVALID_ARGUMENT'))
      await client.read(0, Buffer.alloc(0))
      assert.equal(client.closed, false)
    })
  })
}

// ---------------------------------------------------------------------------
// Server-specific behaviour

describe('NbdClient with qemu-nbd: errors and failures', { skip: !HAVE_QEMU_NBD && 'qemu-nbd is not installed' }, () => {
  test('an unknown export name is UKAI_ERR_NOT_FOUND with the server\'s text', async () => {
    const server = await startQemuNbd()
    try {
      await assert.rejects(NbdClient.connect(server.target, 'no-such-export', { timeoutMs: 5000 }), (err) => {
        isUkai('UKAI_ERR_NOT_FOUND')(err)
        assert.match((err as Error).message, /no-such-export/)
        return true
      })
      // The refusal left the server serving.
      const c = await NbdClient.connect(server.target, 'disk', { timeoutMs: 5000 })
      await c.close()
    } finally { await server.stop() }
  })

  test('a server killed with SIGKILL fails pending and later requests, and emits close', async () => {
    const server = await startQemuNbd()
    try {
      const c = await NbdClient.connect(server.target, 'disk', { timeoutMs: 10_000 })
      let closes = 0
      const closed = new Promise<void>((resolve) => c.on('close', () => { closes++; resolve() }))
      await c.write(0, randomBytes(MiB))
      const pending = Array.from({ length: 64 }, async (_, i) => i % 2 === 0
        ? await c.read(i * MiB, Buffer.alloc(MiB))
        : await c.write(i * MiB, randomBytes(MiB)))
      process.kill(server.pid, 'SIGKILL')
      const results = await Promise.all(pending.map(settle))
      // The requests were still corked when the server died: none can have been answered.
      assert.ok(results.some((r) => !r.ok), 'some requests failed')
      for (const r of results) if (!r.ok) isUkai()(r.error)
      await closed
      assert.equal(c.closed, true)
      await assert.rejects(c.read(0, Buffer.alloc(4096)), isUkai())
      await assert.rejects(c.flush(), isUkai())
      await c.close()
      assert.equal(closes, 1)
    } finally { await server.stop() }
  })

  test('a stopped server (SIGSTOP) times out with UKAI_ERR_TIMEOUT and closes the connection', async () => {
    const server = await startQemuNbd()
    try {
      const c = await NbdClient.connect(server.target, 'disk', { timeoutMs: 500 })
      const closed = once(c, 'close')
      await c.read(0, Buffer.alloc(4096))
      process.kill(server.pid, 'SIGSTOP')
      const a = c.read(0, Buffer.alloc(4096))
      const b = c.write(MiB, Buffer.alloc(4096))
      await assert.rejects(a, isUkai('UKAI_ERR_TIMEOUT'))
      await assert.rejects(b, isUkai('UKAI_ERR_TIMEOUT'))
      await closed
      assert.equal(c.closed, true)
      await assert.rejects(c.read(0, Buffer.alloc(4096)), isUkai('UKAI_ERR_TIMEOUT'))
      // A handshake with a stopped server times out too.
      await assert.rejects(NbdClient.connect(server.target, 'disk', { timeoutMs: 300 }), isUkai('UKAI_ERR_TIMEOUT'))
      process.kill(server.pid, 'SIGCONT')
    } finally { await server.stop() }
  })

  test('nothing listening is UKAI_ERR_CONNECT', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ukai-nbd-client-'))
    try {
      await assert.rejects(NbdClient.connect({ path: join(dir, 'none.sock') }, 'disk', { timeoutMs: 2000 }), isUkai('UKAI_ERR_CONNECT'))
      await assert.rejects(NbdClient.connect({ host: '127.0.0.1', port: 1 }, 'disk', { timeoutMs: 2000 }), isUkai('UKAI_ERR_CONNECT'))
    } finally { await rm(dir, { recursive: true, force: true }) }
  })
})

describe('NbdClient with nbdkit filters', { skip: !HAVE_NBDKIT && 'nbdkit is not installed' }, () => {
  test('advertised block size limits are obeyed (the server errors any request outside them)', async () => {
    const server = await startNbdkit('--filter=blocksize-policy', 'memory', '64M', 'blocksize-minimum=512',
      'blocksize-preferred=4096', 'blocksize-maximum=65536', 'blocksize-error-policy=error')
    const c = await NbdClient.connect(server.target, '', { timeoutMs: 10_000 })
    try {
      assert.equal(c.minBlockSize, 512)
      assert.equal(c.preferredBlockSize, 4096)
      assert.equal(c.maxPayload, 65536)
      const data = randomBytes(MiB + 512)
      await c.write(512, data)
      const back = Buffer.alloc(data.length)
      await c.read(512, back)
      assert.ok(back.equals(data))
      // Effect-only commands may exceed the maximum payload; the policy allows it for them.
      await c.writeZeroes(0, 2 * MiB)
      await c.read(0, back)
      assert.ok(back.equals(Buffer.alloc(back.length)))
      await assert.rejects(c.read(100, Buffer.alloc(512)), isUkai('UKAI_ERR_INVALID_ARGUMENT'))
      await assert.rejects(c.write(0, Buffer.alloc(100)), isUkai('UKAI_ERR_INVALID_ARGUMENT'))
      assert.equal(c.closed, false)
    } finally {
      await c.close()
      await server.stop()
    }
  })

  test('without WRITE_ZEROES, zeroes are written as data', async () => {
    const server = await startNbdkit('--filter=nozero', 'memory', '64M')
    const c = await NbdClient.connect(server.target, '', { timeoutMs: 10_000 })
    try {
      assert.equal(c.transmissionFlags & NBD_FLAG_SEND_WRITE_ZEROES, 0)
      await c.write(0, Buffer.alloc(10 * MiB, 0xab))
      await c.writeZeroes(4096, 9 * MiB, true)
      const back = Buffer.alloc(10 * MiB)
      await c.read(0, back)
      assert.ok(back.subarray(0, 4096).equals(Buffer.alloc(4096, 0xab)))
      assert.ok(back.subarray(4096, 4096 + 9 * MiB).equals(Buffer.alloc(9 * MiB)))
      assert.ok(back.subarray(4096 + 9 * MiB).equals(Buffer.alloc(MiB - 4096, 0xab)))
    } finally {
      await c.close()
      await server.stop()
    }
  })

  test('server error values map to UkaiError codes, and the connection survives them', async () => {
    const cases: Array<[string, string]> = [['EIO', 'UKAI_ERR_IO'], ['ENOSPC', 'UKAI_ERR_NO_SPACE'], ['EPERM', 'UKAI_ERR_PERMISSION'], ['EINVAL', 'UKAI_ERR_INVALID_ARGUMENT']]
    for (const [errno, code] of cases) {
      const server = await startNbdkit('--filter=error', 'memory', '64M', `error=${errno}`, 'error-pwrite-rate=100%')
      const c = await NbdClient.connect(server.target, '', { timeoutMs: 10_000 })
      try {
        await assert.rejects(c.write(8192, Buffer.alloc(4096, 1)), (err) => {
          isUkai(code)(err)
          assert.match((err as Error).message, /NBD_CMD_WRITE of 4096 bytes at offset 8192/)
          return true
        })
        await c.read(0, Buffer.alloc(4096))
        assert.equal(c.closed, false)
      } finally {
        await c.close()
        await server.stop()
      }
    }
  })

  test('a non-fixed newstyle server is reached with NBD_OPT_EXPORT_NAME', async () => {
    // --mask-handshake=0 offers neither NBD_FLAG_FIXED_NEWSTYLE nor NBD_FLAG_NO_ZEROES.
    const server = await startNbdkit('--mask-handshake=0', 'memory', '64M')
    const c = await NbdClient.connect(server.target, '', { timeoutMs: 10_000 })
    try {
      assert.equal(c.size, SIZE)
      await c.write(0, Buffer.alloc(4096, 7))
      const back = Buffer.alloc(4096)
      await c.read(0, back)
      assert.ok(back.equals(Buffer.alloc(4096, 7)))
    } finally {
      await c.close()
      await server.stop()
    }
  })
})

// ---------------------------------------------------------------------------
// A scripted server, for behaviour real servers will not show on demand

interface Request { type: number, flags: number, cookie: Buffer, offset: number, length: number }
type Mode = 'serve' | 'hold' | 'bad-magic' | 'unknown-cookie' | { error: number }

interface FakeOptions {
  transmissionFlags: number
  /** Answer NBD_OPT_GO with NBD_REP_ERR_UNSUP. */
  goUnsupported?: boolean
  /** Offer NBD_FLAG_NO_ZEROES. */
  noZeroes?: boolean
}

class FakeServer {
  readonly server: Server
  readonly path: string
  readonly received: Request[] = []
  readonly options: number[] = []
  readonly data = Buffer.alloc(MiB)
  mode: Mode = 'serve'
  private readonly opts: FakeOptions
  private readonly sockets = new Set<Socket>()

  private constructor (path: string, opts: FakeOptions) {
    this.path = path
    this.opts = opts
    this.server = createServer((s) => this.serve(s))
  }

  static async start (dir: string, opts: FakeOptions): Promise<FakeServer> {
    const f = new FakeServer(join(dir, `fake-${Math.random().toString(36).slice(2)}.sock`), opts)
    f.server.listen(f.path)
    await once(f.server, 'listening')
    return f
  }

  async stop (): Promise<void> {
    for (const s of this.sockets) s.destroy()
    await new Promise((resolve) => this.server.close(resolve))
  }

  private serve (s: Socket): void {
    this.sockets.add(s)
    s.on('error', () => {})
    s.on('close', () => this.sockets.delete(s))
    let buf = Buffer.alloc(0)
    let phase: 'flags' | 'options' | 'transmission' = 'flags'
    let clientNoZeroes = false
    const greeting = Buffer.alloc(18)
    greeting.writeBigUInt64BE(NBDMAGIC, 0)
    greeting.writeBigUInt64BE(IHAVEOPT, 8)
    greeting.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | (this.opts.noZeroes === true ? NBD_FLAG_NO_ZEROES : 0), 16)
    s.write(greeting)
    const optReply = (option: number, type: number, data = Buffer.alloc(0)): void => {
      const h = Buffer.alloc(20)
      h.writeBigUInt64BE(NBD_REP_MAGIC, 0)
      h.writeUInt32BE(option, 8)
      h.writeUInt32BE(type, 12)
      h.writeUInt32BE(data.length, 16)
      s.write(Buffer.concat([h, data]))
    }
    s.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk])
      const replies: Buffer[] = []
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) break
          clientNoZeroes = (buf.readUInt32BE(0) & 2) !== 0
          buf = buf.subarray(4)
          phase = 'options'
        } else if (phase === 'options') {
          if (buf.length < 16) break
          const option = buf.readUInt32BE(8)
          const len = buf.readUInt32BE(12)
          if (buf.length < 16 + len) break
          buf = buf.subarray(16 + len)
          this.options.push(option)
          if (option === NBD_OPT_GO && this.opts.goUnsupported !== true) {
            const info = Buffer.alloc(12)
            info.writeUInt16BE(NBD_INFO_EXPORT, 0)
            info.writeBigUInt64BE(BigInt(this.data.length), 2)
            info.writeUInt16BE(this.opts.transmissionFlags, 10)
            optReply(option, NBD_REP_INFO, info)
            optReply(option, NBD_REP_ACK)
            phase = 'transmission'
          } else if (option === NBD_OPT_EXPORT_NAME) {
            const r = Buffer.alloc(10 + (clientNoZeroes ? 0 : 124))
            r.writeBigUInt64BE(BigInt(this.data.length), 0)
            r.writeUInt16BE(this.opts.transmissionFlags, 8)
            s.write(r)
            phase = 'transmission'
          } else if (option === NBD_OPT_ABORT) {
            optReply(option, NBD_REP_ACK)
            s.end()
            return
          } else {
            optReply(option, NBD_REP_ERR_UNSUP)
          }
        } else {
          if (buf.length < 28) break
          assert.equal(buf.readUInt32BE(0), NBD_REQUEST_MAGIC)
          const req: Request = {
            flags: buf.readUInt16BE(4),
            type: buf.readUInt16BE(6),
            cookie: Buffer.from(buf.subarray(8, 16)),
            offset: Number(buf.readBigUInt64BE(16)),
            length: buf.readUInt32BE(24)
          }
          const payload = req.type === NBD_CMD_WRITE ? req.length : 0
          if (buf.length < 28 + payload) break
          if (req.type === NBD_CMD_WRITE) buf.copy(this.data, req.offset, 28, 28 + payload)
          buf = buf.subarray(28 + payload)
          this.received.push(req)
          if (req.type === NBD_CMD_DISC) {
            s.end()
            return
          }
          const r = this.reply(req)
          if (r !== undefined) replies.push(r)
        }
      }
      // Replies to one batch of requests go out in reverse order.
      for (const r of replies.reverse()) s.write(r)
    })
  }

  private reply (req: Request): Buffer | undefined {
    const mode = this.mode
    if (mode === 'hold') return undefined
    let error = 0
    if (typeof mode === 'object') error = mode.error
    if (req.type === NBD_CMD_WRITE_ZEROES || req.type === NBD_CMD_TRIM) this.data.fill(0, req.offset, req.offset + req.length)
    const withData = req.type === NBD_CMD_READ && error === 0
    const r = Buffer.alloc(16 + (withData ? req.length : 0))
    r.writeUInt32BE(mode === 'bad-magic' ? 0xdeadbeef : NBD_SIMPLE_REPLY_MAGIC, 0)
    r.writeUInt32BE(error, 4)
    req.cookie.copy(r, 8)
    if (mode === 'unknown-cookie') r.writeUInt32BE(r.readUInt32BE(12) ^ 0x40000000, 12)
    if (withData) this.data.copy(r, 16, req.offset, req.offset + req.length)
    return r
  }
}

describe('NbdClient with a scripted server', () => {
  let dir: string
  const fakes: FakeServer[] = []
  const fake = async (opts: FakeOptions): Promise<FakeServer> => {
    const f = await FakeServer.start(dir, opts)
    fakes.push(f)
    return f
  }
  const basic = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH

  before(async () => { dir = await mkdtemp(join(tmpdir(), 'ukai-nbd-fake-')) })
  after(async () => {
    for (const f of fakes) await f.stop()
    await rm(dir, { recursive: true, force: true })
  })

  test('falls back to NBD_OPT_EXPORT_NAME when NBD_OPT_GO is unsupported (with and without zero padding)', async () => {
    for (const noZeroes of [true, false]) {
      const f = await fake({ transmissionFlags: basic, goUnsupported: true, noZeroes })
      const c = await NbdClient.connect({ path: f.path }, 'x', { timeoutMs: 5000 })
      assert.deepEqual(f.options, [NBD_OPT_GO, NBD_OPT_EXPORT_NAME])
      assert.equal(c.size, MiB)
      await c.write(0, Buffer.alloc(512, 3))
      const b = Buffer.alloc(512)
      await c.read(0, b)
      assert.ok(b.equals(Buffer.alloc(512, 3)))
      await c.close()
    }
  })

  test('replies out of order reach the right requests', async () => {
    const f = await fake({ transmissionFlags: basic })
    randomBytes(MiB).copy(f.data)
    const c = await NbdClient.connect({ path: f.path }, '', { timeoutMs: 5000 })
    const bufs = Array.from({ length: 100 }, (_, i) => Buffer.alloc(512 + i))
    await Promise.all(bufs.map(async (b, i) => await c.read(i * 4096, b)))
    bufs.forEach((b, i) => assert.ok(b.equals(f.data.subarray(i * 4096, i * 4096 + b.length)), `read ${i}`))
    await c.close()
  })

  test('commands the server did not advertise are never sent', async () => {
    const f = await fake({ transmissionFlags: NBD_FLAG_HAS_FLAGS })
    f.data.fill(9)
    const c = await NbdClient.connect({ path: f.path }, '', { timeoutMs: 5000 })
    await c.trim(0, 8192)
    await c.flush()
    await c.writeZeroes(4096, 8192)
    await c.write(0, Buffer.alloc(4096, 1), true)
    const b = Buffer.alloc(16384)
    await c.read(0, b)
    assert.ok(b.subarray(0, 4096).equals(Buffer.alloc(4096, 1)))
    assert.ok(b.subarray(4096, 12288).equals(Buffer.alloc(8192)))
    assert.ok(b.subarray(12288).equals(Buffer.alloc(4096, 9)))
    assert.deepEqual(f.received.map((r) => r.type), [NBD_CMD_WRITE, NBD_CMD_WRITE, NBD_CMD_READ])
    await c.close()
    assert.equal(f.received.at(-1)?.type, NBD_CMD_DISC)
  })

  test('a garbage reply (bad magic, unknown cookie) fails every pending request with UKAI_ERR_IO', async () => {
    for (const mode of ['bad-magic', 'unknown-cookie'] as const) {
      const f = await fake({ transmissionFlags: basic })
      const c = await NbdClient.connect({ path: f.path }, '', { timeoutMs: 5000 })
      const closed = once(c, 'close')
      f.mode = 'hold'
      const held = settle(c.read(0, Buffer.alloc(512)))
      await new Promise((resolve) => setTimeout(resolve, 20))
      f.mode = mode
      const bad = c.read(512, Buffer.alloc(512))
      await assert.rejects(bad, isUkai('UKAI_ERR_IO'))
      const h = await held
      assert.equal(h.ok, false)
      if (!h.ok) isUkai('UKAI_ERR_IO')(h.error)
      await closed
      await assert.rejects(c.read(0, Buffer.alloc(512)), isUkai('UKAI_ERR_IO'))
    }
  })

  test('every error value maps to a UkaiError; NBD_ESHUTDOWN leads to a soft disconnect', async () => {
    const f = await fake({ transmissionFlags: basic })
    const c = await NbdClient.connect({ path: f.path }, '', { timeoutMs: 5000 })
    const cases: Array<[number, string]> = [[NBD_EIO, 'UKAI_ERR_IO'], [NBD_ENOSPC, 'UKAI_ERR_NO_SPACE'], [NBD_EPERM, 'UKAI_ERR_PERMISSION'], [NBD_EINVAL, 'UKAI_ERR_INVALID_ARGUMENT'], [12345, 'UKAI_ERR_IO']]
    for (const [error, code] of cases) {
      f.mode = { error }
      await assert.rejects(c.read(4096, Buffer.alloc(512)), isUkai(code))
      await assert.rejects(c.write(8192, Buffer.alloc(512)), (err) => {
        isUkai(code)(err)
        assert.match((err as Error).message, /NBD_CMD_WRITE of 512 bytes at offset 8192/)
        return true
      })
    }
    f.mode = 'serve'
    await c.read(0, Buffer.alloc(512))
    const closed = once(c, 'close')
    f.mode = { error: NBD_ESHUTDOWN }
    await assert.rejects(c.flush(), isUkai('UKAI_ERR_SHUTDOWN'))
    assert.equal(c.closed, true)
    await assert.rejects(c.read(0, Buffer.alloc(512)), isUkai('UKAI_ERR_SHUTDOWN'))
    await closed
    assert.equal(f.received.at(-1)?.type, NBD_CMD_DISC)
  })

  test('close() with nothing pending sends NBD_CMD_DISC', async () => {
    const f = await fake({ transmissionFlags: basic })
    const c = await NbdClient.connect({ path: f.path }, '', { timeoutMs: 5000 })
    await c.read(0, Buffer.alloc(512))
    await c.close()
    for (let i = 0; i < 100 && f.received.at(-1)?.type !== NBD_CMD_DISC; i++) await new Promise((resolve) => setTimeout(resolve, 10))
    assert.equal(f.received.at(-1)?.type, NBD_CMD_DISC)
  })

  test('close() fails pending requests with UKAI_ERR_SHUTDOWN and cuts the connection: nothing of theirs may be sent after they failed', async () => {
    const f = await fake({ transmissionFlags: basic })
    const c = await NbdClient.connect({ path: f.path }, '', { timeoutMs: 5000 })
    let closes = 0
    c.on('close', () => closes++)
    f.mode = 'hold'
    const pending = [c.read(0, Buffer.alloc(512)), c.write(512, Buffer.alloc(512)), c.flush()].map(settle)
    await new Promise((resolve) => setTimeout(resolve, 20))
    await c.close()
    for (const r of await Promise.all(pending)) {
      assert.equal(r.ok, false)
      if (!r.ok) isUkai('UKAI_ERR_SHUTDOWN')(r.error)
    }
    await assert.rejects(c.read(0, Buffer.alloc(512)), isUkai('UKAI_ERR_SHUTDOWN'))
    await c.close()
    assert.equal(closes, 1)
    assert.notEqual(f.received.at(-1)?.type, NBD_CMD_DISC, 'cut, not a soft disconnect')
  })

  test('a server that never answers the handshake times out', async () => {
    const path = join(dir, 'silent.sock')
    const sockets: Socket[] = []
    const silent = createServer((s) => { sockets.push(s); s.on('error', () => {}) })
    silent.listen(path)
    await once(silent, 'listening')
    try {
      await assert.rejects(NbdClient.connect({ path }, '', { timeoutMs: 200 }), isUkai('UKAI_ERR_TIMEOUT'))
    } finally {
      for (const s of sockets) s.destroy()
      await new Promise((resolve) => silent.close(resolve))
    }
  })

  test('bad arguments to connect are refused', async () => {
    await assert.rejects(NbdClient.connect({ path: '/nonexistent' }, 'x'.repeat(5000), { timeoutMs: 1000 }), isUkai('UKAI_ERR_INVALID_ARGUMENT'))
    await assert.rejects(NbdClient.connect({ path: '/nonexistent' }, 'x', { timeoutMs: 0 }), isUkai('UKAI_ERR_INVALID_ARGUMENT'))
  })
})

// ---------------------------------------------------------------------------
// The reply parser on its own

/** A table of in-flight requests: cookie -> READ length (or null for no payload). */
type Table = Map<number, number | null>

function runParser (table: Table, pieces: Buffer[]): { completed: Map<number, { error: number, data: Buffer | null }>, error: UkaiError | undefined } {
  const bufs = new Map<number, Buffer>()
  const completed = new Map<number, { error: number, data: Buffer | null }>()
  const parser = new ReplyParser({
    payloadOf: (cookie) => {
      if (!table.has(cookie) || completed.has(cookie)) return undefined
      const len = table.get(cookie)!
      if (len === null) return null
      let b = bufs.get(cookie)
      if (b === undefined) bufs.set(cookie, b = Buffer.alloc(len))
      return b
    },
    complete: (cookie, error) => {
      assert.ok(table.has(cookie) && !completed.has(cookie), `completion for cookie ${cookie}`)
      completed.set(cookie, { error, data: bufs.get(cookie) ?? null })
    }
  })
  let error: UkaiError | undefined
  for (const p of pieces) {
    const e = parser.push(p)
    if (error !== undefined) assert.equal(e, error, 'an error is final')
    error = e
  }
  if (error !== undefined) assert.equal(error.code, 'UKAI_ERR_IO')
  return { completed, error }
}

/** Splits `b` at the given cut points. */
const cut = (b: Buffer, cuts: number[]): Buffer[] => {
  const at = [...new Set(cuts.map((c) => c % (b.length + 1)))].sort((x, y) => x - y)
  const out: Buffer[] = []
  let prev = 0
  for (const c of at) {
    out.push(b.subarray(prev, c))
    prev = c
  }
  out.push(b.subarray(prev))
  return out
}

const replyArb = fc.record({
  cookie: fc.oneof(fc.integer({ min: 1, max: 1000 }), fc.constantFrom(2 ** 32, 2 ** 53 - 1)),
  read: fc.option(fc.integer({ min: 0, max: 300 }), { freq: 2 }),
  error: fc.oneof({ arbitrary: fc.constant(0), weight: 4 }, { arbitrary: fc.constantFrom(1, 5, 22, 28, 108, 0xffffffff), weight: 1 })
})

function encodeReplies (replies: Array<{ cookie: number, read: number | null, error: number }>): { table: Table, bytes: Buffer, payloads: Map<number, Buffer> } {
  const table: Table = new Map()
  const payloads = new Map<number, Buffer>()
  const parts: Buffer[] = []
  for (const r of replies) {
    if (table.has(r.cookie)) continue
    table.set(r.cookie, r.read)
    const h = Buffer.alloc(16)
    h.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0)
    h.writeUInt32BE(r.error, 4)
    h.writeUInt32BE(Math.floor(r.cookie / 2 ** 32), 8)
    h.writeUInt32BE(r.cookie >>> 0, 12)
    parts.push(h)
    if (r.read !== null && r.error === 0) {
      const p = randomBytes(r.read)
      payloads.set(r.cookie, p)
      parts.push(p)
    }
  }
  return { table, bytes: Buffer.concat(parts), payloads }
}

describe('ReplyParser', () => {
  test('well-formed replies parse the same however the stream is cut', () => {
    fc.assert(fc.property(fc.array(replyArb, { maxLength: 20 }), fc.array(fc.nat(), { maxLength: 30 }), (replies, cuts) => {
      const { table, bytes, payloads } = encodeReplies(replies)
      const { completed, error } = runParser(table, cut(bytes, cuts))
      assert.equal(error, undefined)
      assert.equal(completed.size, table.size)
      for (const r of replies) {
        const c = completed.get(r.cookie)!
        if (payloads.has(r.cookie)) assert.ok(c.data!.equals(payloads.get(r.cookie)!))
      }
    }), { numRuns: 300 })
  })

  test('random bytes either parse or report an error, never throw', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 400 }), fc.array(fc.nat(), { maxLength: 10 }), fc.array(replyArb, { maxLength: 5 }), (bytes, cuts, replies) => {
      const { table } = encodeReplies(replies)
      runParser(table, cut(Buffer.from(bytes), cuts))
    }), { numRuns: 500 })
  })

  test('mutated replies (flipped, cut, extended) either parse or report an error, never throw', () => {
    fc.assert(fc.property(
      fc.array(replyArb, { minLength: 1, maxLength: 10 }),
      fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { maxLength: 4 }),
      fc.nat(), fc.uint8Array({ maxLength: 40 }), fc.array(fc.nat(), { maxLength: 10 }),
      (replies, flips, keep, junk, cuts) => {
        const { table, bytes } = encodeReplies(replies)
        const b = Buffer.concat([Buffer.from(bytes), Buffer.from(junk)])
        for (const [at, x] of flips) if (b.length > 0) b[at % b.length] ^= x
        runParser(table, cut(b.subarray(0, keep % (b.length + 1)), cuts))
      }), { numRuns: 500 })
  })

  test('a structured reply chunk is refused: structured replies were never negotiated', () => {
    const b = Buffer.alloc(20)
    b.writeUInt32BE(0x668e33ef, 0)
    const { error } = runParser(new Map(), [b])
    assert.match(error!.message, /structured/)
  })
})
