/**
 * The NBD server: serves the node's images to hypervisors over the Network
 * Block Device protocol (NetworkBlockDevice/nbd, doc/proto.md), fixed
 * newstyle, on a unix socket or TCP (loopback unless an address is
 * given). Export names are image names. See docs/NBD.md.
 *
 * The server lives in the `ukai server` process next to the FUSE mount;
 * both reach the same Volume of an image, so every I/O follows the same
 * rules (replication, failover, dirty log, single writer).
 */
import { lstat, unlink } from 'node:fs/promises'
import { connect, createServer, type Server, type Socket } from 'node:net'
import { resolve } from 'node:path'
import { UkaiError, invalidArgument, toUkaiError } from '../../errors.js'
import type { UkaiNode } from '../../node/node.js'
import { processBudget, type BufferBudget } from './budget.js'
import { HANDSHAKE_TIMEOUT_MS, IO_TIMEOUT_MS, NbdConnection } from './connection.js'
import { VolumeExports, type ExportProvider } from './exports.js'
import { isLoopbackAddress } from '../../config/config.js'
import type { NodeTls } from '../../tls/identity.js'

/**
 * Connections one server serves at once; more are refused. Peers open two
 * connections per image they hold a replica of here, so a node holding
 * replicas of a few hundred images for other nodes needs several hundred.
 */
export const MAX_CONNECTIONS = 1024
/** Refused connections are reported at most this often. */
const REFUSAL_WARN_MS = 10_000

export interface NbdServerOptions {
  /** Serve every export read-only (NBD_FLAG_READ_ONLY). */
  readOnly?: boolean
  /**
   * What to serve; the node's images by default. The peer protocol serves
   * other exports (replicas) through the same server code.
   */
  exports?: ExportProvider
  /**
   * Bytes held for clients (requests received and not yet served, replies
   * not yet taken) across connections; by default the budget every server
   * in the process shares (128 MiB).
   */
  budget?: BufferBudget
  /** Connections served at once (default MAX_CONNECTIONS); more are refused. */
  maxConnections?: number
  /** A client must finish its handshake this soon after connecting (default 60 s). */
  handshakeTimeoutMs?: number
  /**
   * A client stuck this long in the middle of a request (a WRITE whose
   * payload does not arrive) or not taking its replies is dropped, and its
   * export released (default 30 s). Idle clients are never dropped.
   */
  ioTimeoutMs?: number
  /**
   * The node's TLS identity for TCP listeners (default: the node's own,
   * from config key tls_dir). With one, TCP clients must speak TLS with a
   * certificate of the cluster CA; without one, TCP is allowed only on
   * loopback. Unix sockets are always plain text.
   */
  tls?: NodeTls | null
}

export type ListenTarget = { path: string } | { host: string, port: number }

/**
 * "SOCKET|HOST:PORT": a unix socket path (contains '/' or ends in .sock),
 * else a TCP address; a port alone listens on loopback ("10809" ->
 * 127.0.0.1:10809). IPv6 hosts in brackets: "[::1]:10809".
 */
export function parseListenSpec (spec: string): ListenTarget {
  if (typeof spec !== 'string' || spec.length === 0 || spec.includes('\0')) {
    throw invalidArgument(`invalid NBD listen address ${JSON.stringify(spec)}: expected SOCKET or [HOST:]PORT`)
  }
  if (spec.includes('/') || spec.endsWith('.sock')) return { path: resolve(spec) }
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(spec) ?? /^()()(\d{1,5})$/.exec(spec)
  const port = Number(m?.[3])
  if (m === null || !(port >= 1 && port <= 65535)) {
    throw invalidArgument(`invalid NBD listen address ${JSON.stringify(spec)}: expected SOCKET, HOST:PORT or PORT (1-65535)`)
  }
  const host = m[1] !== undefined && m[1] !== '' ? m[1] : (m[2] !== undefined && m[2] !== '' ? m[2] : '127.0.0.1')
  return { host, port }
}

interface Listener { server: Server, spec: string }

export class NbdServer {
  readonly node: UkaiNode
  private readonly exports: ExportProvider
  private readonly listeners: Listener[] = []
  private readonly connections = new Set<NbdConnection>()
  private closing = false
  readonly budget: BufferBudget
  readonly maxConnections: number
  private readonly handshakeTimeoutMs: number
  private readonly ioTimeoutMs: number
  private readonly tls: NodeTls | undefined
  private sweep: NodeJS.Timeout | undefined
  private refused = 0
  private refusalWarnedAt = -Infinity

  constructor (node: UkaiNode, options: NbdServerOptions = {}) {
    this.node = node
    this.exports = options.exports ?? new VolumeExports(node, options.readOnly ?? false)
    this.budget = options.budget ?? processBudget
    this.maxConnections = Math.max(1, options.maxConnections ?? MAX_CONNECTIONS)
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS
    this.ioTimeoutMs = options.ioTimeoutMs ?? IO_TIMEOUT_MS
    this.tls = options.tls === null ? undefined : (options.tls ?? node.tls)
  }

