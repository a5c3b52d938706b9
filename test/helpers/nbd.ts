/**
 * NBD test fixtures: a node started in this process with an NbdServer on a
 * unix socket in a temp directory, and a small raw NBD client that speaks
 * the protocol frame by frame (so tests can send exactly what they mean,
 * valid or not) and matches replies to requests by cookie.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { connect, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseConfig } from '../../src/config/config.js'
import { UkaiNode } from '../../src/node/node.js'
import { FrameReader } from '../../src/frontends/nbd/frame-reader.js'
import {
  encodeClientFlags, encodeInfoRequest, encodeMetaContextRequest, encodeOption, parseHandshake, parseOptionReplyHeader
} from '../../src/frontends/nbd/options.js'
import {
  NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT,
  NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REP_ACK, NBD_REP_FLAG_ERROR, NBD_REP_INFO, BASE_ALLOCATION,
  NBD_SIMPLE_REPLY_SIZE, NBD_STRUCTURED_REPLY_HEADER_SIZE, NBD_STRUCTURED_REPLY_MAGIC
} from '../../src/frontends/nbd/protocol.js'
import { parseReplyHeader } from '../../src/frontends/nbd/replies.js'
import { encodeRequest, type NbdRequest } from '../../src/frontends/nbd/requests.js'
import { NbdServer, type NbdServerOptions } from '../../src/frontends/nbd/server.js'
import type { ExportProvider } from '../../src/frontends/nbd/exports.js'
import { ImageMeta } from '../../src/metadata/image.js'
import type { WriterGrant } from '../../src/metadata/store.js'
import { ReplicaExports } from '../../src/peer/replica-exports.js'

let nextPort = 31000 + Math.floor(Math.random() * 20000)

export interface NbdFixture {
  dir: string
  node: UkaiNode
  server: NbdServer
  socket: string
  /** "nbd+unix:///NAME?socket=..." */
  uri: (name: string) => string
  /** Closes the server and the node, removes the directory. */
  cleanup: () => Promise<void>
}

/**
 * A node with its images' block files under a temp dir, and an NBD server
 * on a unix socket there; `exportsFor` serves other exports of the node
 * (its replica exports) instead of its images.
 */
export async function startNbd (options: NbdServerOptions & { exportsFor?: (node: UkaiNode) => ExportProvider } = {}): Promise<NbdFixture> {
  const dir = await mkdtemp(join(tmpdir(), 'ukai-nbd-'))
  const port = nextPort++
  // The node listens on neither port: they only name it.
  const config = parseConfig({ image_root: 'images', metadata_root: 'metadata', id: `127.0.0.1:${port}`, proxy_port: port, control_port: port + 1 }, dir)
  const node = await UkaiNode.start(config)
  const server = new NbdServer(node, options.exportsFor === undefined ? options : { ...options, exports: options.exportsFor(node) })
  const socket = join(dir, 'nbd.sock')
  try {
    await server.listen(socket)
  } catch (err) {
    await node.close()
    await rm(dir, { recursive: true, force: true })
    throw err
  }
  let done = false
  return {
    dir,
    node,
    server,
    socket,
    uri: (name) => `nbd+unix:///${name}?socket=${socket}`,
    cleanup: async () => {
      if (done) return
      done = true
      await server.close()
      await node.close()
      await rm(dir, { recursive: true, force: true })
    }
  }
}

export interface OptionReply { option: number, type: number, data: Buffer }

export interface Chunk { flags: number, type: number, payload: Buffer }

export interface Reply {
  cookieHi: number
  cookieLo: number
  /** The simple reply's error, or the first error chunk's. 0 on success. */
  error: number
  /** READ: the data assembled from the reply. */
  data?: Buffer
  chunks: Chunk[]
  /** Error chunk message, when one came. */
  message?: string
}

interface Pending { req: NbdRequest, resolve: (r: Reply) => void, reply: Reply }

/** A raw NBD client for tests. */
export class TestClient {
  readonly socket: Socket
  readonly reader = new FrameReader()
  handshakeFlags = 0
  structured = false
  /** Resolves when the server closed the connection. */
  readonly closed: Promise<void>
  private readonly pending = new Map<string, Pending>()
  private transmission = false
  private nextCookie = 1

  private constructor (socket: Socket) {
    this.socket = socket
    socket.on('data', (c: Buffer) => {
      this.reader.push(c)
      if (this.transmission) this.pumpReplies()
    })
    socket.on('error', () => {})
    this.closed = new Promise((resolve) => socket.once('close', () => {
      this.reader.end()
      resolve()
    }))
  }

