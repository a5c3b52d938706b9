/**
 * control-api: a real ControlServer (src/control/server.ts) on a real node
 * in this process (embedded metadata store in a temp directory), over
 * HTTP on loopback. Every route of the routes table gets bodies that are
 * valid, valid with one to three changes (a field replaced by another
 * type, a huge or odd number, a deeply nested value, a prototype-pollution
 * key, a duplicate key, a cut), random JSON or not JSON at all, with image
 * names in the path that exist, do not, or are invalid or oddly encoded.
 *
 * Every answer must be JSON; an error must be `{"error": {code, message,
 * details}}` with the status of its code in the error table, and that
 * status a 4xx (501 only with an `allow` header: a method the path does not
 * take); nothing may be stored for a request that was refused; and
 * Object.prototype must stay as it was. After an accepted request the
 * fixture images are put back as they were.
 */
import { Agent, request } from 'node:http'
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import { parseConfig, type Config } from '../../../src/config/config.js'
import { ControlServer } from '../../../src/control/server.js'
import { CODES } from '../../../src/errors.js'
import { encodeStored } from '../../../src/metadata/codec.js'
import { UkaiNode } from '../../../src/node/node.js'
import { freePort } from '../../helpers/node-process.js'
import { Finding, crash, hang, violation, within, type Target } from '../harness.js'
import { POLLUTING_KEYS, arr, compact, json, lit, mutatedJson, num, obj, oddString, render, showJson, str, type J } from '../gen.js'

// ---------------------------------------------------------------------------
// Fixtures: the images every case starts from

interface Fixture { name: string, size: number, block_size: number, locations?: string[], hypervisors?: string[] }

const FIXTURES: Fixture[] = [
  { name: 'fx', size: 1 << 20, block_size: 65536 },
  { name: 'fx2', size: 256 * 1024, block_size: 65536, locations: ['@self', '127.0.0.1:1'], hypervisors: ['127.0.0.1:2'] }
]
const FIXTURE_NAMES = FIXTURES.map((f) => f.name)

/**
 * One large image, on two locations: 1 TiB of 4 KiB blocks, 2^28 blocks
 * (the model allows 2^32). Metadata work grows with its 4096 segment keys
 * per location and stays well under a second; work that goes block by
 * block does not.
 */
const LARGE: Fixture[] = [
  { name: 'big', size: 2 ** 40, block_size: 4096, locations: ['@self', '127.0.0.1:1'], hypervisors: ['127.0.0.1:2'] }
]

// ---------------------------------------------------------------------------
// Valid bodies, per route

const locationJ = fc.constantFrom('@self', '127.0.0.1:1', '127.0.0.1:2', 'localhost:3', '[::1]:4', 'h1.example', 'node-b').map(str)
const newName = fc.constantFrom('new1', 'n.2', 'N_3-x', 'fx', 'fx2').map(str)
const blockNo = fc.oneof(fc.integer({ min: 0, max: 20 }), fc.constantFrom(0, 3, 15, 16, 2 ** 32)).map(num)
const sizeJ = fc.constantFrom(4096, 65536, 1 << 20, (1 << 20) + 1, 1 << 30).map(num)
const blockSizeJ = fc.oneof({ arbitrary: fc.constantFrom(4096, 65536, 1 << 20), weight: 4 }, { arbitrary: fc.constantFrom(512, 3000, 50_000_000), weight: 1 }).map(num)

const createBody: fc.Arbitrary<J> = fc.record({
  name: newName, size: sizeJ, block_size: fc.option(blockSizeJ), locations: fc.option(fc.array(locationJ, { maxLength: 3 }).map(arr)), hypervisors: fc.option(fc.array(locationJ, { maxLength: 2 }).map(arr))
}).map((r) => obj(Object.fromEntries(Object.entries(r).filter(([, v]) => v !== null)) as Record<string, J>))

