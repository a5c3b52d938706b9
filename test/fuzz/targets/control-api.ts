/**
 * control-api: a real ControlServer (src/control/server.ts) on a real node
 * in this process (embedded metadata store in a temp directory), over
 * HTTP on loopback. Every route of the server's route tables (server.ts,
 * data-routes.ts, ui-routes.ts; `uncoveredRoutes` below checks that ROUTES
 * names each one, and setup refuses to start otherwise) gets what a
 * client sends, and that with one to three changes: JSON bodies valid,
 * mutated (a field replaced by another type, a huge or odd number, a
 * deeply nested value, a prototype-pollution key, a duplicate key, a cut),
 * random or not JSON at all; raw bodies of the data PUT (empty, small,
 * odd-sized, zeros or not, one byte over the 16 MiB limit); queries with
 * valid, missing, duplicate, unknown and malformed parameters (format,
 * offset, length, session, interval); image names in the path that exist,
 * do not, or are invalid or oddly encoded; data session ids that are real
 * (a session opened for the case, for reading or writing, on the image or
 * on another one), well-formed but unknown, or malformed.
 *
 * The answer's form:
 *
 * - an error is JSON (`application/json`), `{"error": {code, message,
 *   details}}` with the status of its code in the error table, and that
 *   status a 4xx (501 only with an `allow` header: a method the path does
 *   not take); a 5xx is a crash;
 * - a success is JSON, except: `GET /metrics` is `text/plain`, the
 *   Prometheus text format, which must parse, every series labelled with
 *   this node's id; `GET .../data` is `application/octet-stream` of
 *   exactly `length` bytes; sync and move stream NDJSON lines ending with
 *   `{"result"}` or `{"error"}` (an error there: a code of the table,
 *   never a 5xx one); `GET /v1/live` is `text/event-stream`, which never
 *   ends by itself: the target reads the first event (two, at a short
 *   interval), each `data: {time, nodes: [...]}`, then closes the
 *   connection; an `end` event, or an `error` one with a 5xx code, breaks
 *   the contract.
 *
 * What may be stored: nothing for a refused request (every image's
 * metadata, its revision aside, and the block directories; and the bytes
 * of the range a refused PUT named read back as before). An accepted data
 * PUT of n bytes at offset o changes data, and of the metadata only what a
 * write may change: `used_size` becomes max(used_size, o + n) (n > 0), and
 * a location whose replica failed the write (fx2's second location, whose
 * node does not exist) may gain out-of-sync blocks, within the written
 * blocks only, and a fine record; placement, hypervisors, size and block
 * size stay. The data must then read back as written: the target keeps a
 * model of each small fixture image's bytes (zeros when made), checks every
 * accepted PUT by reading the range back, every data GET against the model,
 * and that every extent an extents answer calls `zero` reads as zeros,
 * the extents tiling the range asked. Opening and closing a data session
 * changes no metadata either (who has the image open is not metadata).
 * Object.prototype must stay as it was. After an accepted change the
 * fixture images are put back as they were, and every session a case
 * opened is closed before the store is compared.
 */
import { Agent, request, type ClientRequest } from 'node:http'
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import { parseConfig, type Config } from '../../../src/config/config.js'
import parsePrometheus from 'parse-prometheus-text-format'
import { ControlServer, routes as serverRoutes } from '../../../src/control/server.js'
import { MAX_DATA } from '../../../src/control/data-routes.js'
import { MIN_MOVE_RATE } from '../../../src/node/move.js'
import { CODES } from '../../../src/errors.js'
import { encodeStored } from '../../../src/metadata/codec.js'
import { UkaiNode } from '../../../src/node/node.js'
import { freePort } from '../../helpers/node-process.js'
import { Finding, crash, hang, violation, within, type Target } from '../harness.js'
import { POLLUTING_KEYS, arr, compact, json, lit, mutatedJson, num, obj, oddString, rarely, render, showJson, str, type J } from '../gen.js'

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

const moveBody: fc.Arbitrary<J> = fc.record({
  to: locationJ, from: fc.option(locationJ), start: fc.option(blockNo), end: fc.option(blockNo),
  // At least MIN_MOVE_RATE mostly (a fixture moves within a second or so), below it now and then (refused).
  rate: fc.option(fc.oneof(
    { arbitrary: fc.oneof(fc.constantFrom(MIN_MOVE_RATE, 4 * MIN_MOVE_RATE, 100 * 2 ** 20), fc.double({ min: MIN_MOVE_RATE, max: 1e12, noNaN: true })), weight: 4 },
    { arbitrary: fc.oneof(fc.constantFrom(1, 4096, MIN_MOVE_RATE - 1), fc.double({ min: 0.001, max: MIN_MOVE_RATE - 1, noNaN: true })), weight: 1 }
  ).map(num))
}).map((r) => obj(Object.fromEntries(Object.entries(r).filter(([, v]) => v !== null)) as Record<string, J>))

const sessionBody: fc.Arbitrary<J> = fc.oneof(
  { arbitrary: fc.boolean().map((w) => obj({ write: lit(String(w)) })), weight: 4 },
  { arbitrary: fc.constant(obj({})), weight: 1 }
)

/** What a 200 answer of a route is. */
type Kind = 'json' | 'stream' | 'events' | 'text' | 'bytes'

interface Route {
  method: string
  /** {N}: an image name; {S}: a data session id. */
  path: string
  /** A JSON body (undefined: none is sent, except a random one now and then). */
  body: fc.Arbitrary<J> | undefined
  /** The body is raw bytes (the data PUT). */
  raw?: boolean
  /** What a success is (default json). */
  kind?: Kind
  /** The query string ('?...', or ''); {S} in it: a data session id. */
  query?: fc.Arbitrary<string>
}

/** encodeURIComponent, with lone surrogates sent as their (invalid) UTF-8 bytes. */
const enc = (s: string): string => {
  try { return encodeURIComponent(s) } catch { return encodeURIComponent(s.replace(/[\ud800-\udfff]/g, '')) + '%ED%A0%80' }
}