  static async connect (target: string | { host: string, port: number }): Promise<TestClient> {
    const socket = typeof target === 'string' ? connect({ path: target }) : connect(target)
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve)
      socket.once('error', reject)
    })
    return new TestClient(socket)
  }

  write (buf: Buffer): void { this.socket.write(buf) }

  /** Reads the greeting and answers with client flags. */
  async greet (clientFlags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES): Promise<number> {
    const flags = parseHandshake(await this.reader.read(18))
    if (flags === undefined) throw new Error('bad greeting')
    this.handshakeFlags = flags
    this.write(encodeClientFlags(clientFlags))
    return flags
  }

  /** Reads one option reply. */
  async optionReply (): Promise<OptionReply> {
    const h = parseOptionReplyHeader(await this.reader.read(20))
    if (h === undefined) throw new Error('bad option reply magic')
    return { option: h.option, type: h.type, data: await this.reader.read(h.length) }
  }

  /** Sends an option and reads replies up to the final one (ACK or an error). */
  async option (option: number, data?: Buffer): Promise<OptionReply[]> {
    this.write(encodeOption(option, data))
    const out: OptionReply[] = []
    for (;;) {
      const r = await this.optionReply()
      out.push(r)
      if (r.type === NBD_REP_ACK || r.type >= NBD_REP_FLAG_ERROR) return out
    }
  }

  /**
   * The usual way in: structured replies, base:allocation, NBD_OPT_GO.
   * Returns the export size and transmission flags.
   */
  async go (name: string, opts: { structured?: boolean, meta?: boolean } = {}): Promise<{ size: number, flags: number }> {
    const structured = opts.structured ?? true
    if (structured) {
      const r = await this.option(NBD_OPT_STRUCTURED_REPLY)
      if (r[0]!.type !== NBD_REP_ACK) throw new Error('structured replies refused')
      this.structured = true
      if (opts.meta ?? true) {
        const m = await this.option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest(name, [BASE_ALLOCATION]))
        if (m[m.length - 1]!.type !== NBD_REP_ACK) throw new Error(`SET_META_CONTEXT failed: ${m[m.length - 1]!.data.toString()}`)
      }
    }
    const replies = await this.option(NBD_OPT_GO, encodeInfoRequest(name, [NBD_INFO_BLOCK_SIZE]))
    const last = replies[replies.length - 1]!
    if (last.type !== NBD_REP_ACK) throw new Error(`GO failed: 0x${last.type.toString(16)} ${last.data.toString()}`)
    const info = replies.find((r) => r.type === NBD_REP_INFO && r.data.readUInt16BE(0) === NBD_INFO_EXPORT)!
    this.startTransmission()
    return { size: Number(info.data.readBigUInt64BE(2)), flags: info.data.readUInt16BE(10) }
  }

  startTransmission (): void {
    this.transmission = true
    this.pumpReplies()
  }

  /** Sends a request (and its payload) without waiting; resolves with the matched reply. */
  send (type: number, opts: { flags?: number, offset?: number, length?: number, data?: Buffer, cookie?: [number, number] } = {}): Promise<Reply> {
    const [cookieHi, cookieLo] = opts.cookie ?? [0x80000000, this.nextCookie++]
    const req: NbdRequest = { type, flags: opts.flags ?? 0, offset: opts.offset ?? 0, length: opts.length ?? opts.data?.length ?? 0, cookieHi, cookieLo }
    const p = new Promise<Reply>((resolve) => {
      this.pending.set(`${cookieHi}:${cookieLo}`, { req, resolve, reply: { cookieHi, cookieLo, error: 0, chunks: [] } })
    })
    this.write(encodeRequest(req))
    if (opts.data !== undefined) this.write(opts.data)
    return p
  }

  async read (offset: number, length: number, flags = 0): Promise<Reply> {
    return await this.send(NBD_CMD_READ, { offset, length, flags })
  }

  async writeAt (offset: number, data: Buffer, flags = 0): Promise<Reply> {
    return await this.send(NBD_CMD_WRITE, { offset, data, flags })
  }

  private pumpReplies (): void {
    while (this.reader.length >= 4) {
      const structured = this.reader.peek(4).readUInt32BE(0) === NBD_STRUCTURED_REPLY_MAGIC
      const size = structured ? NBD_STRUCTURED_REPLY_HEADER_SIZE : NBD_SIMPLE_REPLY_SIZE
      if (this.reader.length < size) return
      const header = parseReplyHeader(this.reader.peek(size))
      if (header === undefined) throw new Error(`bad reply magic 0x${this.reader.peek(4).readUInt32BE(0).toString(16)}`)
      const key = `${header.cookieHi}:${header.cookieLo}`
      const p = this.pending.get(key)
      if (p === undefined) throw new Error(`reply with unknown cookie ${key}`)
      const payloadLen = structured ? header.length : (p.req.type === NBD_CMD_READ && header.error === 0 ? p.req.length : 0)
      if (this.reader.length < size + payloadLen) return
      this.reader.skip(size)
      const payload = Buffer.from(this.reader.take(payloadLen))
      if (!structured) {
        p.reply.error = header.error
        if (p.req.type === NBD_CMD_READ && header.error === 0) p.reply.data = payload
        this.finish(key, p)
        continue
      }
      p.reply.chunks.push({ flags: header.flags, type: header.type, payload })
      if ((header.type & 0x8000) !== 0 && p.reply.error === 0) {
        p.reply.error = payload.readUInt32BE(0)
        p.reply.message = payload.subarray(6, 6 + payload.readUInt16BE(4)).toString()
      }
      if ((header.flags & NBD_REPLY_FLAG_DONE) !== 0) {
        if (p.req.type === NBD_CMD_READ && p.reply.error === 0) p.reply.data = assemble(p.req, p.reply.chunks)
        this.finish(key, p)
      }
    }
  }

  private finish (key: string, p: Pending): void {
    this.pending.delete(key)
    p.resolve(p.reply)
  }

  get inflight (): number { return this.pending.size }

  async close (): Promise<void> {
    this.socket.destroy()
    await this.closed
  }
}

