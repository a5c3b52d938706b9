/**
 * The control API: HTTP + JSON on control_address:control_port (loopback
 * unless configured). The `ukai` CLI is a client of it. Every request body
 * is validated before anything changes; errors come back as
 * `{"error": {"code", "message", "details"}}` with the HTTP status of the
 * error table in errors.ts.
 *
 * Every call needs the cluster's bearer token (control/token.ts), and is
 * refused when its Host header names something else than this node (a
 * DNS-rebinding page names its own host); a state-changing call that
 * carries a browser's Origin is refused too, token or not, unless that
 * Origin is this node's own control origin (the dashboard it serves under
 * /ui/, ui-assets.ts, whose static files need no token: they hold no data).
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { createServer as createHttpsServer } from 'node:https'
import { hostname, networkInterfaces } from 'node:os'
import { bearerMatches } from './token.js'
import { UkaiError, invalidArgument, toUkaiError } from '../errors.js'
import { describe, describeState, parseInfoFormat, summarise } from '../node/images.js'
import { checkMoveRate } from '../node/move.js'
import { errorReport } from '../node/stats.js'
import type { UkaiNode } from '../node/node.js'
import { ControlClient, callStream, controlTlsOf } from './client.js'
import { jsonError, show } from '../util/show.js'
import { MAX_DATA, dataRoutes, readRawBody } from './data-routes.js'
import { uiRoutes } from './ui-routes.js'
import { isUiPath, serveUi } from './ui-assets.js'

/** Largest request body: a per-block export of a large image is big. */
export const MAX_BODY = 256 * 2 ** 20

export const API_VERSION = 'v1'

/**
 * `emit` sends one progress object as a line of the streamed answer;
 * `signal` aborts when the client of a streamed answer goes away.
 */
type Handler = (node: UkaiNode, params: string[], body: unknown, query: URLSearchParams, emit: (v: unknown) => void, signal: AbortSignal) => Promise<unknown>

export interface Route {
  method: string
  pattern: RegExp
  handler: Handler
  status?: number
  /** Answered as NDJSON: progress lines, then {"result": ...} or {"error": ...}. */
  stream?: boolean
  /** With stream: server-sent events (`data: JSON` per emit) instead of NDJSON. */
  events?: boolean
  /** Validates the request before a streamed answer starts, so bad input is a plain error status. */
  check?: (query: URLSearchParams) => void
  /** The body is raw bytes (a Buffer of at most MAX_DATA), not JSON. */
  raw?: boolean
  /** The handler answers a Text: sent as it is, not as JSON. */
  text?: boolean
}

/** An answer that is not JSON (the Prometheus text format). */
export interface Text { contentType: string, body: string }

/** `{location|hypervisor, start?, end?}`; `end` is the last block, inclusive. */
function placementBody (body: unknown, key: 'location' | 'hypervisor'): { location?: string, hypervisor?: string, start?: number, end?: number } {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw invalidArgument(`request body must be an object with '${key}'`)
  const b = body as Record<string, unknown>
  const allowed = key === 'location' ? ['location', 'start', 'end'] : ['hypervisor']
  for (const k of Object.keys(b)) if (!allowed.includes(k)) throw invalidArgument(`unknown field '${k}'`, { key: k })
  if (typeof b[key] !== 'string') throw invalidArgument(`'${key}' must be a node address`, { key })
  const start = optionalBlock(b, 'start')
  const last = optionalBlock(b, 'end')
  return { [key]: b[key] as string, start, end: last === undefined ? undefined : last + 1 }
}

/** A body `{key: positive integer}` and nothing else. */
function counterBody (body: unknown, key: string): number {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw invalidArgument(`request body must be an object with '${key}'`)
  const b = body as Record<string, unknown>
  for (const k of Object.keys(b)) if (k !== key) throw invalidArgument(`unknown field '${k}'`, { key: k })
  const v = b[key]
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) throw invalidArgument(`'${key}' must be a positive integer, got ${show(v)}`, { key })
  return v
}

function optionalBlock (body: Record<string, unknown>, key: string): number | undefined {
  const v = body[key]
  if (v === undefined) return undefined
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw invalidArgument(`'${key}' must be a block number (an integer >= 0), got ${show(v)}`, { key })
  return v
}