/** The three import formats: the seed's `{"synced": true}`, the later `sync_status`, the stored document. */
const importBody: fc.Arbitrary<J> = fc.record({
  name: newName,
  blocks: fc.integer({ min: 1, max: 6 }),
  block_size: fc.constantFrom(4096, 65536),
  locs: fc.array(locationJ, { minLength: 1, maxLength: 2 }),
  format: fc.constantFrom('seed', 'ukai', 'stored'),
  synced: fc.boolean()
}).map(({ name, blocks, block_size: bs, locs, format, synced }) => {
  const size = num(blocks * bs)
  if (format === 'stored') {
    return obj({ format: num(1), name, size, block_size: num(bs), used_size: size, hypervisors: arr([]), revision: num(0), locations: { t: 'obj', entries: locs.map((l) => [(l as { v: string }).v, obj({ blocks: arr([arr([num(0), num(blocks)])]), out_of_sync: arr([]) })]) } })
  }
  // The first location in sync (an import needs an in-sync replica of every block), the others as `synced` says.
  const state = (first: boolean): J => format === 'seed' ? obj({ synced: lit(String(first || synced)) }) : obj({ sync_status: num(first || synced ? 0 : 2) })
  const entries = Array.from({ length: blocks }, (): J => ({ t: 'obj', entries: locs.map((l, i) => [(l as { v: string }).v, state(i === 0)]) }))
  return format === 'seed' ? obj({ name, size, block_size: num(bs), blocks: arr(entries) }) : obj({ name, size, block_size: num(bs), used_size: size, hypervisors: arr([]), blocks: arr(entries) })
})

const rangeBody = (key: 'location' | 'hypervisor'): fc.Arbitrary<J> => fc.record({ v: locationJ, start: fc.option(blockNo), end: fc.option(blockNo) })
  .map(({ v, start, end }) => obj({ [key]: v, ...(key === 'location' && start !== null ? { start } : {}), ...(key === 'location' && end !== null ? { end } : {}) }))

const counter = (key: string): fc.Arbitrary<J> => fc.oneof(fc.integer({ min: 1, max: 5 }), fc.constantFrom(1, 2 ** 31, 2 ** 53 - 1)).map((n) => obj({ [key]: num(n) }))
const syncBody: fc.Arbitrary<J> = fc.record({ start: fc.option(blockNo), end: fc.option(blockNo) })
  .map(({ start, end }) => obj({ ...(start !== null ? { start } : {}), ...(end !== null ? { end } : {}) }))
const anyBody: fc.Arbitrary<J> = json.value

interface Route { method: string, path: string, body: fc.Arbitrary<J> | undefined, stream?: boolean, query?: boolean }

/** The routes table of src/control/server.ts; {N} is an image name. */
const ROUTES: Route[] = [
  { method: 'GET', path: '/v1/node', body: undefined },
  { method: 'GET', path: '/v1/ping', body: undefined },
  { method: 'GET', path: '/v1/nodes', body: undefined },
  { method: 'GET', path: '/v1/nodes/errors', body: undefined },
  { method: 'POST', path: '/v1/replicas/{N}', body: anyBody },
  { method: 'DELETE', path: '/v1/replicas/{N}', body: anyBody },
  { method: 'GET', path: '/v1/images', body: undefined },
  { method: 'POST', path: '/v1/images', body: createBody },
  { method: 'POST', path: '/v1/images/import', body: importBody },
  { method: 'GET', path: '/v1/images/{N}', body: undefined, query: true },
  { method: 'GET', path: '/v1/images/{N}/stats', body: undefined },
  { method: 'POST', path: '/v1/images/{N}/sync', body: syncBody, stream: true },
  { method: 'POST', path: '/v1/images/{N}/fence', body: counter('generation') },
  { method: 'POST', path: '/v1/images/{N}/refresh', body: counter('revision') },
  { method: 'POST', path: '/v1/images/{N}/locations', body: rangeBody('location') },
  { method: 'DELETE', path: '/v1/images/{N}/locations', body: rangeBody('location') },
  { method: 'POST', path: '/v1/images/{N}/hypervisors', body: rangeBody('hypervisor') },
  { method: 'DELETE', path: '/v1/images/{N}/hypervisors', body: rangeBody('hypervisor') },
  { method: 'DELETE', path: '/v1/images/{N}', body: anyBody }
]
// Weights: routes that take a body are where the parsing is.
const ROUTE_WEIGHTS = ROUTES.map((r) => (r.body === undefined ? 1 : r.body === anyBody ? 2 : 6))

/** encodeURIComponent, with lone surrogates sent as their (invalid) UTF-8 bytes. */
const enc = (s: string): string => {
  try { return encodeURIComponent(s) } catch { return encodeURIComponent(s.replace(/[\ud800-\udfff]/g, '')) + '%ED%A0%80' }
}

