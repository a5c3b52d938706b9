/**
 * A chaos writer: a process of its own (forked by the harness, with an
 * IPC channel), so killing the node it writes through never loses the
 * model. It writes self-describing data (pattern.ts) to one image, through
 * NBD (one connection, every lane's write in flight on it) or through the
 * node's FUSE mount (O_DIRECT, a write counts once write() returned all of
 * its bytes), and appends one line per finished write to its log:
 *
 *   A <lane> <seq> <offset> <length>          acknowledged
 *   F <lane> <seq> <offset> <length> <code>   failed (may have landed, wholly or in part)
 *
 * Each lane owns a region of the image and has one write in flight at a
 * time, so a region's log lines are in the order its writes were made.
 * A request is never given up on: a lane waits for its reply (or for the
 * connection to die with the node), and a connection is closed only once
 * nothing is in flight on it, so no abandoned write can land behind a
 * later one. After a failure the connection is drained and opened again.
 * A flusher flushes (NBD flush, FUSE fsync) every `flushMs`.
 *
 * Messages from the harness: {cmd: 'pause', id} (answers {ev: 'paused', id} once
 * no write is in flight), {cmd: 'resume'}, {cmd: 'exit'}. The process
 * exits when the harness goes away.
 */
import { closeSync, constants as fsConstants, openSync, writeSync } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { NbdClient } from '../../src/peer/nbd-client.js'
import { prng } from '../helpers/assertions.js'
import { SECTOR, writeData, writeDataInto } from './pattern.js'

export interface WriterOptions {
  kind: 'nbd' | 'fuse'
  image: string
  /** NBD: the unix socket; FUSE: the image's file on the mount. */
  target: string
  stream: number
  seed: number
  /** [start, end) byte regions, one lane each. */
  lanes: Array<[number, number]>
  log: string
  flushMs: number
  /** Largest write, bytes. */
  maxLength: number
  /** A lane's pause after each write, ms (0: none), so that one writer does not starve the other. */
  paceMs: number
}

interface Device {
  write: (offset: number, data: Buffer) => Promise<void>
  flush: () => Promise<void>
  close: () => Promise<void>
  /** Set when the device died on its own (connection closed). */
  dead: boolean
}

const opts = JSON.parse(process.argv[2]!) as WriterOptions
const rnd = prng(opts.seed)
const logFd = openSync(opts.log, 'a')
const send = (msg: unknown): void => { if (process.connected) process.send!(msg) }

/**
 * FUSE: each lane writes from a page-aligned buffer of its own, as QEMU
 * does with O_DIRECT. The kernel cuts a direct write into FUSE requests
 * at the pages of the caller's buffer; from a buffer that is not
 * page-aligned (Node's Buffers) the cuts fall inside sectors, and a write
 * that fails half way would look torn inside a sector, which no
 * hypervisor's aligned I/O can cause. WebAssembly memory is page-aligned.
 */
const slotSize = Math.ceil(opts.maxLength / 4096) * 4096
const slots = opts.kind === 'fuse'
  ? Buffer.from(new WebAssembly.Memory({ initial: Math.ceil(slotSize * opts.lanes.length / 65536) }).buffer)
  : undefined

let seq = 0
let paused = false
/** The pause request not yet answered. */
let pauseId: number | undefined
let exiting = false
let resumeWaiters: Array<() => void> = []
let idleWaiters: Array<() => void> = []
let inflight = 0
const stats = { acked: 0, failed: 0, flushes: 0, flushesFailed: 0, connects: 0, errors: {} as Record<string, number> }

function countError (err: unknown): string {
  const e = err as { code?: string, message?: string }
  const code = e.code ?? 'ERR'
  const msg = `${code}: ${String(e.message ?? err).replace(/\d+/g, 'N').slice(0, 160)}`
  stats.errors[msg] = (stats.errors[msg] ?? 0) + 1
  return code
}

const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))

async function connect (): Promise<Device> {
  if (opts.kind === 'nbd') {
    const c = await NbdClient.connect({ path: opts.target }, opts.image, { timeoutMs: 60_000 })
    if (c.readOnly) {
      await c.close().catch(() => {})
      throw Object.assign(new Error('export is read-only'), { code: 'READONLY' })
    }
    const dev: Device = {
      dead: false,
      write: async (offset, data) => await c.write(offset, data),
      flush: async () => await c.flush(),
      close: async () => await c.close()
    }
    c.once('close', () => { dev.dead = true })
    return dev
  }
  const fh: FileHandle = await open(opts.target, fsConstants.O_RDWR | fsConstants.O_DIRECT)
  return {
    dead: false,
    write: async (offset, data) => {
      const { bytesWritten } = await fh.write(data, 0, data.length, offset)
      if (bytesWritten !== data.length) throw Object.assign(new Error(`short write: ${bytesWritten} of ${data.length} bytes`), { code: 'SHORT', written: bytesWritten })
    },
    flush: async () => await fh.datasync(),
    close: async () => await fh.close()
  }
}