const IMAGE = '([^/]+)'

/**
 * A sync or a move copies as the image's writer session, so it runs on
 * the node that writes the image: asked of another one, the request goes
 * there and its progress streams back (`{result}`); undefined when this
 * node runs it.
 */
async function onWriter (node: UkaiNode, name: string, what: 'sync' | 'move', body: unknown, emit: (v: unknown) => void): Promise<{ result: unknown } | undefined> {
  const writer = await node.writerElsewhere(name)
  if (writer === undefined) return undefined
  const client = new ControlClient(writer.control_address, writer.control_port, 0, await node.images.directory.controlToken(), controlTlsOf(node.config, writer.id))
  return { result: await callStream(client, 'POST', `/v1/images/${encodeURIComponent(name)}/${what}`, body, emit) }
}

/** Every route of the control API (test/fuzz/targets/control-api.ts checks that its table covers each one). */
export const routes: readonly Route[] = [
  {
    method: 'GET',
    pattern: /^\/v1\/node$/,
    handler: async (node) => ({
      id: node.config.id,
      image_root: node.config.image_root,
      metadata_backend: node.config.metadata_backend,
      capacity: await node.capacity(),
      open_images: node.openVolumes().map((v) => v.name)
    })
  },
  // Prometheus scrapes this; it needs the token like every other call (a
  // scrape config's `authorization: {credentials_file: ...}` sends it).
  { method: 'GET', pattern: /^\/metrics$/, text: true, handler: async (node) => await node.metrics.text() },
  { method: 'GET', pattern: /^\/v1\/ping$/, handler: async (node) => ({ id: node.config.id, time: Date.now() }) },
  { method: 'GET', pattern: /^\/v1\/nodes$/, handler: async (node) => await node.images.directory.status() },
  {
    method: 'POST',
    pattern: new RegExp(`^/v1/replicas/${IMAGE}$`),
    status: 201,
    handler: async (node, [name]) => {
      await node.images.allocateReplica(name!)
      return { allocated: name }
    }
  },
  {
    method: 'DELETE',
    pattern: new RegExp(`^/v1/replicas/${IMAGE}$`),
    handler: async (node, [name]) => {
      if (node.isOpen(name!)) throw new UkaiError('UKAI_ERR_BUSY', `image '${name!}' is open on this node`)
      await node.images.destroyReplica(name!)
      return { destroyed: name }
    }
  },
  {
    method: 'GET',
    pattern: /^\/v1\/nodes\/errors$/,
    handler: async (node) => errorReport(node.errors)
  },
  { method: 'GET', pattern: /^\/v1\/images$/, handler: async (node) => await node.images.list() },
  {
    method: 'POST',
    pattern: /^\/v1\/images$/,
    status: 201,
    handler: async (node, _p, body) => summarise(await node.createImage(body))
  },
  {
    method: 'POST',
    pattern: /^\/v1\/images\/import$/,
    status: 201,
    handler: async (node, _p, body) => summarise(await node.importImage(body))
  },
  {
    method: 'GET',
    pattern: new RegExp(`^/v1/images/${IMAGE}$`),
    handler: async (node, [name], _b, query) => {
      const format = parseInfoFormat(query.get('format') ?? undefined)
      const st = await node.images.state(name!)
      return query.has('format') ? describe(st.meta, format) : describeState(st)
    }
  },
  {
    method: 'GET',
    pattern: new RegExp(`^/v1/images/${IMAGE}/stats$`),
    handler: async (node, [name]) => {
      await node.images.info(name!) // validates the name; 404 when unknown
      return node.stats(name!)
    }
  },
  {
    method: 'POST',
    pattern: new RegExp(`^/v1/images/${IMAGE}/sync$`),
    stream: true,
    handler: async (node, [name], body, _q, emit) => {
      const b = (body ?? {}) as Record<string, unknown>
      if (typeof b !== 'object' || Array.isArray(b)) throw invalidArgument('sync request must be an object')
      for (const k of Object.keys(b)) if (k !== 'start' && k !== 'end') throw invalidArgument(`unknown field '${k}'`, { key: k })
      const start = optionalBlock(b, 'start')
      const last = optionalBlock(b, 'end')
      const forwarded = await onWriter(node, name!, 'sync', b, emit)
      if (forwarded !== undefined) return forwarded.result
      return await node.syncImage(name!, start, last === undefined ? undefined : last + 1, emit)
    }
  },
  {
    method: 'POST',
    pattern: new RegExp(`^/v1/images/${IMAGE}/move$`),
    stream: true,
    handler: async (node, [name], body, _q, emit) => {
      if (typeof body !== 'object' || body === null || Array.isArray(body)) throw invalidArgument("move request must be an object with 'to'")
      const b = body as Record<string, unknown>
      for (const k of Object.keys(b)) if (!['to', 'from', 'start', 'end', 'rate'].includes(k)) throw invalidArgument(`unknown field '${k}'`, { key: k })
      if (typeof b.to !== 'string') throw invalidArgument("'to' must be a node address", { key: 'to' })
      if (b.from !== undefined && typeof b.from !== 'string') throw invalidArgument("'from' must be a node address", { key: 'from' })
      checkMoveRate(b.rate)
      const start = optionalBlock(b, 'start')
      const last = optionalBlock(b, 'end')
      const forwarded = await onWriter(node, name!, 'move', b, emit)
      if (forwarded !== undefined) return forwarded.result
      return await node.moveImage(name!, {
        to: b.to,
        ...(b.from !== undefined ? { from: b.from as string } : {}),
        ...(start !== undefined ? { start } : {}),
        ...(last !== undefined ? { end: last + 1 } : {}),
        ...(b.rate !== undefined ? { rate: b.rate as number } : {})
      }, emit)
    }
  },
  // Cancels the move of the image, wherever it runs (UkaiNode.cancelMove).
  {
    method: 'DELETE',
    pattern: new RegExp(`^/v1/images/${IMAGE}/move$`),
    handler: async (node, [name]) => await node.cancelMove(name!)
  },
  {
    method: 'POST',
    pattern: new RegExp(`^/v1/images/${IMAGE}/fence$`),
    handler: async (node, [name], body) => await node.handleFence(name!, counterBody(body, 'generation'))
  },
  {
    method: 'POST',
    pattern: new RegExp(`^/v1/images/${IMAGE}/refresh$`),
    handler: async (node, [name], body) => await node.handleRefresh(name!, counterBody(body, 'revision'))
  },
  {
    method: 'POST',
    pattern: new RegExp(`^/v1/images/${IMAGE}/locations$`),
    handler: async (node, [name], body) => {
      const b = placementBody(body, 'location')
      return summarise(await node.images.addLocation(name!, b.location, b.start, b.end))
    }
  },
  {
    method: 'DELETE',
    pattern: new RegExp(`^/v1/images/${IMAGE}/locations$`),
    handler: async (node, [name], body) => {
      const b = placementBody(body, 'location')
      return summarise(await node.removeLocation(name!, b.location, b.start, b.end))
    }
  },
  {
    method: 'POST',
    pattern: new RegExp(`^/v1/images/${IMAGE}/hypervisors$`),
    handler: async (node, [name], body) => summarise(await node.images.setHypervisor(name!, placementBody(body, 'hypervisor').hypervisor, true))
  },
  {
    method: 'DELETE',
    pattern: new RegExp(`^/v1/images/${IMAGE}/hypervisors$`),
    handler: async (node, [name], body) => summarise(await node.images.setHypervisor(name!, placementBody(body, 'hypervisor').hypervisor, false))
  },
  {
    method: 'DELETE',
    pattern: new RegExp(`^/v1/images/${IMAGE}$`),
    handler: async (node, [name]) => {
      await node.destroyImage(name!)
      return { destroyed: name }
    }
  },
  ...dataRoutes,
  ...uiRoutes
]