/** A structured READ reply's data, from its OFFSET_DATA and OFFSET_HOLE chunks. */
function assemble (req: NbdRequest, chunks: Chunk[]): Buffer {
  const out = Buffer.alloc(req.length)
  for (const c of chunks) {
    if (c.type === NBD_REPLY_TYPE_OFFSET_DATA) {
      const off = Number(c.payload.readBigUInt64BE(0)) - req.offset
      c.payload.copy(out, off, 8)
    } else if (c.type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      const off = Number(c.payload.readBigUInt64BE(0)) - req.offset
      out.fill(0, off, off + c.payload.readUInt32BE(8))
    }
  }
  return out
}

/** The descriptors of a BLOCK_STATUS reply: [length, flags] pairs. */
export function descriptors (r: Reply): Array<[number, number]> {
  const c = r.chunks.find((x) => x.type === NBD_REPLY_TYPE_BLOCK_STATUS)
  if (c === undefined) return []
  const out: Array<[number, number]> = []
  for (let pos = 4; pos + 8 <= c.payload.length; pos += 8) out.push([c.payload.readUInt32BE(pos), c.payload.readUInt32BE(pos + 4)])
  return out
}

/** Waits until `cond` holds, checking as events happen; fails after `ms`. */
export async function until (cond: () => boolean, what: string, ms = 10_000): Promise<void> {
  const start = Date.now()
  while (!cond()) {
    if (Date.now() - start > ms) throw new Error(`gave up waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

/**
 * Connects to the unix socket `path` and sends `bytes` in the given
 * pieces (a turn of the event loop between them), the rest in one piece,
 * then ends the sending side (`leave` 'end') or drops the connection
 * ('destroy'). Replies are read and dropped. Resolves with the socket and
 * a promise of its close, once everything is sent.
 */
export async function sendInPieces (path: string, bytes: Buffer, pieces: number[], leave: 'end' | 'destroy' = 'end', signal?: AbortSignal): Promise<{ socket: Socket, closed: Promise<void> }> {
  const s = connect({ path })
  signal?.addEventListener('abort', () => s.destroy())
  s.on('data', () => {})
  s.on('error', () => {})
  const closed = new Promise<void>((resolve) => s.once('close', () => resolve()))
  await new Promise<void>((resolve) => { s.once('connect', resolve); s.once('close', resolve) })
  let pos = 0
  for (const n of pieces) {
    if (pos >= bytes.length || s.destroyed) break
    s.write(bytes.subarray(pos, pos + n))
    pos += n
    await new Promise((resolve) => setImmediate(resolve))
  }
  if (!s.destroyed) {
    if (pos < bytes.length) s.write(bytes.subarray(pos))
    if (leave === 'end') s.end()
    else s.destroy()
  }
  return { socket: s, closed }
}

/**
 * The handshake bytes of a client that enters transmission on `name`:
 * fixed newstyle flags, with structured replies and base:allocation when
 * `structured`, then NBD_OPT_EXPORT_NAME (`byName`) or NBD_OPT_GO.
 */
export function enterTransmission (name: string, structured: boolean, byName: boolean): Buffer {
  const parts = [encodeClientFlags(3)]
  if (structured) {
    parts.push(encodeOption(NBD_OPT_STRUCTURED_REPLY))
    parts.push(encodeOption(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest(name, [BASE_ALLOCATION])))
  }
  parts.push(byName ? encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from(name)) : encodeOption(NBD_OPT_GO, encodeInfoRequest(name, [])))
  return Buffer.concat(parts)
}

/**
 * A peer for a RemoteReplica: a node whose replica exports are served on
 * a unix socket, with image `img` (`size` bytes in blocks of `blockSize`)
 * placed and in sync there, and the writer lease of `img` held by a
 * writer elsewhere (10.9.9.9), whose generation the writes carry.
 * `after` takes the cleanups (a test context's t.after).
 */
export async function startReplicaPeer (after: (fn: () => Promise<void>) => void, size: number, blockSize: number): Promise<{ fx: NbdFixture, node: UkaiNode, grant: WriterGrant }> {
  const fx = await startNbd({ exportsFor: (node) => new ReplicaExports(node) })
  after(fx.cleanup)
  const node = fx.node
  const meta = new ImageMeta({ name: 'img', size, blockSize })
  meta.addLocation(node.config.id, 0, meta.blockCount, true)
  await node.store.create(meta)
  await node.blocks.allocate('img')
  await node.reload('img')
  const lease = await node.store.grantLease(60)
  after(async () => await lease.revoke())
  const grant = await node.store.acquireWriter('img', { node: '10.9.9.9', session: 's', purpose: 'write', lease: lease.id, mayTakeOver: () => false })
  return { fx, node, grant }
}
