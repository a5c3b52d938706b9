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
import { NbdConnection } from './connection.js'
import { VolumeExports, type ExportProvider } from './exports.js'

export interface NbdServerOptions {
  /** Serve every export read-only (NBD_FLAG_READ_ONLY). */
  readOnly?: boolean
  /**
   * What to serve; the node's images by default. The peer protocol serves
   * other exports (replicas) through the same server code.
   */
  exports?: ExportProvider
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

  constructor (node: UkaiNode, options: NbdServerOptions = {}) {
    this.node = node
    this.exports = options.exports ?? new VolumeExports(node, options.readOnly ?? false)
  }

  /** Starts listening on `spec` (see parseListenSpec); may be called for several addresses. */
  async listen (spec: string): Promise<void> {
    if (this.closing) throw new UkaiError('UKAI_ERR_SHUTDOWN', 'the NBD server is closed')
    const target = parseListenSpec(spec)
    // allowHalfOpen: a client that shuts down its sending side still gets
    // the replies to what it sent.
    const server = createServer({ allowHalfOpen: true }, (socket) => this.accept(socket))
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
    // A unix socket's file goes with its listener (libuv unlinks it).
    await Promise.all(stopped)
  }

  /** Open connections (for status and tests). */
  get connectionCount (): number { return this.connections.size }

  private accept (socket: Socket): void {
    if (this.closing) {
      socket.destroy()
      return
    }
    const c = new NbdConnection(socket, this.exports, (m) => this.warn(m))
    this.connections.add(c)
    void c.closed.then(() => this.connections.delete(c))
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