/** A query: parameters as a client sends them, sometimes one left out, doubled, unknown or malformed. */
function queryOf (params: Array<{ key: string, value: fc.Arbitrary<string>, required?: boolean }>): fc.Arbitrary<string> {
  return fc.record({
    values: fc.tuple(...params.map((p) => fc.option(p.value, { freq: p.required === true ? 12 : 2 }))),
    extra: rarely(fc.oneof(
      fc.constantFrom('x=1', '__proto__=1', 'constructor=', 'a', '=1', '&', 'offset=0', 'length=1', 'session=0', 'interval=1000', 'format=seed'),
      fc.tuple(anyQueryKey, oddString).map(([k, v]) => `${enc(k)}=${enc(v)}`)
    ), 6),
    dup: rarely(fc.nat(), 10)
  }).map(({ values, extra, dup }) => {
    const parts = params.flatMap((p, i) => values[i] === null ? [] : [`${p.key}=${values[i]!}`])
    if (dup !== null && parts.length > 0) parts.push(parts[dup % parts.length]!)
    if (extra !== null) parts.splice(dup !== null ? dup % (parts.length + 1) : parts.length, 0, extra)
    return parts.length === 0 ? '' : `?${parts.join('&')}`
  })
}

const anyQueryKey = fc.oneof(fc.constantFrom('offset', 'length', 'session', 'interval', 'format', 'Offset', 'offset[]', 'offset '), fc.string({ maxLength: 6 }))

/** Byte offsets and lengths: around the fixtures' blocks and ends (64 KiB blocks, 256 KiB and 1 MiB), and malformed ones. */
const byteValue: fc.Arbitrary<string> = fc.oneof(
  { arbitrary: fc.constantFrom(0, 1, 511, 4095, 4096, 4097, 65535, 65536, 65537, 131072, 200000, 262143, 262144, 262145, 1048575, 1048576, 1048577, MAX_DATA, MAX_DATA + 1, 2 ** 32, 2 ** 40, 2 ** 53 - 1).map(String), weight: 6 },
  { arbitrary: fc.integer({ min: 0, max: 1_200_000 }).map(String), weight: 4 },
  { arbitrary: fc.constantFrom('-1', '1e3', '0x10', '%201', '1.5', '', '+1', '00', '9007199254740993', '99999999999999999', '1%00', 'NaN', 'Infinity', '%E2%80%8B1'), weight: 2 }
)

/** A data session id: the session opened for the case ({S}), one that does not exist, or not an id at all. */
const sessionValue: fc.Arbitrary<string> = fc.oneof(
  { arbitrary: fc.constant('{S}'), weight: 6 },
  { arbitrary: fc.constantFrom('0'.repeat(24), 'abcdef0123456789abcdef01'), weight: 1 },
  { arbitrary: fc.oneof(fc.constantFrom('', 'x', 'ABCDEF0123456789ABCDEF01', '0'.repeat(25), '0'.repeat(23), '%00'), oddString.map(enc)), weight: 1 }
)

const infoQuery: fc.Arbitrary<string> = fc.oneof(
  { arbitrary: fc.constant(''), weight: 3 },
  { arbitrary: fc.constantFrom('stored', 'seed', 'ukai').map((f) => `?format=${f}`), weight: 3 },
  { arbitrary: fc.oneof(oddString.map((f) => `?format=${enc(f)}`), fc.constantFrom('?format', '?format=', '?format=seed&format=ukai', '?x=1', '?format=%', '?__proto__=1')), weight: 1 }
)

/** The live feed's period: valid (250 to 60000 ms; short ones mostly, to read two events), and not. */
const intervalValue: fc.Arbitrary<string> = fc.oneof(
  { arbitrary: fc.constantFrom(250, 300, 500, 1000, 60000).map(String), weight: 6 },
  { arbitrary: fc.integer({ min: 250, max: 60000 }).map(String), weight: 1 },
  { arbitrary: fc.constantFrom('249', '0', '-1', '60001', '1e3', '0x100', '%20500', '500ms', '', '0250', '1000000', '9999999999', '500.5', 'NaN'), weight: 3 }
)

const dataQuery = (keys: Array<'offset' | 'length'>, required: boolean): fc.Arbitrary<string> =>
  queryOf([...keys.map((key) => ({ key, value: byteValue, required })), { key: 'session', value: sessionValue }])

/** The routes tables of src/control/server.ts, data-routes.ts and ui-routes.ts; {N} is an image name, {S} a data session. */
const ROUTES: Route[] = [
  { method: 'GET', path: '/v1/node', body: undefined },
  { method: 'GET', path: '/metrics', body: undefined, kind: 'text' },
  { method: 'GET', path: '/v1/ping', body: undefined },
  { method: 'GET', path: '/v1/nodes', body: undefined },
  { method: 'GET', path: '/v1/nodes/errors', body: undefined },
  { method: 'POST', path: '/v1/replicas/{N}', body: anyBody },
  { method: 'DELETE', path: '/v1/replicas/{N}', body: anyBody },
  { method: 'GET', path: '/v1/images', body: undefined },
  { method: 'POST', path: '/v1/images', body: createBody },
  { method: 'POST', path: '/v1/images/import', body: importBody },
  { method: 'GET', path: '/v1/images/{N}', body: undefined, query: infoQuery },
  { method: 'GET', path: '/v1/images/{N}/stats', body: undefined },
  { method: 'POST', path: '/v1/images/{N}/sync', body: syncBody, kind: 'stream' },
  { method: 'POST', path: '/v1/images/{N}/move', body: moveBody, kind: 'stream' },
  { method: 'DELETE', path: '/v1/images/{N}/move', body: undefined },
  { method: 'POST', path: '/v1/images/{N}/fence', body: counter('generation') },
  { method: 'POST', path: '/v1/images/{N}/refresh', body: counter('revision') },
  { method: 'POST', path: '/v1/images/{N}/locations', body: rangeBody('location') },
  { method: 'DELETE', path: '/v1/images/{N}/locations', body: rangeBody('location') },
  { method: 'POST', path: '/v1/images/{N}/hypervisors', body: rangeBody('hypervisor') },
  { method: 'DELETE', path: '/v1/images/{N}/hypervisors', body: rangeBody('hypervisor') },
  { method: 'DELETE', path: '/v1/images/{N}', body: anyBody },
  // data-routes.ts
  { method: 'POST', path: '/v1/images/{N}/sessions', body: sessionBody },
  { method: 'DELETE', path: '/v1/images/{N}/sessions/{S}', body: undefined },
  { method: 'PUT', path: '/v1/images/{N}/data', body: undefined, raw: true, query: dataQuery(['offset'], true) },
  { method: 'GET', path: '/v1/images/{N}/data', body: undefined, kind: 'bytes', query: dataQuery(['offset', 'length'], true) },
  { method: 'GET', path: '/v1/images/{N}/extents', body: undefined, query: dataQuery(['offset', 'length'], false) },
  { method: 'POST', path: '/v1/images/{N}/flush', body: undefined, query: queryOf([{ key: 'session', value: sessionValue }]) },
  { method: 'GET', path: '/v1/storage', body: undefined },
  { method: 'GET', path: '/v1/nodes/storage', body: undefined },
  // ui-routes.ts
  { method: 'GET', path: '/v1/stats', body: undefined },
  { method: 'GET', path: '/v1/nodes/stats', body: undefined },
  { method: 'GET', path: '/v1/rtt', body: undefined },
  { method: 'GET', path: '/v1/nodes/rtt', body: undefined },
  { method: 'GET', path: '/v1/live', body: undefined, kind: 'events', query: queryOf([{ key: 'interval', value: intervalValue }]) }
]
// Weights: routes that take a body or a query are where the parsing is; the live feed waits for its events.
const ROUTE_WEIGHTS = ROUTES.map((r) => r.kind === 'events' ? 2 : r.raw === true || r.query !== undefined ? 6 : r.body === undefined ? 1 : r.body === anyBody ? 2 : 6)