async function readBody (req: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = []
  let size = 0
  for await (const chunk of req) {
    size += (chunk as Buffer).length
    if (size > MAX_BODY) throw new UkaiError('UKAI_ERR_TOO_BIG', `request body is larger than ${MAX_BODY} bytes`)
    chunks.push(chunk as Buffer)
  }
  if (size === 0) return undefined
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'))
  } catch (err) {
    throw invalidArgument(`request body is not valid JSON (${jsonError(err)})`)
  }
}

function send (res: ServerResponse, status: number, value: unknown): void {
  const body = JSON.stringify(value) + '\n'
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) })
  res.end(body)
}

function sendBytes (res: ServerResponse, status: number, data: Buffer): void {
  res.writeHead(status, { 'content-type': 'application/octet-stream', 'content-length': data.length })
  res.end(data)
}

function sendText (res: ServerResponse, text: Text): void {
  res.writeHead(200, { 'content-type': text.contentType, 'content-length': Buffer.byteLength(text.body) })
  res.end(text.body)
}

export function sendError (res: ServerResponse, err: unknown): void {
  const e = toUkaiError(err)
  let details = e.details ?? {}
  // Details may carry a value from the request: never a second error while sending the first.
  try { JSON.stringify(details) } catch { details = {} }
  send(res, e.mapping.http, { error: { code: e.code, message: e.message, details } })
}

