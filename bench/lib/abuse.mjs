/**
 * Abusive NBD clients (the `abuse` phase): a fresh node (its own
 * metadata_root, no FUSE mount) with one image served over its NBD unix
 * socket, a well-behaved client on it, and 20 clients that abuse the
 * server at once, in three scenarios:
 *
 *   read-flood    each pipelines 400 READs of 32 MiB (12.5 GiB of replies
 *                 asked for) and never reads a reply;
 *   write-flood   each pipelines WRITEs of 32 MiB with their payloads, as
 *                 fast as its socket takes them, and never reads a reply
 *                 (each on an image of its own, so each is its image's
 *                 writer and the writes really run);
 *   disconnect    each sends 84 KB of READ headers (3000 READs of 32 MiB)
 *                 and disconnects at once, again and again.
 *
 * Measured in each, from /proc and by the clients: the node's RSS growth
 * (VmHWM, reset before the scenario through /proc/PID/clear_refs, and
 * VmRSS sampled every 100 ms, against VmRSS before), the well-behaved
 * client's 4 KiB read latency (100 reads one after the other, median and
 * max, against the same measured on the idle node first), a new client's
 * connect + handshake time (5 times), and the node's CPU time in the 3 s
 * after the abusers left and how long it stays busy (over 20% of a CPU)
 * after they left (work done for clients that are gone). Each scenario
 * starts on a quiet node.
 *
 * The NBD client here is a minimal one in plain JavaScript (fixed
 * newstyle, NBD_OPT_GO, simple replies). The abusers run in a worker
 * thread, so that their writes do not delay the measuring client. Every
 * wait is bounded: what does not finish in time is reported as such,
 * never waited for.
 */
import { connect } from 'node:net'
import { readFile, writeFile } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads'
import { median, max } from './stats.mjs'

const MIB = 2 ** 20
const NBD_REQUEST_MAGIC = 0x25609513
const NBD_SIMPLE_REPLY_MAGIC = 0x67446698
const IHAVEOPT = Buffer.from('IHAVEOPT')
const NBD_OPT_GO = 7
const NBD_REP_ACK = 1
const NBD_CMD_READ = 0
const NBD_CMD_WRITE = 1
const ABUSERS = 20
/** Targets (docs/NBD.md, "Limits"): what 20 abusive clients may cost. */
export const ABUSE_TARGETS = { rssGrowthBytes: 256 * MIB, goodReadMs: 100 }

/** A byte stream read by exact lengths. */
class Bytes {
  constructor (socket) {
    this.chunks = []
    this.length = 0
    this.waiter = undefined
    this.ended = false
    socket.on('data', (c) => { this.chunks.push(c); this.length += c.length; this.check() })
    socket.on('close', () => { this.ended = true; this.check() })
  }

  check () {
    const w = this.waiter
    if (w === undefined) return
    if (this.length >= w.n) { this.waiter = undefined; w.resolve(this.take(w.n)) } else if (this.ended) { this.waiter = undefined; w.reject(new Error('connection closed')) }
  }

  take (n) {
    const all = Buffer.concat(this.chunks)
    this.chunks = [all.subarray(n)]
    this.length -= n
    return all.subarray(0, n)
  }

  async read (n) {
    if (this.length >= n) return this.take(n)
    if (this.ended) throw new Error('connection closed')
    return await new Promise((resolve, reject) => { this.waiter = { n, resolve, reject } })
  }
}