/** The path of a ROUTES entry with sample names, as a server route's pattern must match it. */
const samplePath = (r: Route): string => r.path.replace('{N}', 'fx').replace('{S}', '0'.repeat(24))

/**
 * Routes of the server's tables that no ROUTES entry reaches (same method,
 * a sample path the pattern matches), and ROUTES entries that reach no
 * route: empty, or the table above has fallen behind the server.
 */
export function uncoveredRoutes (): { missing: string[], stale: string[] } {
  const missing = serverRoutes.filter((sr) => !ROUTES.some((r) => r.method === sr.method && sr.pattern.test(samplePath(r)))).map((sr) => `${sr.method} ${String(sr.pattern)}`)
  const stale = ROUTES.filter((r) => !serverRoutes.some((sr) => sr.method === r.method && sr.pattern.test(samplePath(r)))).map((r) => `${r.method} ${r.path}`)
  return { missing, stale }
}

/** A path segment: an image name as a client would encode it, or raw (badly encoded) text. */
const segment: fc.Arbitrary<string> = fc.oneof(
  { arbitrary: fc.constantFrom(...FIXTURE_NAMES).map(enc), weight: 8 },
  { arbitrary: fc.constantFrom('new1', 'nope', 'import', 'x'.repeat(128), 'x'.repeat(129), ...POLLUTING_KEYS).map(enc), weight: 2 },
  { arbitrary: oddString.map(enc), weight: 1 },
  { arbitrary: fc.constantFrom('%', '%E0%A4%A', '%ZZ', '%2e%2e', '..', '.', 'a%2Fb', 'fx%2Fsync', 'fx%00', '%C0%AE', 'fx;x', 'fx?', 'fx%3Fformat%3Dseed'), weight: 1 }
)

/** The raw body of a data PUT, made from a seed when sent (so inputs print short). */
interface Bytes { size: number, fill: 'zeros' | 'random' | 'ones', seed: number }

type Body = { kind: 'none' } | { kind: 'json', doc: J } | { kind: 'text', text: string } | { kind: 'bytes', bytes: Bytes }

export interface ControlInput {
  route: number
  name: string
  query: string
  body: Body
  /** Send the body in chunks (no content-length). */
  chunked: boolean
  /** The data session {S} stands for: opened before the request on this image or the other fixture, for writing or not. */
  open: { write: boolean, other: boolean }
  /** {S} in the path (DELETE .../sessions/{S}). */
  session: string
}

const bytesArb: fc.Arbitrary<Bytes> = fc.record({
  size: fc.oneof(
    { arbitrary: fc.constantFrom(0, 1, 511, 512, 4095, 4096, 4097, 65535, 65536, 65537, 131072, 262144), weight: 6 },
    { arbitrary: fc.integer({ min: 0, max: 300_000 }), weight: 4 },
    { arbitrary: fc.constant(MAX_DATA + 1), weight: 1 }
  ),
  fill: fc.constantFrom('zeros', 'random', 'random', 'ones'),
  seed: fc.integer()
})

/** The bytes of a PUT body: zeros, 0xff, or from a small PRNG (xorshift32) seeded by the input. */
function bytesOf (b: Bytes): Buffer {
  const out = Buffer.alloc(b.size, b.fill === 'ones' ? 0xff : 0)
  if (b.fill !== 'random') return out
  let x = (b.seed | 1) >>> 0
  for (let i = 0; i + 4 <= out.length; i += 4) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0
    out.writeUInt32LE(x, i)
  }
  for (let i = out.length & ~3; i < out.length; i++) out[i] = i & 0xff
  return out
}

const bodyFor = (r: Route): fc.Arbitrary<Body> => r.raw === true
  ? fc.oneof(
    { arbitrary: bytesArb.map((bytes): Body => ({ kind: 'bytes', bytes })), weight: 12 },
    { arbitrary: fc.constant<Body>({ kind: 'none' }), weight: 1 },
    { arbitrary: fc.constantFrom('{}', 'null', '').map((text): Body => ({ kind: 'text', text })), weight: 1 })
  : r.body === undefined
    ? fc.oneof(
      { arbitrary: fc.constant<Body>({ kind: 'none' }), weight: 8 },
      { arbitrary: mutatedJson(anyBody).map((doc): Body => ({ kind: 'json', doc })), weight: 1 })
    : fc.oneof(
      { arbitrary: mutatedJson(r.body).map((doc): Body => ({ kind: 'json', doc })), weight: 12 },
      { arbitrary: fc.constant<Body>({ kind: 'none' }), weight: 1 },
      { arbitrary: fc.oneof(fc.string({ maxLength: 20 }), fc.constantFrom('{', 'null', '[]', '"x"', '1e999', '{"__proto__":{"polluted":1}}', '\ufeff{}', '{"name":"a"}garbage')).map((text): Body => ({ kind: 'text', text })), weight: 1 }
    )