/** The current device, and whether it is to be replaced once drained. */
let device: Device | undefined
let bad = false
let connecting: Promise<Device> | undefined

async function getDevice (): Promise<Device> {
  for (;;) {
    if (device !== undefined && !bad && !device.dead) return device
    if (device !== undefined) {
      // Replace it once nothing is in flight on it.
      if (inflight > 0) { await waitIdle(); continue }
      const old = device
      device = undefined
      await old.close().catch(() => {})
    }
    connecting ??= (async () => {
      for (let attempt = 0; ; attempt++) {
        if (exiting) throw new Error('exiting')
        try {
          const d = await connect()
          stats.connects++
          send({ ev: 'connected', connects: stats.connects })
          return d
        } catch (err) {
          countError(err)
          await sleep(Math.min(500, 50 * (attempt + 1)))
        }
      }
    })()
    try {
      const d = await connecting
      device = d
      bad = false
    } finally { connecting = undefined }
  }
}

async function waitIdle (): Promise<void> {
  if (inflight === 0) return
  await new Promise<void>((resolve) => idleWaiters.push(resolve))
}

function done (): void {
  inflight--
  if (inflight === 0) {
    const w = idleWaiters
    idleWaiters = []
    for (const f of w) f()
    if (paused && pauseId !== undefined) { send({ ev: 'paused', id: pauseId, stats }); pauseId = undefined }
  }
}

async function waitResume (): Promise<void> {
  while (paused && !exiting) await new Promise<void>((resolve) => resumeWaiters.push(resolve))
}

/** A write length in sectors: mostly small, some large. */
function pickLength (room: number): number {
  const r = rnd()
  const max = Math.min(room, opts.maxLength / SECTOR)
  let n: number
  if (r < 0.55) n = 1 + Math.floor(rnd() * 16)
  else if (r < 0.9) n = 8 * (1 + Math.floor(rnd() * 16))
  else n = 128 + Math.floor(rnd() * 385)
  return Math.max(1, Math.min(n, max))
}

async function lane (i: number): Promise<void> {
  const [start, end] = opts.lanes[i]!
  const sectors = (end - start) / SECTOR
  while (!exiting) {
    await waitResume()
    if (exiting) return
    const dev = await getDevice().catch(() => undefined)
    if (dev === undefined) return
    if (paused) continue
    const n = pickLength(sectors)
    const offset = start + SECTOR * Math.floor(rnd() * (sectors - n + 1))
    const length = n * SECTOR
    const s = ++seq
    let data: Buffer
    if (slots !== undefined) {
      data = slots.subarray(i * slotSize, i * slotSize + length)
      writeDataInto(data, opts.stream, s, offset)
    } else {
      data = writeData(opts.stream, s, offset, length)
    }
    inflight++
    try {
      await dev.write(offset, data)
      stats.acked++
      writeSync(logFd, `A ${i} ${s} ${offset} ${length}\n`)
    } catch (err) {
      stats.failed++
      const code = countError(err)
      // A short write (a direct write the kernel cut into FUSE requests,
      // the first ones done): what write() said it wrote is acknowledged.
      const written = (err as { written?: number }).written ?? 0
      const acked = written - written % SECTOR
      if (acked > 0) writeSync(logFd, `A ${i} ${s} ${offset} ${acked}\n`)
      writeSync(logFd, `F ${i} ${s} ${offset + acked} ${length - acked} ${code}\n`)
      bad = true
    } finally { done() }
    if (opts.paceMs > 0) await sleep(opts.paceMs)
  }
}

async function flusher (): Promise<void> {
  while (!exiting) {
    await sleep(opts.flushMs)
    await waitResume()
    if (exiting) return
    const dev = device
    if (dev === undefined || bad || dev.dead) continue
    inflight++
    try {
      await dev.flush()
      stats.flushes++
    } catch (err) {
      stats.flushesFailed++
      countError(err)
      writeSync(logFd, `FL fail ${(err as Error).message.replace(/\n/g, ' ').slice(0, 200)}\n`)
      bad = true
    } finally { done() }
  }
}

process.on('message', (msg: { cmd: string, id?: number }) => {
  if (msg.cmd === 'pause') {
    paused = true
    pauseId = msg.id
    if (inflight === 0) { send({ ev: 'paused', id: pauseId, stats }); pauseId = undefined }
  } else if (msg.cmd === 'resume') {
    paused = false
    const w = resumeWaiters
    resumeWaiters = []
    for (const f of w) f()
  } else if (msg.cmd === 'stats') {
    send({ ev: 'stats', stats, inflight })
  } else if (msg.cmd === 'exit') {
    exiting = true
    paused = false
    for (const f of resumeWaiters) f()
    setTimeout(() => process.exit(0), 2000).unref()
    void waitIdle().then(async () => {
      await device?.close().catch(() => {})
      closeSync(logFd)
      process.exit(0)
    })
  }
})
// The harness went away: nothing may be left running.
process.on('disconnect', () => process.exit(0))

send({ ev: 'ready' })
void Promise.all([...opts.lanes.map((_, i) => lane(i)), flusher()])