/** A path segment: an image name as a client would encode it, or raw (badly encoded) text. */
const segment: fc.Arbitrary<string> = fc.oneof(
  { arbitrary: fc.constantFrom(...FIXTURE_NAMES).map(enc), weight: 8 },
  { arbitrary: fc.constantFrom('new1', 'nope', 'import', 'x'.repeat(128), 'x'.repeat(129), ...POLLUTING_KEYS).map(enc), weight: 2 },
  { arbitrary: oddString.map(enc), weight: 1 },
  { arbitrary: fc.constantFrom('%', '%E0%A4%A', '%ZZ', '%2e%2e', '..', '.', 'a%2Fb', 'fx%2Fsync', 'fx%00', '%C0%AE', 'fx;x', 'fx?', 'fx%3Fformat%3Dseed'), weight: 1 }
)

const query: fc.Arbitrary<string> = fc.oneof(
  { arbitrary: fc.constant(''), weight: 3 },
  { arbitrary: fc.constantFrom('stored', 'seed', 'ukai').map((f) => `?format=${f}`), weight: 3 },
  { arbitrary: fc.oneof(oddString.map((f) => `?format=${enc(f)}`), fc.constantFrom('?format', '?format=', '?format=seed&format=ukai', '?x=1', '?format=%', '?__proto__=1')), weight: 1 }
)

type Body = { kind: 'none' } | { kind: 'json', doc: J } | { kind: 'text', text: string }

export interface ControlInput {
  route: number
  name: string
  query: string
  body: Body
  /** Send the body in chunks (no content-length). */
  chunked: boolean
}

const bodyFor = (r: Route): fc.Arbitrary<Body> => fc.oneof(
  { arbitrary: mutatedJson(r.body ?? anyBody).map((doc): Body => ({ kind: 'json', doc })), weight: 12 },
  { arbitrary: fc.constant<Body>({ kind: 'none' }), weight: 1 },
  { arbitrary: fc.oneof(fc.string({ maxLength: 20 }), fc.constantFrom('{', 'null', '[]', '"x"', '1e999', '{"__proto__":{"polluted":1}}', '\ufeff{}', '{"name":"a"}garbage')).map((text): Body => ({ kind: 'text', text })), weight: 1 }
)

const inputsOf = (names: fc.Arbitrary<string>, body: (r: Route) => fc.Arbitrary<Body>, weights: number[]): fc.Arbitrary<ControlInput> => fc.oneof(...ROUTES.map((r, i) => ({
  arbitrary: fc.record({
    route: fc.constant(i),
    name: names,
    query: r.query === true ? query : fc.constant(''),
    body: body(r),
    chunked: fc.oneof({ arbitrary: fc.constant(false), weight: 5 }, { arbitrary: fc.constant(true), weight: 1 })
  }),
  weight: weights[i]!
})))

const inputArb = inputsOf(segment, bodyFor, ROUTE_WEIGHTS)

/** The removal of one of the large image's two locations, all its blocks (each has an in-sync copy on the other). */
const wholeLocation: fc.Arbitrary<J> = fc.oneof(
  { arbitrary: fc.constantFrom('127.0.0.1:1', '@self').map((l) => obj({ location: str(l) })), weight: 3 },
  { arbitrary: rangeBody('location'), weight: 1 }
)

/** For the large image: its name, valid bodies mostly (what is slow is the work, not the parsing), every route alike. */
const largeInputArb = inputsOf(
  fc.oneof({ arbitrary: fc.constant('big'), weight: 9 }, { arbitrary: fc.constant('nope'), weight: 1 }),
  (r) => fc.oneof(
    { arbitrary: (r.method === 'DELETE' && r.path.endsWith('/locations') ? wholeLocation : (r.body ?? anyBody)).map((doc): Body => ({ kind: 'json', doc })), weight: 6 },
    { arbitrary: mutatedJson(r.body ?? anyBody).map((doc): Body => ({ kind: 'json', doc })), weight: 2 },
    { arbitrary: fc.constant<Body>({ kind: 'none' }), weight: 1 }
  ),
  // Routes whose work may go block by block weigh more: a per-block export, a location's removal, a sync.
  ROUTES.map((r) => r.query === true || (r.method === 'DELETE' && r.path.endsWith('/locations')) ? 4 : r.stream === true ? 2 : 1)
)

// ---------------------------------------------------------------------------
// The fixture

interface Ctx {
  /** The control API's bearer token. */
  token: string
  fixtures: Fixture[]
  dir: string
  config: Config
  node: UkaiNode
  control: ControlServer
  port: number
  agent: Agent
  baseline: string
  /** The fixtures' snapshot, per image. */
  images?: Map<string, string>
  /** Names, sizes and times of the store's shard files and the block directories: changes when anything is written. */
  cheap: string
  protoKeys: string
}