const inputsOf = (names: fc.Arbitrary<string>, body: (r: Route) => fc.Arbitrary<Body>, weights: number[]): fc.Arbitrary<ControlInput> => fc.oneof(...ROUTES.map((r, i) => ({
  arbitrary: fc.record({
    route: fc.constant(i),
    name: names,
    query: r.query ?? fc.constant(''),
    body: body(r),
    chunked: fc.oneof({ arbitrary: fc.constant(false), weight: 5 }, { arbitrary: fc.constant(true), weight: 1 }),
    open: fc.record({ write: fc.boolean(), other: fc.oneof({ arbitrary: fc.constant(false), weight: 6 }, { arbitrary: fc.constant(true), weight: 1 }) }),
    session: r.path.includes('{S}') ? sessionValue : fc.constant('')
  }),
  weight: weights[i]!
})))

const inputArb = inputsOf(segment, bodyFor, ROUTE_WEIGHTS)

/** The removal of one of the large image's two locations, all its blocks (each has an in-sync copy on the other). */
const wholeLocation: fc.Arbitrary<J> = fc.oneof(
  { arbitrary: fc.constantFrom('127.0.0.1:1', '@self').map((l) => obj({ location: str(l) })), weight: 3 },
  { arbitrary: rangeBody('location'), weight: 1 }
)

/**
 * A move of part of the large image: at most two steps' worth (2^19 blocks
 * of 4 KiB, 2 GiB), always with an end. A move of all of it is 1,024 steps
 * and legitimately takes minutes; it cannot be stopped once it runs, so it
 * would hold the image for the cases after it.
 */
const largeMove: fc.Arbitrary<J> = fc.record({
  to: locationJ, start: fc.integer({ min: 0, max: 2 ** 28 - 1 }), blocks: fc.integer({ min: 1, max: 2 ** 19 }),
  rate: fc.option(fc.constantFrom(MIN_MOVE_RATE, 100 * 2 ** 20).map(num))
}).map(({ to, start, blocks, rate }) => obj({ to, start: num(start), end: num(Math.min(2 ** 28 - 1, start + blocks - 1)), ...(rate !== null ? { rate } : {}) }))

/** For the large image: its name, valid bodies mostly (what is slow is the work, not the parsing), every route alike. */
const largeInputArb = inputsOf(
  fc.oneof({ arbitrary: fc.constant('big'), weight: 9 }, { arbitrary: fc.constant('nope'), weight: 1 }),
  (r) => r.path.endsWith('/move')
    ? largeMove.map((doc): Body => ({ kind: 'json', doc }))
    : r.raw === true || r.body === undefined
    ? bodyFor(r)
    : fc.oneof(
      { arbitrary: (r.method === 'DELETE' && r.path.endsWith('/locations') ? wholeLocation : r.body).map((doc): Body => ({ kind: 'json', doc })), weight: 6 },
      { arbitrary: mutatedJson(r.body).map((doc): Body => ({ kind: 'json', doc })), weight: 2 },
      { arbitrary: fc.constant<Body>({ kind: 'none' }), weight: 1 }
    ),
  // Routes whose work may go block by block weigh more: a per-block export, a location's removal, a sync, a move, extents.
  ROUTES.map((r) => r.query === infoQuery || (r.method === 'DELETE' && r.path.endsWith('/locations')) ? 4 : r.kind === 'stream' || r.path.endsWith('/extents') ? 2 : 1)
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
  /** What each small fixture image's bytes are (zeros when made; accepted PUTs write into it). */
  data: Map<string, Buffer>
}

/** Fixture images whose bytes the target models (a 1 TiB one is not). */
const MODELLED = 64 * 2 ** 20

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
    if (left.has(f.name)) continue
    await ctx.node.createImage({ ...f, ...(f.locations !== undefined ? { locations: f.locations.map(fix) } : {}) })
    if (f.size <= MODELLED) ctx.data.set(f.name, Buffer.alloc(f.size))
  }
  ctx.images = await snapshotOf(ctx)
  ctx.baseline = flat(ctx.images)
  ctx.cheap = await cheapState(ctx)
}

const protoState = (): string => JSON.stringify(Object.getOwnPropertyNames(Object.prototype).sort()) + JSON.stringify(Object.keys(Object.prototype)) +
  JSON.stringify(Object.getOwnPropertyNames(Array.prototype).length) + String(Object.getPrototypeOf({}) === Object.prototype)

/** Renders the body; '@self' stands for this node's id, so valid bodies can name it. */
function bodyOf (b: Body, c: Config): Buffer | undefined {
  if (b.kind === 'none') return undefined
  if (b.kind === 'bytes') return bytesOf(b.bytes)
  if (b.kind === 'text') return Buffer.from(b.text, 'utf8')
  return Buffer.from(render(b.doc).replaceAll('"@self"', JSON.stringify(c.id)), 'utf8')
}

/** An answer must come within this (the case limit leaves room for putting the fixtures back). */
const ANSWER_MS = 10_000
/**
 * A streamed answer (sync, move) must be complete within this: a move
 * copies at MIN_MOVE_RATE at the slowest, so a fixture's data (at most
 * 1 MiB; 16 MiB written into the large image) moves well within it.
 */
const STREAM_MS = 20_000

interface Answer { status: number, headers: Record<string, string | string[] | undefined>, raw: Buffer, text: string }

interface CallOptions {
  body?: Buffer
  chunked?: boolean
  contentType?: string
  /** Server-sent events: resolve once this many events have come (then the connection is closed). */
  events?: number
  retry?: boolean
}