  /** Starts listening on `spec` (see parseListenSpec); may be called for several addresses. */
  async listen (spec: string): Promise<void> {
    if (this.closing) throw new UkaiError('UKAI_ERR_SHUTDOWN', 'the NBD server is closed')
    const target = parseListenSpec(spec)
    const tls = 'path' in target ? undefined : this.tls
    if (!('path' in target) && tls === undefined && !isLoopbackAddress(target.host)) {
      throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT',
        `NBD server cannot listen on ${spec}: plain-text NBD is served only on loopback and unix sockets; give the node a TLS identity (config key tls_dir) to serve ${target.host}`, { nbd: spec })
    }
    // allowHalfOpen: a client that shuts down its sending side still gets
    // the replies to what it sent.
    const server = createServer({ allowHalfOpen: true }, (socket) => this.accept(socket, tls))
    try {
      await listenOn(server, target)
    } catch (err) {
      if ('path' in target && (err as NodeJS.ErrnoException).code === 'EADDRINUSE' && await isStaleSocket(target.path)) {
        // Left by a node that was killed: nobody answers on it.
        await unlink(target.path)
        await listenOn(server, target)
      } else {
        const code = (err as NodeJS.ErrnoException).code === 'EADDRINUSE' ? 'UKAI_ERR_BUSY' : toUkaiError(err).code
        throw new UkaiError(code === 'UKAI_ERR_INTERNAL' ? 'UKAI_ERR_INVALID_ARGUMENT' : code,
          `NBD server cannot listen on ${spec}: ${(err as Error).message}`, { nbd: spec }, { cause: err })
      }
    }
    server.on('error', (err) => this.warn(`NBD server ${spec}: ${err.message}`))
    this.listeners.push({ server, spec })
  }

  /** Stops listening, ends every connection (in-flight requests are answered first), releases the volumes. */
  async close (): Promise<void> {
    this.closing = true
    const stopped = this.listeners.splice(0).map(async ({ server }) =>
      await new Promise<void>((resolve) => server.close(() => resolve())))
    for (const c of this.connections) c.shutdown()
    await Promise.all([...this.connections].map(async (c) => await c.closed))
    this.stopSweep()
    // A unix socket's file goes with its listener (libuv unlinks it).
    await Promise.all(stopped)
  }

  /** Open connections (for status and tests). */
  get connectionCount (): number { return this.connections.size }

  /** Bytes this server's connections hold (received and not served, replies not taken). */
  get bufferedBytes (): number {
    let n = 0
    for (const c of this.connections) n += c.accounted
    return n
  }

  private accept (socket: Socket, tls: NodeTls | undefined): void {
    if (this.closing) {
      socket.destroy()
      return
    }
    if (this.connections.size >= this.maxConnections) {
      this.refuse(socket)
      return
    }
    const c = new NbdConnection(socket, this.exports, (m) => this.warn(m), {
      budget: this.budget,
      handshakeTimeoutMs: this.handshakeTimeoutMs,
      notice: (m) => this.node.notice(m),
      tls
    })
    this.connections.add(c)
    void c.closed.then(() => {
      this.connections.delete(c)
      if (this.connections.size === 0) this.stopSweep()
    })
    this.startSweep()
  }

  /**
   * One connection too many: closed before the greeting (the client reads
   * end of file instead of NBDMAGIC), reported at most every 10 s.
   */
  private refuse (socket: Socket): void {
    socket.on('error', () => {})
    socket.end()
    setTimeout(() => socket.destroy(), 1000).unref()
    this.refused++
    const now = Date.now()
    if (now - this.refusalWarnedAt >= REFUSAL_WARN_MS) {
      this.refusalWarnedAt = now
      this.node.notice(`NBD: refused ${this.refused} connection(s): ${this.maxConnections} already open (the limit)`)
      this.refused = 0
    }
  }

  /** The idle check runs while there are connections. */
  private startSweep (): void {
    if (this.sweep !== undefined) return
    const every = Math.min(1000, Math.max(10, Math.floor(this.ioTimeoutMs / 4)))
    this.sweep = setInterval(() => {
      const now = performance.now()
      for (const c of this.connections) c.checkIdle(now, this.ioTimeoutMs)
    }, every)
    this.sweep.unref()
  }

  private stopSweep (): void {
    clearInterval(this.sweep)
    this.sweep = undefined
  }

  private warn (message: string): void {
    this.node.emit('warning', message)
  }
}

async function listenOn (server: Server, target: ListenTarget): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const onError = (err: Error): void => reject(err)
    server.once('error', onError)
    const done = (): void => { server.off('error', onError); resolve() }
    if ('path' in target) server.listen({ path: target.path }, done)
    else server.listen({ host: target.host, port: target.port }, done)
  })
}

/** True when `path` is a unix socket nobody listens on. */
async function isStaleSocket (path: string): Promise<boolean> {
  try {
    if (!(await lstat(path)).isSocket()) return false
  } catch {
    return false
  }
  return await new Promise<boolean>((resolve) => {
    const s = connect({ path })
    s.once('connect', () => { s.destroy(); resolve(false) })
    s.once('error', (err: NodeJS.ErrnoException) => resolve(err.code === 'ECONNREFUSED'))
  })
}