async function cheapState (ctx: Ctx): Promise<string> {
  const root = join(ctx.config.metadata_root, 'shards')
  const names = (await readdir(root).catch(() => [] as string[])).sort()
  const st = await Promise.all(names.map(async (n) => await stat(join(root, n)).then((s) => `${n}:${s.size}:${s.mtimeMs}:${s.ino}`, () => n)))
  return st.join('|') + '#' + (await readdir(ctx.config.image_root).catch(() => [] as string[])).sort().join('|')
}

const self = (c: Config) => (v: string): string => v === '@self' ? c.id : v

/** What "stored" means here: every image's metadata (its revision aside), and the block directories. */
async function snapshotOf (ctx: Ctx): Promise<Map<string, string>> {
  const store = ctx.node.images.store
  const out = new Map<string, string>()
  for (const name of (await store.list()).sort()) {
    const m = await store.get(name)
    if (m === undefined) continue
    const { revision: _r, ...rest } = encodeStored(m)
    out.set(name, JSON.stringify(rest))
  }
  out.set('\0dirs', JSON.stringify((await readdir(ctx.config.image_root).catch(() => [])).sort()))
  return out
}

const flat = (m: Map<string, string>): string => JSON.stringify([...m])

/** Back to the fixture images: those that changed made again, any other image destroyed. */
async function makeFixtures (ctx: Ctx, now?: Map<string, string>): Promise<void> {
  const fix = self(ctx.config)
  const want = ctx.images
  for (const name of await ctx.node.images.store.list()) {
    const fixture = ctx.fixtures.some((f) => f.name === name)
    if (!fixture || want === undefined || now?.get(name) !== want.get(name)) await ctx.node.destroyImage(name)
  }
  const left = new Set(await ctx.node.images.store.list())
  for (const f of ctx.fixtures) {
    if (!left.has(f.name)) await ctx.node.createImage({ ...f, ...(f.locations !== undefined ? { locations: f.locations.map(fix) } : {}) })
  }
  ctx.images = await snapshotOf(ctx)
  ctx.baseline = flat(ctx.images)
  ctx.cheap = await cheapState(ctx)
}

const protoState = (): string => JSON.stringify(Object.getOwnPropertyNames(Object.prototype).sort()) + JSON.stringify(Object.keys(Object.prototype)) +
  JSON.stringify(Object.getOwnPropertyNames(Array.prototype).length) + String(Object.getPrototypeOf({}) === Object.prototype)

/** Renders the body text; '@self' stands for this node's id, so valid bodies can name it. */
function bodyText (b: Body, c: Config): string | undefined {
  if (b.kind === 'none') return undefined
  if (b.kind === 'text') return b.text
  return render(b.doc).replaceAll('"@self"', JSON.stringify(c.id))
}

/** An answer must come within this (the case limit leaves room for putting the fixtures back). */
const ANSWER_MS = 10_000

interface Answer { status: number, headers: Record<string, string | string[] | undefined>, text: string }

async function call (ctx: Ctx, method: string, path: string, body: string | undefined, chunked: boolean, signal: AbortSignal, retry = true): Promise<Answer> {
  return await new Promise<Answer>((resolve, reject) => {
    const payload = body === undefined ? undefined : Buffer.from(body, 'utf8')
    const headers: Record<string, string | number> = { 'content-type': 'application/json', authorization: `Bearer ${ctx.token}` }
    if (payload !== undefined) {
      // Explicit framing: without it Node sends a GET's or DELETE's body unframed.
      if (chunked) headers['transfer-encoding'] = 'chunked'
      else headers['content-length'] = payload.length
    }
    const req = request({ host: '127.0.0.1', port: ctx.port, method, path, agent: ctx.agent, headers }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('error', reject)
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }))
    })
    signal.addEventListener('abort', () => req.destroy(new Error('aborted: the case timed out')))
    req.on('error', (err: NodeJS.ErrnoException) => {
      // A kept-alive socket the server closed as it was reused: the request never reached the server; once more on a new one.
      if (retry && req.reusedSocket && err.code === 'ECONNRESET' && !signal.aborted) call(ctx, method, path, body, chunked, signal, false).then(resolve, reject)
      else reject(err)
    })
    if (payload !== undefined && chunked) {
      const half = payload.length >> 1
      req.write(payload.subarray(0, half))
      req.end(payload.subarray(half))
    } else {
      req.end(payload)
    }
  })
}