/** Methods that change nothing: a browser's cross-origin GET cannot carry the token anyway. */
const SAFE_METHODS = new Set(['GET', 'HEAD'])

export class ControlServer {
  private readonly node: UkaiNode
  private server: Server | undefined
  private token = ''
  /** Names a request's Host may give this node by (lower case, IPv6 without brackets). */
  private names = new Set<string>()

  constructor (node: UkaiNode) {
    this.node = node
  }

  async listen (port: number, host: string): Promise<void> {
    this.token = await this.node.images.directory.controlToken()
    this.names = hostNamesOf(host, this.node.config.id)
    // With the node's TLS identity, HTTPS: the token never crosses the network in clear.
    const tls = this.node.tls
    const handler = (req: IncomingMessage, res: ServerResponse): void => { void this.handle(req, res) }
    const server = tls === undefined ? createServer(handler) : createHttpsServer({ ...tls.pem, minVersion: 'TLSv1.2' }, handler)
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(port, host, () => { server.off('error', reject); resolve() })
    })
    this.server = server
  }

  get port (): number | undefined {
    const a = this.server?.address()
    return typeof a === 'object' && a !== null ? a.port : undefined
  }

  /** The Host is this node's: a DNS-rebinding page names its own. */
  private checkHost (req: IncomingMessage): void {
    const host = req.headers.host
    if (host === undefined || !this.isOurHost(host)) {
      throw new UkaiError('UKAI_ERR_PERMISSION', `the request's Host ${host === undefined ? '(none)' : show(host)} does not name this node's control API (${this.node.config.control_address}:${this.port ?? '?'})`)
    }
  }

  /** Who may call: the Host is this node's, no other page changes anything, the token is the cluster's. */
  private admit (req: IncomingMessage, res: ServerResponse): void {
    this.checkHost(req)
    const origin = req.headers.origin
    if (origin !== undefined && !SAFE_METHODS.has(req.method ?? '') && !this.isOwnOrigin(origin)) {
      throw new UkaiError('UKAI_ERR_PERMISSION', `a state-changing call from a web page (Origin ${show(origin)}) is refused`)
    }
    if (!bearerMatches(req.headers.authorization, this.token)) {
      res.setHeader('www-authenticate', 'Bearer realm="ukai"')
      throw new UkaiError('UKAI_ERR_UNAUTHENTICATED', req.headers.authorization === undefined
        ? "the control API needs the cluster's bearer token (Authorization: Bearer ...; 'ukai control-token' prints it)"
        : "the bearer token is not this cluster's")
    }
  }

  private isOurHost (host: string): boolean {
    let u: URL
    try { u = new URL(`http://${host}`) } catch { return false }
    if (u.username !== '' || u.pathname !== '/' || u.search !== '') return false
    const port = u.port === '' ? 80 : Number(u.port)
    return port === this.port && this.names.has(bareHost(u.hostname))
  }

  /**
   * Whether a page's Origin is exactly this node's control origin: the
   * scheme this server speaks and a host:port the Host check accepts
   * (the dashboard this node serves). `URL.origin` must give it back
   * unchanged, so a path, user info, "null" or odd spelling is foreign.
   */
  private isOwnOrigin (origin: string): boolean {
    let u: URL
    try { u = new URL(origin) } catch { return false }
    const scheme = this.node.tls === undefined ? 'http:' : 'https:'
    if (u.protocol !== scheme || u.origin !== origin) return false
    const port = u.port !== '' ? u.port : scheme === 'https:' ? '443' : '80'
    return this.isOurHost(`${u.hostname}:${port}`)
  }

  private async handle (req: IncomingMessage, res: ServerResponse): Promise<void> {
    try {
      const url = new URL(req.url ?? '/', 'http://control')
      if (isUiPath(url.pathname)) {
        this.checkHost(req)
        return await serveUi(req, res, url.pathname)
      }
      this.admit(req, res)
      let path: string
      try { path = decodeURIComponent(url.pathname) } catch { throw invalidArgument('malformed path') }
      const matching = routes.filter((r) => r.pattern.test(path))
      if (matching.length === 0) throw new UkaiError('UKAI_ERR_NOT_FOUND', `no such API path: ${path}`)
      const route = matching.find((r) => r.method === req.method)
      if (route === undefined) {
        res.setHeader('allow', matching.map((r) => r.method).join(', '))
        throw new UkaiError('UKAI_ERR_NOT_SUPPORTED', `${req.method ?? '?'} is not allowed on ${path}`)
      }
      const params = route.pattern.exec(path)!.slice(1)
      const body = req.method === 'GET' ? undefined : route.raw === true ? await readRawBody(req, MAX_DATA) : await readBody(req)
      route.check?.(url.searchParams)
      if (route.stream === true) return await this.stream(res, route, params, body, url.searchParams)
      const result = await route.handler(this.node, params, body, url.searchParams, () => {}, new AbortController().signal)
      if (route.text === true) return sendText(res, result as Text)
      if (Buffer.isBuffer(result)) sendBytes(res, route.status ?? 200, result)
      else send(res, route.status ?? 200, result)
    } catch (err) {
      sendError(res, err)
    }
  }

  private async stream (res: ServerResponse, route: Route, params: string[], body: unknown, query: URLSearchParams): Promise<void> {
    const events = route.events === true
    res.writeHead(200, events ? { 'content-type': 'text/event-stream', 'cache-control': 'no-store' } : { 'content-type': 'application/x-ndjson' })
    const gone = new AbortController()
    res.once('close', () => gone.abort())
    // Server-sent events (WHATWG HTML, 9.2): "data:" lines, a blank line ends the event.
    const line = (v: unknown, event?: string): void => {
      if (!res.writable) return
      if (!events) res.write(JSON.stringify(v) + '\n')
      else res.write(`${event !== undefined ? `event: ${event}\n` : ''}data: ${JSON.stringify(v)}\n\n`)
    }
    try {
      const result = await route.handler(this.node, params, body, query, (v) => { if (events) line(v); else line({ progress: v }) }, gone.signal)
      if (events) line(result, 'end'); else line({ result })
    } catch (err) {
      const e = toUkaiError(err)
      const error = { error: { code: e.code, message: e.message, details: e.details ?? {} } }
      if (events) line(error, 'error'); else line(error)
    }
    res.end()
  }

  async close (): Promise<void> {
    const server = this.server
    if (server === undefined) return
    this.server = undefined
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
}

/**
 * The names this node answers to: its listen address (unless a wildcard),
 * its id's host, loopback, its host name and every address of its
 * interfaces.
 */
function hostNamesOf (listen: string, id: string): Set<string> {
  const names = new Set<string>(['localhost', '127.0.0.1', '::1', bareHost(hostname())])
  if (listen !== '0.0.0.0' && listen !== '::' && listen !== '') names.add(bareHost(listen))
  const m = /^(.*?)(?::\d+)?$/.exec(id)
  if (m !== null && m[1] !== '') names.add(bareHost(m[1]!))
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) names.add(bareHost(a.address))
  }
  return names
}

/** A host name as the set above keeps it: lower case, an IPv6 address without brackets. */
function bareHost (h: string): string {
  return h.replace(/^\[|\]$/g, '').toLowerCase()
}