/** Connects and negotiates `name` (NBD_OPT_GO); resolves with the socket and its reader in transmission. */
async function nbdConnect (path, name) {
  const socket = connect({ path })
  socket.on('error', () => {})
  await new Promise((resolve, reject) => { socket.once('connect', resolve); socket.once('close', () => reject(new Error('refused'))) })
  const r = new Bytes(socket)
  const hello = await r.read(18)
  if (!hello.subarray(8, 16).equals(IHAVEOPT)) throw new Error('not a fixed newstyle NBD server')
  socket.write(Buffer.from([0, 0, 0, 3])) // FIXED_NEWSTYLE | NO_ZEROES
  const n = Buffer.from(name)
  const data = Buffer.alloc(4 + n.length + 2)
  data.writeUInt32BE(n.length, 0)
  n.copy(data, 4)
  const opt = Buffer.alloc(16)
  IHAVEOPT.copy(opt, 0)
  opt.writeUInt32BE(NBD_OPT_GO, 8)
  opt.writeUInt32BE(data.length, 12)
  socket.write(Buffer.concat([opt, data]))
  for (;;) {
    const h = await r.read(20)
    const type = h.readUInt32BE(12)
    await r.read(h.readUInt32BE(16))
    if (type === NBD_REP_ACK) break
    if (type >= 2 ** 31) throw new Error(`NBD_OPT_GO refused (0x${type.toString(16)})`)
  }
  return { socket, r }
}

function header (type, cookie, offset, length) {
  const b = Buffer.alloc(28)
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0)
  b.writeUInt16BE(type, 6)
  b.writeUInt32BE(cookie, 12)
  b.writeUInt32BE(Math.floor(offset / 2 ** 32), 16)
  b.writeUInt32BE(offset % 2 ** 32, 20)
  b.writeUInt32BE(length, 24)
  return b
}

function readHeaders (n, length, span) {
  return Buffer.concat(Array.from({ length: n }, (_, i) => header(NBD_CMD_READ, i, (i * length) % span, length)))
}