/** The error object of an answer, checked against the error table; undefined for a success. */
function checkError (status: number, doc: unknown, allow: boolean, where: string): string | undefined {
  const e = (doc as { error?: { code?: unknown, message?: unknown, details?: unknown } } | null)?.error
  if (status < 400) {
    if (e !== undefined) throw violation(`${where}: status ${status} with an error body`)
    return undefined
  }
  if (typeof e !== 'object' || e === null) throw violation(`${where}: status ${status} without {"error": {...}}`)
  const code = e.code
  if (typeof code !== 'string' || !(code in CODES)) throw violation(`${where}: error code ${String(code)} is not in the error table`)
  if (typeof e.message !== 'string' || typeof e.details !== 'object' || e.details === null) throw violation(`${where}: ${code} without a message string and a details object`)
  const mapped = CODES[code as keyof typeof CODES].http
  if (mapped !== status) throw violation(`${where}: ${code} answered with status ${status}, the table says ${mapped}`)
  if (status >= 500 && !(code === 'UKAI_ERR_NOT_SUPPORTED' && allow)) {
    throw crash(`${where}: ${status} ${code}: ${e.message.split('\n')[0]!.slice(0, 200)}`)
  }
  return code
}

/** What the cases reached (reported with the results). */
export const stats = { ok: 0, refused: 0, codes: {} as Record<string, number> }

async function setup (fixtures: Fixture[]): Promise<Ctx> {
  const dir = await mkdtemp(join(tmpdir(), 'ukai-fuzz-control-'))
  try {
    const port = await freePort()
    const proxy = await freePort()
    const config = parseConfig({ image_root: 'images', metadata_root: 'metadata', id: `127.0.0.1:${proxy}`, proxy_port: proxy, control_port: port, control_address: '127.0.0.1', io_timeout: 2 }, dir)
    const node = await UkaiNode.start(config)
    // Warnings (a remote location's node is not registered ...) are expected here.
    node.on('warning', () => {})
    node.on('notice', () => {})
    const control = new ControlServer(node)
    await control.listen(port, '127.0.0.1')
    const ctx: Ctx = { token: await node.images.directory.controlToken(), fixtures, dir, config, node, control, port, agent: new Agent({ keepAlive: true, maxSockets: 1 }), baseline: '', cheap: '', protoKeys: protoState() }
    await makeFixtures(ctx)
    return ctx
  } catch (err) {
    await rm(dir, { recursive: true, force: true })
    throw err
  }
}

const CONTRACT = 'crash: a 5xx answer (500 UKAI_ERR_INTERNAL above all; 501 only counts as an answer with an allow header), an unhandled rejection or exception in the server, Object.prototype changed; hang: no complete answer within 10 s (the case, putting the fixtures back included, within 30 s); violation: an answer that is not JSON, an error body not {"error": {code, message, details}}, a code not in the error table or with another status than the table gives, anything stored (image metadata, block directories) for a refused request'

const label = (i: ControlInput): string => `${ROUTES[i.route]!.method} ${ROUTES[i.route]!.path}${i.query !== '' ? '?…' : ''}`

export const controlApi: Target<ControlInput, Ctx> = {
  name: 'control-api',
  summary: 'a real ControlServer (src/control/server.ts) on a real node in-process, over HTTP: every route of the routes table with valid, mutated (wrong types, huge/odd numbers, deep nesting, __proto__/constructor keys, duplicate keys, cuts), random and non-JSON bodies; existing, missing, invalid and badly encoded image names',
  contract: CONTRACT,
  defaultCases: 60_000,
  shardSize: 20_000,
  msPerCase: 3,
  cpuShare: 0.8,
  caseTimeoutMs: 30_000,
  sliceCases: 250,
  arbitrary: inputArb,
  stats: () => stats,
  setup: async () => await setup(FIXTURES),
  run: async (input, ctx, { signal }) => {
    const route = ROUTES[input.route]!
    const path = route.path.replace('{N}', input.name) + input.query
    // The route's template in the message (one signature per route), the path sent on a line of its own.
    const where = `${route.method} ${route.path}${input.query !== '' ? '?…' : ''}`
    try {
      await exchange(ctx, route, path, where, input, signal)
    } catch (err) {
      if (err instanceof Finding) throw new Finding(err.kind, `${err.message}\nrequest: ${route.method} ${compact(path, 200)}`, { cause: err.cause ?? err })
      throw err
    }
  },
  teardown: async (ctx) => {
    ctx.agent.destroy()
    await ctx.control.close()
    await ctx.node.close()
    await rm(ctx.dir, { recursive: true, force: true })
  },
  show: (i) => {
    const r = ROUTES[i.route]!
    const body = i.body.kind === 'none' ? '(no body)' : i.body.kind === 'text' ? `text ${JSON.stringify(compact(i.body.text, 200))}` : showJson(i.body.doc)
    return `${r.method} ${r.path.replace('{N}', i.name)}${i.query}${i.chunked ? ' (chunked)' : ''} body ${body}`
  },
  label
}