async function call (ctx: Ctx, method: string, path: string, signal: AbortSignal, o: CallOptions = {}): Promise<Answer> {
  return await new Promise<Answer>((resolve, reject) => {
    const payload = o.body
    const headers: Record<string, string | number> = { 'content-type': o.contentType ?? 'application/json', authorization: `Bearer ${ctx.token}` }
    if (payload !== undefined) {
      // Explicit framing: without it Node sends a GET's or DELETE's body unframed.
      if (o.chunked === true) headers['transfer-encoding'] = 'chunked'
      else headers['content-length'] = payload.length
    }
    let answered = false
    const req: ClientRequest = request({ host: '127.0.0.1', port: ctx.port, method, path, agent: ctx.agent, headers }, (res) => {
      answered = true
      const chunks: Buffer[] = []
      const done = (): void => {
        const raw = Buffer.concat(chunks)
        resolve({ status: res.statusCode ?? 0, headers: res.headers, raw, text: raw.toString('utf8') })
      }
      const sse = o.events !== undefined && res.statusCode === 200 && String(res.headers['content-type']).startsWith('text/event-stream')
      res.on('data', (c: Buffer) => {
        chunks.push(c)
        // A feed never ends by itself: once the events wanted are in, the client goes (the server must stop feeding).
        if (sse && Buffer.concat(chunks).toString('utf8').split('\n\n').length > o.events!) { done(); req.destroy() }
      })
      res.on('error', (err) => { if (!sse) reject(err) })
      res.on('end', done)
    })
    signal.addEventListener('abort', () => req.destroy(new Error('aborted: the case timed out')))
    req.on('error', (err: NodeJS.ErrnoException) => {
      // A kept-alive socket the server closed as it was reused: the request never reached the server; once more on a new one.
      if (o.retry !== false && !answered && req.reusedSocket && err.code === 'ECONNRESET' && !signal.aborted) call(ctx, method, path, signal, { ...o, retry: false }).then(resolve, reject)
      else if (!answered) reject(err)
    })
    if (payload !== undefined && o.chunked === true) {
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

/** An error sent inside a stream (NDJSON line, or an `error` event): a code of the table, never a 5xx one. */
function streamedError (error: unknown, where: string): string {
  const e = error as { code?: string, message?: string } | null
  const code = e?.code
  if (typeof code !== 'string' || !(code in CODES)) throw violation(`${where}: streamed error code ${String(code)} is not in the error table`)
  if (CODES[code as keyof typeof CODES].http >= 500) throw crash(`${where}: streamed ${code}: ${String(e?.message).split('\n')[0]!.slice(0, 200)}`)
  return code
}

const contentType = (a: Answer): string => String(a.headers['content-type'] ?? '')

/** What the cases reached (reported with the results). */
export const stats = { ok: 0, refused: 0, codes: {} as Record<string, number>, routes: {} as Record<string, number> }

async function setup (fixtures: Fixture[]): Promise<Ctx> {
  // The table must name every route the server has, before anything is fuzzed.
  const { missing, stale } = uncoveredRoutes()
  if (missing.length > 0 || stale.length > 0) throw new Error(`control-api: ROUTES is out of date: not covered ${missing.join(', ') || 'none'}; matching no route ${stale.join(', ') || 'none'}`)
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
    const ctx: Ctx = { token: await node.images.directory.controlToken(), fixtures, dir, config, node, control, port, agent: new Agent({ keepAlive: true, maxSockets: 1 }), baseline: '', cheap: '', protoKeys: protoState(), data: new Map() }
    await makeFixtures(ctx)
    return ctx
  } catch (err) {
    await rm(dir, { recursive: true, force: true })
    throw err
  }
}

const CONTRACT = 'crash: a 5xx answer (500 UKAI_ERR_INTERNAL above all; 501 only counts as an answer with an allow header) or a 5xx error inside a stream, an unhandled rejection or exception in the server, Object.prototype changed; hang: no complete answer (for the live feed: its first events) within 10 s (sync and move: 20 s) (the case, putting the fixtures back included, within 30 s); violation: an error that is not JSON or not {"error": {code, message, details}}, a code not in the error table or with another status than the table gives, a success not of its route\'s form (JSON; Prometheus text that parses for /metrics; exactly `length` bytes of octet-stream for a data GET; NDJSON ending in result or error for sync and move; data events of {time, nodes} and no end for the live feed), anything stored (image metadata, block directories, the bytes of the range) for a refused request, an accepted data PUT that changes metadata beyond used_size growth and out-of-sync marks of a failed replica within the written blocks, data that does not read back as written (a data GET against the model of the image\'s bytes, the extents called zero)'

const label = (i: ControlInput): string => `${ROUTES[i.route]!.method} ${ROUTES[i.route]!.path}${i.query !== '' ? '?…' : ''}`

export const controlApi: Target<ControlInput, Ctx> = {
  name: 'control-api',
  summary: 'a real ControlServer (src/control/server.ts) on a real node in-process, over HTTP: every route of its tables (JSON, Prometheus text, NDJSON and server-sent-event streams, raw data) with valid, mutated (wrong types, huge/odd numbers, deep nesting, __proto__/constructor keys, duplicate keys, cuts), random and non-JSON bodies, raw data bodies, valid and malformed queries; existing, missing, invalid and badly encoded image names; real, unknown and malformed data sessions',
  contract: CONTRACT,
  defaultCases: 60_000,
  shardSize: 20_000,
  msPerCase: 4,
  cpuShare: 0.8,
  caseTimeoutMs: 30_000,
  sliceCases: 300,
  arbitrary: inputArb,
  stats: () => stats,
  setup: async () => await setup(FIXTURES),
  run: async (input, ctx, { signal }) => {
    const route = ROUTES[input.route]!
    // The route's template in the message (one signature per route), the path sent on a line of its own.
    const where = `${route.method} ${route.path}${input.query !== '' ? '?…' : ''}`
    let path = route.path.replace('{N}', input.name) + input.query
    try {
      await exchange(ctx, route, where, input, signal, (p) => { path = p })
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
    const b = i.body
    const body = b.kind === 'none' ? '(no body)' : b.kind === 'text' ? `text ${JSON.stringify(compact(b.text, 200))}` : b.kind === 'bytes' ? `${b.bytes.size} bytes (${b.bytes.fill}, seed ${b.bytes.seed})` : showJson(b.doc)
    const uses = `${r.path}${i.query}`.includes('{S}') ? ` ({S}: a session opened ${i.open.write ? 'for writing' : 'for reading'} on ${i.open.other ? 'the other fixture' : 'the image'})` : ''
    return `${r.method} ${r.path.replace('{N}', i.name).replace('{S}', i.session)}${i.query}${i.chunked ? ' (chunked)' : ''} body ${body}${uses}`
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

/** What the server makes of a request: the ROUTES entry of the route it reaches, the image it names, the query. */
interface Reached { route: Route | undefined, image: string | undefined, query: URLSearchParams }

/**
 * The route a sent path reaches, as the server finds it (server.ts: the
 * decoded pathname against the patterns): a raw segment such as `fx?` or
 * `a%2Fb` sends the request elsewhere than its template says.
 */
function resolveRoute (method: string, path: string): Reached {
  const url = new URL(path, 'http://control')
  let pathname: string
  try { pathname = decodeURIComponent(url.pathname) } catch { return { route: undefined, image: undefined, query: url.searchParams } }
  const sr = serverRoutes.find((r) => r.method === method && r.pattern.test(pathname))
  if (sr === undefined) return { route: undefined, image: undefined, query: url.searchParams }
  const route = ROUTES.find((r) => r.method === method && sr.pattern.test(samplePath(r)))
  const image = route?.path.includes('{N}') === true ? sr.pattern.exec(pathname)![1] : undefined
  return { route, image, query: url.searchParams }
}

/** A path segment as the server decodes it (the raw text when it does not decode). */
const decoded = (segment: string): string => { try { return decodeURIComponent(segment) } catch { return segment } }

/** The fixture image a request names, if it names one. */
function fixtureOf (ctx: Ctx, t: Reached): Fixture | undefined {
  return t.image === undefined ? undefined : ctx.fixtures.find((f) => f.name === t.image)
}

/** A byte offset or length the server accepts, else undefined. */
function byteNumber (v: string | undefined): number | undefined {
  return v !== undefined && /^\d{1,16}$/.test(v) && Number.isSafeInteger(Number(v)) ? Number(v) : undefined
}

interface Outcome {
  /** The error code of a refusal; undefined for a success. */
  refused: string | undefined
  answer: Answer
}

/** The data sessions a case opened, closed before the store is compared (a session keeps its image open). */
class Sessions {
  private readonly open: Array<{ image: string, id: string }> = []
  add (image: string, id: string): void { this.open.push({ image, id }) }
  async closeAll (ctx: Ctx, signal: AbortSignal, where: string): Promise<void> {
    while (this.open.length > 0) {
      const s = this.open.pop()!
      const a = await within(call(ctx, 'DELETE', `/v1/images/${encodeURIComponent(s.image)}/sessions/${s.id}`, signal), ANSWER_MS, `${where}: closing the case's data session`)
      // Gone already when the case itself closed it.
      if (a.status !== 200 && a.status !== 404) throw crash(`${where}: closing the case's data session: ${a.status} ${compact(a.text, 200)}`)
    }
  }
}

async function exchange (ctx: Ctx, route: Route, where: string, input: ControlInput, signal: AbortSignal, sent: (path: string) => void): Promise<void> {
  const ac = new AbortController()
  signal.addEventListener('abort', () => ac.abort())
  const sessions = new Sessions()
  let clean = false
  try {
    // {S}: a data session opened for the case (on this image or the other fixture), or one that does not exist when that open fails.
    let sid = '0'.repeat(24)
    const template = `${route.path.replace('{S}', input.session)}${input.query}`
    if (template.includes('{S}')) {
      const on = input.open.other ? (ctx.fixtures.find((f) => f.name !== decoded(input.name))?.name ?? input.name) : input.name
      const a = await within(call(ctx, 'POST', `/v1/images/${input.open.other ? encodeURIComponent(on) : on}/sessions`, ac.signal, { body: Buffer.from(JSON.stringify({ write: input.open.write })) }), ANSWER_MS, `${where}: opening a data session for the case`)
      if (a.status === 201) {
        sid = (JSON.parse(a.text) as { session: string }).session
        sessions.add(input.open.other ? on : decoded(input.name), sid)
      }
    }
    const path = route.path.replace('{N}', input.name).replace('{S}', input.session).replaceAll('{S}', sid) + input.query.replaceAll('{S}', sid)
    sent(path)
    const t = resolveRoute(route.method, path)
    const before = t.route?.raw === true ? await rangeBefore(ctx, t, input) : undefined
    const outcome = await answer(ctx, route, t, path, where, input, ac.signal)
    // A session the case opened through the route itself.
    if (t.route?.path.endsWith('/sessions') === true && outcome.refused === undefined) {
      const doc = JSON.parse(outcome.answer.text) as { session?: unknown, image?: unknown, write?: unknown, size?: unknown, used_size?: unknown, block_size?: unknown }
      if (typeof doc.session !== 'string' || !/^[0-9a-f]{24}$/.test(doc.session) || typeof doc.write !== 'boolean' || typeof doc.size !== 'number' || typeof doc.used_size !== 'number' || typeof doc.block_size !== 'number') {
        throw violation(`${where}: a session opened without {session, write, size, used_size, block_size}: ${compact(outcome.answer.text, 200)}`)
      }
      sessions.add(t.image!, doc.session)
    }
    await sessions.closeAll(ctx, ac.signal, where)
    if (outcome.refused !== undefined) {
      stats.refused++
      stats.codes[outcome.refused] = (stats.codes[outcome.refused] ?? 0) + 1
    } else {
      stats.ok++
      stats.routes[`${route.method} ${route.path}`] = (stats.routes[`${route.method} ${route.path}`] ?? 0) + 1
    }
    await checkData(ctx, t, input, outcome, before, where, ac.signal)
    await checkStore(ctx, t, input, outcome, where)
    clean = true
  } catch (err) {
    ac.abort()
    if (err instanceof Finding) throw err
    if (signal.aborted) throw hang(`${where}: no answer within the case limit`)
    throw crash(`${where}: the request failed: ${(err as Error).message}`, err)
  } finally {
    if (!clean) {
      // A finding: put the sessions and fixtures back as they were, so the next case is judged on its own.
      await sessions.closeAll(ctx, new AbortController().signal, where).catch(() => {})
      await makeFixtures(ctx, await snapshotOf(ctx)).catch(() => {})
    }
  }
}

/** The request, and its answer checked for the form of its route. */
async function answer (ctx: Ctx, sentAs: Route, t: Reached, path: string, where: string, input: ControlInput, signal: AbortSignal): Promise<Outcome> {
  // The form of the route the request reaches (its template's, unless a raw segment sent it elsewhere).
  const route: Route = t.route ?? { method: sentAs.method, path: '(none)', body: undefined }
  let events: number | undefined
  if (route.kind === 'events') {
    const ms = Number(t.query.get('interval') ?? 1000)
    events = ms <= 500 ? 2 : 1
  }
  const a = await within(call(ctx, route.method, path, signal, {
    body: bodyOf(input.body, ctx.config),
    chunked: input.chunked,
    ...(input.body.kind === 'bytes' ? { contentType: 'application/octet-stream' } : {}),
    ...(events !== undefined ? { events } : {})
  }), route.kind === 'stream' ? STREAM_MS : ANSWER_MS, `${where}`)
  if (protoState() !== ctx.protoKeys) {
    ctx.protoKeys = protoState()
    throw crash(`${where}: Object.prototype or Array.prototype changed`)
  }
  const ct = contentType(a)
  if (a.status === 200 && route.kind === 'stream') {
    if (!ct.startsWith('application/x-ndjson')) throw violation(`${where}: a stream of content-type ${ct}`)
    const lines = a.text.split('\n').filter((l) => l !== '')
    let last: unknown
    for (const l of lines) {
      try { last = JSON.parse(l) } catch { throw violation(`${where}: a streamed line is not JSON: ${compact(l, 100)}`) }
    }
    const end = last as { result?: unknown, error?: unknown } | undefined
    if (end === undefined || (end.result === undefined && end.error === undefined)) throw violation(`${where}: the stream did not end with {"result"} or {"error"}`)
    return { refused: end.error !== undefined ? streamedError(end.error, where) : undefined, answer: a }
  }
  if (a.status === 200 && route.kind === 'events' && ct.startsWith('text/event-stream')) {
    // WHATWG HTML 9.2: an event is lines up to a blank one; `data:` lines carry it, `event:` names it.
    const blocks = a.text.split('\n\n').slice(0, events)
    if (blocks.length < events!) throw violation(`${where}: the feed ended after ${blocks.length - 1} event(s): ${compact(a.text, 200)}`)
    for (const block of blocks) {
      const lines = block.split('\n')
      const name = lines.find((l) => l.startsWith('event: '))?.slice(7)
      const data = lines.filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('\n')
      let doc: unknown
      try { doc = JSON.parse(data) } catch { throw violation(`${where}: an event's data is not JSON: ${compact(block, 200)}`) }
      if (name === 'error') return { refused: streamedError((doc as { error?: unknown }).error, where), answer: a }
      if (name !== undefined) throw violation(`${where}: an '${name}' event on a feed that ends only when the client goes: ${compact(block, 200)}`)
      const e = doc as { time?: unknown, nodes?: unknown }
      if (typeof e.time !== 'number' || !Array.isArray(e.nodes) || !e.nodes.every((n) => typeof (n as { id?: unknown })?.id === 'string')) throw violation(`${where}: an event not {time, nodes: [{id, ...}]}: ${compact(data, 200)}`)
    }
    return { refused: undefined, answer: a }
  }
  if (a.status === 200 && route.kind === 'text') {
    if (!ct.startsWith('text/plain')) throw violation(`${where}: metrics of content-type ${ct}`)
    let families: ReturnType<typeof parsePrometheus>
    // parse-prometheus-text-format folds a histogram's series (le, sum, count) wrongly: read it untyped.
    try { families = parsePrometheus(a.text.replace(/^# TYPE (\S+) histogram$/gm, '# TYPE $1 untyped')) } catch (err) { throw violation(`${where}: the metrics do not parse: ${(err as Error).message}`) }
    if (!families.some((f) => f.name === 'ukai_node_up')) throw violation(`${where}: the metrics have no ukai_node_up`)
    for (const f of families) {
      for (const m of f.metrics) if (m.labels?.node !== ctx.config.id) throw violation(`${where}: a series of ${f.name} without node="${ctx.config.id}"`)
    }
    return { refused: undefined, answer: a }
  }
  if (a.status === 200 && route.kind === 'bytes') {
    if (!ct.startsWith('application/octet-stream')) throw violation(`${where}: data of content-type ${ct}`)
    const length = byteNumber(t.query.get('length') ?? undefined)
    if (length === undefined || a.raw.length !== length) throw violation(`${where}: ${a.raw.length} bytes of data for a length of ${String(length)}`)
    return { refused: undefined, answer: a }
  }
  if (!ct.startsWith('application/json')) throw violation(`${where}: status ${a.status} of content-type ${ct}: ${compact(a.text, 100)}`)
  let doc: unknown
  try { doc = JSON.parse(a.text) } catch { throw violation(`${where}: status ${a.status} with a body that is not JSON: ${compact(a.text, 100)}`) }
  return { refused: checkError(a.status, doc, a.headers.allow !== undefined, where), answer: a }
}

/** The bytes a PUT's range holds before it (for a refusal: they must stay), when the target models the image. */
async function rangeBefore (ctx: Ctx, t: Reached, input: ControlInput): Promise<{ image: string, offset: number, bytes: Buffer } | undefined> {
  const f = fixtureOf(ctx, t)
  const offset = byteNumber(t.query.get('offset') ?? undefined)
  const model = f === undefined ? undefined : ctx.data.get(f.name)
  if (f === undefined || offset === undefined || model === undefined || offset >= f.size) return undefined
  const n = input.body.kind === 'bytes' ? input.body.bytes.size : 0
  return { image: f.name, offset, bytes: Buffer.from(model.subarray(offset, Math.min(f.size, offset + Math.max(n, 1)))) }
}

/** Reads `length` bytes at `offset` of a fixture image through the API, without a session. */
async function readBack (ctx: Ctx, image: string, offset: number, length: number, signal: AbortSignal, where: string): Promise<Buffer> {
  const a = await within(call(ctx, 'GET', `/v1/images/${encodeURIComponent(image)}/data?offset=${offset}&length=${length}`, signal), ANSWER_MS, `${where}: reading the range back`)
  if (a.status !== 200 || a.raw.length !== length) throw crash(`${where}: reading the range back: ${a.status} ${a.raw.length} bytes: ${compact(a.text, 200)}`)
  return a.raw
}

const firstDiff = (a: Buffer, b: Buffer): number => { for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i; return -1 }

/** The bytes against the model: what a PUT wrote reads back, what a refused one named did not change, reads and extents agree with it. */
async function checkData (ctx: Ctx, t: Reached, input: ControlInput, o: Outcome, before: { image: string, offset: number, bytes: Buffer } | undefined, where: string, signal: AbortSignal): Promise<void> {
  const route = t.route
  if (route === undefined) return
  const f = fixtureOf(ctx, t)
  const model = f === undefined ? undefined : ctx.data.get(f.name)
  const param = (k: string): number | undefined => byteNumber(t.query.get(k) ?? undefined)
  if (route.raw === true) {
    if (o.refused === undefined) {
      const offset = param('offset')!
      const data = bodyOf(input.body, ctx.config) ?? Buffer.alloc(0)
      const written = (JSON.parse(o.answer.text) as { written?: unknown }).written
      if (written !== data.length) throw violation(`${where}: answered {written: ${String(written)}} for ${data.length} bytes`)
      if (model === undefined || data.length === 0) return
      data.copy(model, offset)
      const back = await readBack(ctx, f!.name, offset, data.length, signal, where)
      const at = firstDiff(back, data)
      if (at >= 0) throw violation(`${where}: ${data.length} bytes written at ${offset} read back different from byte ${offset + at} (${back[at]} for ${data[at]})`)
    } else if (before !== undefined) {
      const back = await readBack(ctx, before.image, before.offset, before.bytes.length, signal, where)
      const at = firstDiff(back, before.bytes)
      if (at >= 0) throw violation(`${where}: refused with ${o.refused}, yet byte ${before.offset + at} changed (${back[at]} for ${before.bytes[at]})`)
    }
    return
  }
  if (o.refused !== undefined || f === undefined || model === undefined) return
  if (route.kind === 'bytes') {
    const offset = param('offset')!
    const want = model.subarray(offset, offset + o.answer.raw.length)
    const at = firstDiff(o.answer.raw, want)
    if (at >= 0) throw violation(`${where}: byte ${offset + at} reads ${o.answer.raw[at]}, ${want[at]} was written there`)
  } else if (route.path.endsWith('/extents')) {
    const offset = param('offset') ?? 0
    const length = param('length') ?? f.size - Math.min(offset, f.size)
    const list = JSON.parse(o.answer.text) as unknown
    if (!Array.isArray(list)) throw violation(`${where}: extents not a list: ${compact(o.answer.text, 200)}`)
    let at = offset
    for (const e of list as Array<{ offset?: unknown, length?: unknown, hole?: unknown, zero?: unknown }>) {
      if (typeof e?.offset !== 'number' || typeof e.length !== 'number' || typeof e.hole !== 'boolean' || typeof e.zero !== 'boolean') throw violation(`${where}: an extent not {offset, length, hole, zero}: ${compact(JSON.stringify(e), 200)}`)
      if (e.offset !== at || e.length <= 0) throw violation(`${where}: the extents do not tile [${offset}, ${offset + length}): ${compact(o.answer.text, 300)}`)
      if (e.zero) {
        const nz = model.subarray(e.offset, e.offset + e.length).findIndex((b) => b !== 0)
        if (nz >= 0) throw violation(`${where}: the extent [${e.offset}, ${e.offset + e.length}) is said to read as zeros, byte ${e.offset + nz} holds ${model[e.offset + nz]}`)
      }
      at += e.length
    }
    if (at !== offset + length) throw violation(`${where}: the extents end at ${at}, not at ${offset + length}`)
  }
}

type Stored = { used_size: number, block_size: number, locations: Record<string, { blocks: number[][], out_of_sync: number[][], fine?: unknown, changed?: unknown }> } & Record<string, unknown>

/** Blocks of [start, end) ranges, as a set (the fixtures have few). */
const blockSet = (ranges: number[][]): Set<number> => new Set(ranges.flatMap(([a, b]) => Array.from({ length: Math.min(b! - a!, 1 << 16) }, (_, i) => a! + i)))

/**
 * What an accepted data PUT of `n` bytes at `offset` may change in the
 * image's stored document: used_size grows to cover it; a location whose
 * replica failed the write gains out-of-sync blocks among the written ones
 * (and a fine record); nothing else. Undefined when the change is allowed.
 */
function writeChangeFault (was: Stored, now: Stored, offset: number, n: number): string | undefined {
  const want = n > 0 ? Math.max(was.used_size, offset + n) : was.used_size
  if (now.used_size !== want) return `used_size ${was.used_size} became ${now.used_size}, not ${want}`
  for (const k of Object.keys({ ...was, ...now })) {
    if (k === 'used_size' || k === 'locations') continue
    if (JSON.stringify(was[k]) !== JSON.stringify(now[k])) return `its ${k} changed`
  }
  if (JSON.stringify(Object.keys(was.locations).sort()) !== JSON.stringify(Object.keys(now.locations).sort())) return 'its locations changed'
  const first = Math.floor(offset / was.block_size)
  const last = Math.floor((offset + Math.max(n, 1) - 1) / was.block_size)
  for (const [loc, w] of Object.entries(was.locations)) {
    const x = now.locations[loc]!
    if (JSON.stringify(w.blocks) !== JSON.stringify(x.blocks)) return `the blocks placed on ${loc} changed`
    const before = blockSet(w.out_of_sync)
    const after = blockSet(x.out_of_sync)
    for (const b of before) if (!after.has(b)) return `block ${b} of ${loc} came back in sync`
    for (const b of after) if (!before.has(b) && (b < first || b > last)) return `block ${b} of ${loc}, not written, went out of sync`
    if ((JSON.stringify(w.fine) !== JSON.stringify(x.fine) || JSON.stringify(w.changed) !== JSON.stringify(x.changed)) && after.size === 0) return `the fine record of ${loc}, which is in sync, changed`
  }
  return undefined
}

/** Nothing stored for a refusal; for a success only what the route may change; then back to the fixtures. */
async function checkStore (ctx: Ctx, t: Reached, input: ControlInput, o: Outcome, where: string): Promise<void> {
  const cheap = await cheapState(ctx)
  if (cheap === ctx.cheap) return
  const now = await snapshotOf(ctx)
  if (flat(now) === ctx.baseline) { ctx.cheap = cheap; return }
  const changed = [...new Set([...now.keys(), ...ctx.images!.keys()])].filter((k) => now.get(k) !== ctx.images!.get(k))
  const names = changed.map((k) => k === '\0dirs' ? 'the block directories' : `image '${k}'`)
  if (o.refused !== undefined) {
    await makeFixtures(ctx, now)
    throw violation(`${where}: refused with ${o.refused}, yet ${names.join(', ')} changed`)
  }
  if (t.route?.raw === true) {
    // An accepted data PUT: only what a write may change, of that image only.
    const f = fixtureOf(ctx, t)
    const offset = byteNumber(t.query.get('offset') ?? undefined)!
    const n = input.body.kind === 'bytes' ? input.body.bytes.size : (bodyOf(input.body, ctx.config)?.length ?? 0)
    const fault = f === undefined || changed.some((k) => k !== f.name)
      ? `${names.join(', ')} changed`
      : writeChangeFault(JSON.parse(ctx.images!.get(f.name)!) as Stored, JSON.parse(now.get(f.name)!) as Stored, offset, n)
    if (fault !== undefined) {
      await makeFixtures(ctx, now)
      throw violation(`${where}: an accepted write of ${n} bytes at ${offset} changed more than a write may: ${fault}`)
    }
  }
  // An accepted change: back to the fixtures for the next case.
  await makeFixtures(ctx, now)
}