/** Rejects after `ms` (the promise itself is left to settle or not). */
async function bounded (p, ms, what) {
  let timer
  try {
    return await Promise.race([p, new Promise((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no answer in ${Math.round(ms / 100) / 10} s`)), ms) })])
  } finally { clearTimeout(timer) }
}

/**
 * `count` 4 KiB reads one after the other on an open connection, all
 * within `timeoutMs`: their latencies in ms. Throws when the series does
 * not finish in time (the error says how many came back).
 */
async function timedReads (c, count, timeoutMs) {
  const out = []
  const deadline = performance.now() + timeoutMs
  for (let i = 0; i < count; i++) {
    const t0 = performance.now()
    c.socket.write(header(NBD_CMD_READ, 1_000_000 + i, (i % 256) * 4096, 4096))
    const reply = await bounded(c.r.read(16 + 4096), Math.max(1, deadline - t0), 'a 4 KiB read')
      .catch((err) => { throw new Error(`${err.message} (${out.length} of ${count} reads answered in ${timeoutMs / 1000} s${out.length > 0 ? `, the slowest ${max(out).toFixed(1)} ms` : ''})`) })
    if (reply.readUInt32BE(0) !== NBD_SIMPLE_REPLY_MAGIC || reply.readUInt32BE(4) !== 0) throw new Error('4 KiB read failed')
    out.push(performance.now() - t0)
  }
  return out
}

/** Connect + handshake of a new client, `count` times: ms each (Infinity when it did not finish in `timeoutMs`). */
async function timedHandshakes (path, name, count, timeoutMs) {
  const out = []
  for (let i = 0; i < count; i++) {
    const t0 = performance.now()
    let c
    const attempt = nbdConnect(path, name)
    try {
      c = await bounded(attempt, timeoutMs, 'handshake')
      out.push(performance.now() - t0)
    } catch {
      out.push(Infinity)
      // One that did not finish is not waited for again.
      attempt.then((late) => late.socket.destroy(), () => {})
      break
    } finally { c?.socket.destroy() }
  }
  return out
}

async function procStatus (pid) {
  const text = await readFile(`/proc/${pid}/status`, 'utf8')
  const kb = (k) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN) * 1024
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') }
}

/** User + system CPU seconds of a process. */
async function cpuSeconds (pid) {
  const f = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1].split(' ')
  return (Number(f[11]) + Number(f[12])) / 100
}

/**
 * The abusive clients of one scenario, in a worker thread of their own:
 * their socket writes must not delay the well-behaved client's event loop
 * (in this thread), whose latency is measured. `stop()` ends every one of
 * them and the worker.
 */
function abusersInWorker (kind, path, images) {
  const worker = new Worker(new URL(import.meta.url), { workerData: { kind, path, images } })
  let connected = 0
  let stopped
  const done = new Promise((resolve) => { stopped = resolve })
  worker.on('message', (m) => {
    if (m.connected !== undefined) connected = m.connected
    if (m.stopped === true) stopped()
  })
  worker.on('error', () => stopped())
  worker.on('exit', () => stopped())
  return {
    connected: () => connected,
    stop: async () => {
      worker.postMessage('stop')
      await bounded(done, 30_000, 'abusers to stop').catch(() => {})
      await worker.terminate()
    }
  }
}

if (!isMainThread && workerData?.kind !== undefined) {
  const a = startAbusers(workerData.kind, workerData.path, workerData.images)
  const report = setInterval(() => parentPort.postMessage({ connected: a.connected() }), 100)
  parentPort.on('message', async (m) => {
    if (m !== 'stop') return
    clearInterval(report)
    await a.stop()
    parentPort.postMessage({ stopped: true })
  })
}

/** The abusive clients of one scenario; `stop()` ends every one of them. */
function startAbusers (kind, path, images) {
  const sockets = new Set()
  let stopped = false
  const payload = Buffer.alloc(32 * MIB, 0x5a)
  const one = async (i) => {
    if (kind === 'read-flood') {
      const c = await nbdConnect(path, images.shared)
      sockets.add(c.socket)
      c.socket.pause()
      c.socket.write(readHeaders(400, 32 * MIB, 2 ** 30))
    } else if (kind === 'write-flood') {
      const c = await nbdConnect(path, images.own[i])
      sockets.add(c.socket)
      c.socket.pause()
      let cookie = 0
      // As fast as the socket takes them, never reading a reply.
      const more = () => {
        while (!stopped && !c.socket.destroyed && c.socket.writableLength < 2 * 32 * MIB) {
          c.socket.write(header(NBD_CMD_WRITE, cookie++, 0, payload.length))
          c.socket.write(payload)
        }
      }
      c.socket.on('drain', more)
      more()
    } else {
      // 84 KB of READ headers, then gone; again and again.
      const burst = readHeaders(3000, 32 * MIB, 2 ** 30)
      while (!stopped) {
        try {
          const c = await nbdConnect(path, images.shared)
          c.socket.write(burst)
          c.socket.destroy()
        } catch {}
        await sleep(100)
      }
    }
  }
  const started = Promise.allSettled(Array.from({ length: ABUSERS }, (_, i) => one(i)))
  return {
    started,
    connected: () => sockets.size,
    stop: async () => {
      stopped = true
      for (const s of sockets) s.destroy()
      await bounded(started, 30_000, 'abusers to stop').catch(() => {})
    }
  }
}

/**
 * @param {{ node: import('./ukai.mjs').UkaiNode, quick: boolean, rawDir: string, log: (s: string) => void }} o
 */
export async function abuse (o) {
  const node = o.node
  const path = node.nbdSocket
  const images = { shared: 'abuse', own: Array.from({ length: ABUSERS }, (_, i) => `abuse-w${String(i).padStart(2, '0')}`) }
  for (const name of [images.shared, ...images.own]) {
    await node.api('POST', '/v1/images', { name, size: 2 ** 30, block_size: 64 * MIB })
  }
  const holdMs = o.quick ? 1000 : 3000
  const quietLimitMs = o.quick ? 60_000 : 180_000
  const reads = 100
  // The well-behaved client: connected first (so it is the shared image's writer), kept for the whole phase.
  let good = await nbdConnect(path, images.shared)
  good.socket.write(Buffer.concat([header(NBD_CMD_WRITE, 1, 0, 4096 * 256), Buffer.alloc(4096 * 256, 0x11)]))
  await good.r.read(16)
  await timedReads(good, 20, 10_000) // warm-up
  const idle = {
    readMs: await timedReads(good, reads, 10_000),
    handshakeMs: await timedHandshakes(path, images.shared, 5, 10_000),
    rss: (await procStatus(node.pid)).rss
  }
  o.log(`  idle: 4 KiB read median ${median(idle.readMs).toFixed(2)} ms, max ${max(idle.readMs).toFixed(2)} ms; handshake ${median(idle.handshakeMs).toFixed(2)} ms; RSS ${(idle.rss / MIB).toFixed(0)} MiB`)
  const scenarios = []
  for (const kind of ['read-flood', 'write-flood', 'disconnect']) {
    // A fresh peak for this scenario (VmHWM back to VmRSS); if the kernel
    // refuses, the sampled VmRSS still bounds it from below.
    const hwmReset = await writeFile(`/proc/${node.pid}/clear_refs`, '5').then(() => true, () => false)
    const before = await procStatus(node.pid)
    let sampledMax = before.rss
    let sampling = true
    const sampler = (async () => {
      while (sampling) {
        try { sampledMax = Math.max(sampledMax, (await procStatus(node.pid)).rss) } catch {}
        await sleep(100)
      }
    })()
    const cpu0 = await cpuSeconds(node.pid)
    const t0 = performance.now()
    const abusers = abusersInWorker(kind, path, images)
    const s = { kind, abusers: ABUSERS, rssBefore: before.rss, hwmReset }
    try {
      await sleep(holdMs)
      s.connected = abusers.connected()
      try {
        s.readMs = await timedReads(good, reads, 60_000)
      } catch (err) {
        s.readError = err.message
      }
      s.handshakeMs = await timedHandshakes(path, images.shared, 5, 30_000)
    } finally {
      const cpuAbuse = await cpuSeconds(node.pid)
      s.abuseSeconds = (performance.now() - t0) / 1000
      s.cpuDuringAbuse = cpuAbuse - cpu0
      await abusers.stop()
      // The node's CPU time second by second after they left: for 3 s,
      // and until a second in which it used under 20% of a CPU (the work
      // it goes on doing for clients that are gone). The next scenario
      // starts on a quiet node.
      const perSecond = []
      const leftAt = performance.now()
      for (;;) {
        const c0 = await cpuSeconds(node.pid)
        await sleep(1000)
        perSecond.push(await cpuSeconds(node.pid) - c0)
        const quiet = perSecond.findIndex((x) => x < 0.2)
        if (quiet >= 0 && s.busyAfterLeftSeconds === undefined) s.busyAfterLeftSeconds = quiet
        if (perSecond.length >= 3 && quiet >= 0) break
        if (performance.now() - leftAt > quietLimitMs) { s.stillBusy = true; s.busyAfterLeftSeconds = perSecond.length; break }
      }
      s.cpuAfterLeft = perSecond.slice(0, 3).reduce((a, b) => a + b, 0)
      sampling = false
      await sampler
      const after = await procStatus(node.pid)
      s.rssAfter = after.rss
      s.hwm = after.hwm
      s.rssGrowth = Math.max(sampledMax, hwmReset ? after.hwm : 0) - before.rss
    }
    const f = (xs) => xs === undefined ? 'n/a' : xs.some((x) => !Number.isFinite(x)) ? 'not done in time' : `median ${median(xs).toFixed(2)} ms, max ${max(xs).toFixed(2)} ms`
    o.log(`  ${kind}: RSS +${(s.rssGrowth / MIB).toFixed(0)} MiB; good 4 KiB reads ${s.readError ?? f(s.readMs)}; new handshakes ${f(s.handshakeMs)}; node CPU ${s.cpuDuringAbuse.toFixed(2)} s in ${s.abuseSeconds.toFixed(1)} s of abuse, ${s.cpuAfterLeft.toFixed(2)} s in the 3 s after they left, busy ${s.stillBusy === true ? 'for more than' : 'for'} ${s.busyAfterLeftSeconds} s after they left`)
    scenarios.push(s)
    if (s.readError !== undefined) {
      // Its read never came back: a new connection for the next scenario.
      good.socket.destroy()
      try {
        good = await bounded(nbdConnect(path, images.shared), 60_000, 'the well-behaved client connecting again')
      } catch (err) {
        o.log(`  ${err.message}: the remaining scenarios are not run`)
        break
      }
    }
  }
  // The node and its directory go with the phase: its images are not destroyed one by one.
  good?.socket.destroy()
  return { abusers: ABUSERS, reads, holdMs, idle, scenarios, targets: ABUSE_TARGETS }
}