/**
 * control-api-large: the same routes against a large image (2^28 blocks):
 * a request must not loop over every block for long (a hang) or build a
 * per-block document of it (out of memory).
 */
export const controlApiLarge: Target<ControlInput, Ctx> = {
  name: 'control-api-large',
  summary: 'the control-api target\'s routes against one large image (1 TiB of 4 KiB blocks: 2^28 blocks, on two locations): valid bodies mostly, every route alike',
  contract: `${CONTRACT}; here also: the event loop blocked 10 s (the watchdog), or the process out of memory`,
  defaultCases: 60,
  shardSize: 15,
  msPerCase: 500,
  cpuShare: 1,
  caseTimeoutMs: 180_000,
  blockedMs: 10_000,
  heapMb: 1024,
  isolate: true,
  sliceCases: 3,
  arbitrary: largeInputArb,
  stats: () => stats,
  setup: async () => await setup(LARGE),
  run: async (input, ctx, cc) => { await controlApi.run(input, ctx, cc) },
  teardown: async (ctx) => { await controlApi.teardown(ctx) },
  show: (i) => controlApi.show(i),
  label
}

async function exchange (ctx: Ctx, route: Route, path: string, where: string, input: ControlInput, signal: AbortSignal): Promise<void> {
  let a: Answer
  const ac = new AbortController()
  signal.addEventListener('abort', () => ac.abort())
  try {
    a = await within(call(ctx, route.method, path, bodyText(input.body, ctx.config), input.chunked, ac.signal), ANSWER_MS, `${where}`)
  } catch (err) {
    ac.abort()
    if (err instanceof Finding) throw err
    if (signal.aborted) throw hang(`${where}: no answer within the case limit`)
    throw crash(`${where}: the request failed: ${(err as Error).message}`, err)
  }
  if (protoState() !== ctx.protoKeys) {
    ctx.protoKeys = protoState()
    throw crash(`${where}: Object.prototype or Array.prototype changed`)
  }
  let refused: string | undefined
  if (route.stream === true && a.status === 200) {
    const lines = a.text.split('\n').filter((l) => l !== '')
    let last: unknown
    for (const l of lines) {
      try { last = JSON.parse(l) } catch { throw violation(`${where}: a streamed line is not JSON: ${compact(l, 100)}`) }
    }
    const end = last as { result?: unknown, error?: unknown } | undefined
    if (end === undefined || (end.result === undefined && end.error === undefined)) throw violation(`${where}: the stream did not end with {"result"} or {"error"}`)
    if (end.error !== undefined) {
      const e = end.error as { code?: string, message?: string }
      const code = e.code
      if (typeof code !== 'string' || !(code in CODES)) throw violation(`${where}: streamed error code ${String(code)} is not in the error table`)
      if (CODES[code as keyof typeof CODES].http >= 500) throw crash(`${where}: streamed ${code}: ${String(e.message).split('\n')[0]!.slice(0, 200)}`)
      refused = code
    }
  } else {
    let doc: unknown
    try { doc = JSON.parse(a.text) } catch { throw violation(`${where}: status ${a.status} with a body that is not JSON: ${compact(a.text, 100)}`) }
    refused = checkError(a.status, doc, a.headers.allow !== undefined, where)
  }
  if (refused !== undefined) {
    stats.refused++
    stats.codes[refused] = (stats.codes[refused] ?? 0) + 1
  } else stats.ok++
  const cheap = await cheapState(ctx)
  if (cheap === ctx.cheap) return
  const now = await snapshotOf(ctx)
  if (flat(now) === ctx.baseline) { ctx.cheap = cheap; return }
  if (refused !== undefined) {
    const changed = [...new Set([...now.keys(), ...ctx.images!.keys()])].filter((k) => now.get(k) !== ctx.images!.get(k)).map((k) => k === '\0dirs' ? 'the block directories' : `image '${k}'`)
    await makeFixtures(ctx, now)
    throw violation(`${where}: refused with ${refused}, yet ${changed.join(', ')} changed`)
  }
  // An accepted change: back to the fixtures for the next case.
  await makeFixtures(ctx, now)
}
