/**
 * metadata-import: the metadata import formats (src/metadata/codec.ts
 * importAny, decodeStored, importPerBlock), in-process, with documents in
 * every format (the seed's `{"synced": true}`, the later `sync_status`,
 * the stored document) valid, mutated (wrong types, huge/odd numbers,
 * deep nesting, prototype-pollution and duplicate keys) or random, parsed
 * from JSON text as the CLI and the control API parse them. What imports
 * must round-trip through the stored and per-block exports.
 *
 * metadata-cli: the same documents, deeply nested, through the real CLI
 * (`ukai image import-metadata FILE`, no node running): exit code 2 and a
 * one-line message, nothing stored.
 */
import { spawn } from 'node:child_process'
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import fc from 'fast-check'
import { UkaiError } from '../../../src/errors.js'
import { decodeStored, encodeStored, exportPerBlock, importAny, importPerBlock } from '../../../src/metadata/codec.js'
import { validateImage, type ImageMeta } from '../../../src/metadata/image.js'
import { freePort } from '../../helpers/node-process.js'
import { crash, hang, violation, type Target } from '../harness.js'
import { arr, compact, lit, mutatedJson, num, obj, render, showJson, str, type J } from '../gen.js'

const PORT = 22222

const locationJ = fc.constantFrom('10.0.0.1', '10.0.0.2:22223', 'node-a', 'h.example', '[::1]:5', '1', 'constructor', 'a'.repeat(63)).map(str)
const nameJ = fc.oneof({ arbitrary: fc.constantFrom('vm01', 'image01', 'a', 'A.b_c-9', 'x'.repeat(128)).map(str), weight: 5 }, { arbitrary: fc.constantFrom('', '../etc', '.x', 'x'.repeat(129), '__proto__').map(str), weight: 1 })

/** A valid document in one of the three formats (before mutation). */
const validDoc: fc.Arbitrary<J> = fc.record({
  format: fc.constantFrom('seed', 'ukai', 'stored'),
  name: nameJ,
  blockSize: fc.constantFrom(1, 512, 1000, 4096, 65536),
  blocks: fc.integer({ min: 1, max: 8 }),
  short: fc.nat(),
  locs: fc.uniqueArray(locationJ, { minLength: 1, maxLength: 3, selector: (l) => (l as { v: string }).v }),
  states: fc.array(fc.array(fc.integer({ min: 0, max: 2 }), { minLength: 3, maxLength: 3 }), { minLength: 8, maxLength: 8 }),
  used: fc.nat(),
  hvForm: fc.constantFrom('list', 'object', 'none'),
  rev: fc.constantFrom('revision', 'generation', 'none')
}).map((d) => {
  const size = d.blocks * d.blockSize - (d.short % d.blockSize)
  const used = d.used % (size + 1)
  const hv = d.hvForm === 'list' ? arr([str('10.0.0.9')]) : d.hvForm === 'object' ? obj({ '10.0.0.9': obj({}) }) : undefined
  if (d.format === 'stored') {
    // Every location holds every block; out of sync where its state says 2, never on the first location.
    const locations: J = { t: 'obj', entries: d.locs.map((l, i) => [(l as { v: string }).v, obj({
      blocks: arr([arr([num(0), num(d.blocks)])]),
      out_of_sync: arr(i === 0 ? [] : d.states.slice(0, d.blocks).flatMap((s, b) => s[i] === 2 ? [arr([num(b), num(b + 1)])] : []))
    })] as [string, J]) }
    return obj({
      format: num(1), name: d.name, size: num(size), block_size: num(d.blockSize), used_size: num(used),
      ...(hv !== undefined ? { hypervisors: hv } : {}), ...(d.rev !== 'none' ? { [d.rev]: num(3) } : {}), locations
    })
  }
  const blocks = arr(Array.from({ length: d.blocks }, (_, b): J => ({
    t: 'obj',
    entries: d.locs.map((l, i) => [(l as { v: string }).v, d.format === 'seed'
      ? obj({ synced: lit(String(i === 0 || d.states[b]![i] !== 2)) })
      : obj({ sync_status: num(i === 0 ? 0 : d.states[b]![i]!) })] as [string, J])
  })))
  if (d.format === 'seed') return obj({ name: d.name, size: num(size), block_size: num(d.blockSize), blocks })
  return obj({ name: d.name, size: num(size), block_size: num(d.blockSize), used_size: num(used), ...(hv !== undefined ? { hypervisors: hv } : {}), blocks })
})

/** A canonical form of what was imported, for comparing round trips (location order aside). */
function canonical (m: ImageMeta, what: 'all' | 'placement'): string {
  const s = encodeStored(m)
  const locations = Object.keys(s.locations).sort().map((k) => [k, s.locations[k]])
  if (what === 'placement') return JSON.stringify({ name: s.name, size: s.size, block_size: s.block_size, locations })
  return JSON.stringify({ name: s.name, size: s.size, block_size: s.block_size, used_size: s.used_size, hypervisors: s.hypervisors, locations })
}

const decoders: Array<[string, (doc: unknown, port: number) => ImageMeta]> = [['importAny', importAny], ['decodeStored', decodeStored], ['importPerBlock', importPerBlock]]

function roundTrip (m: ImageMeta, via: string): void {
  try {
    validateImage(m, PORT)
  } catch (err) {
    throw violation(`${via} returned metadata that validateImage refuses: ${(err as Error).message}`)
  }
  const want = canonical(m, 'all')
  const stored = JSON.parse(JSON.stringify(encodeStored(m))) as unknown
  let back: ImageMeta
  try { back = decodeStored(stored, PORT) } catch (err) { throw violation(`${via}: its stored export does not import back: ${(err as Error).message}`) }
  if (canonical(back, 'all') !== want) throw violation(`${via}: the stored export imports back different (${canonical(back, 'all')} vs ${want})`)
  if (m.blockCount > 2048) return
  for (const format of ['ukai', 'seed'] as const) {
    const doc = JSON.parse(JSON.stringify(exportPerBlock(m, format))) as unknown
    try { back = importPerBlock(doc, PORT) } catch (err) { throw violation(`${via}: its '${format}' export does not import back: ${(err as Error).message}`) }
    const w = format === 'ukai' ? want : canonical(m, 'placement')
    const got = canonical(back, format === 'ukai' ? 'all' : 'placement')
    if (got !== w) throw violation(`${via}: the '${format}' export imports back different\nimported:      ${w}\nexported back: ${got}`)
  }
}

/** What the cases reached (reported with the results). */
export const stats = { notJson: 0, accepted: 0, refused: 0 }

export const metadataImport: Target<J, undefined> = {
  name: 'metadata-import',
  summary: 'metadata import in-process: importAny, decodeStored, importPerBlock (codec.ts) on documents of the three formats, valid, mutated (wrong types, huge/odd numbers, deep nesting, __proto__/constructor and duplicate keys) or random, parsed from JSON text',
  contract: 'crash: a decoder throws anything but a UkaiError UKAI_ERR_INVALID_METADATA (a RangeError such as "Maximum call stack size exceeded" above all); hang: a decoder runs past the per-case limit (2 s; a blocked event loop is caught by the watchdog); violation: an accepted document whose metadata validateImage refuses, or whose stored / per-block export does not import back the same',
  defaultCases: 180_000,
  shardSize: 90_000,
  msPerCase: 0.95,
  cpuShare: 1,
  caseTimeoutMs: 2000,
  sliceCases: 800,
  arbitrary: mutatedJson(validDoc),
  setup: async () => undefined,
  run: (doc) => {
    let v: unknown
    try { v = JSON.parse(render(doc)) } catch { stats.notJson++; return }
    for (const [fn, decode] of decoders) {
      let m: ImageMeta
      try {
        m = decode(v, PORT)
      } catch (err) {
        if (err instanceof UkaiError && err.code === 'UKAI_ERR_INVALID_METADATA') { stats.refused++; continue }
        throw crash(`${fn} threw ${err instanceof UkaiError ? `UkaiError ${err.code}` : (err as Error)?.name ?? typeof err}: ${(err as Error)?.message}`, err)
      }
      stats.accepted++
      roundTrip(m, fn)
    }
  },
  teardown: async () => {},
  stats: () => stats,
  show: showJson
}

// ---------------------------------------------------------------------------
// The CLI

/** The CLI of the same build as this file (dist/ or the fuzzer's own build). */
const CLI = fileURLToPath(new URL('../../../src/cli/main.js', import.meta.url))

type Where = 'doc' | 'name' | 'size' | 'block_size' | 'used_size' | 'blocks' | 'block' | 'state' | 'synced' | 'sync_status' | 'format' | 'locations' | 'ranges' | 'hypervisors'

export interface CliInput { where: Where, depth: number, kind: 'arr' | 'obj' }

/** A document with a value nested `depth` levels deep at `where`. */
export function deepDoc (i: CliInput): J {
  const deep = (leaf: J = num(1)): J => ({ t: 'deep', depth: i.depth, kind: i.kind, key: 'a', leaf })
  const seed = (over: Record<string, J>): J => obj({ name: str('deep1'), size: num(2), block_size: num(1), blocks: arr([obj({ '10.0.0.1': obj({ synced: lit('true') }) }), obj({ '10.0.0.1': obj({ synced: lit('true') }) })]), ...over })
  const stored = (over: Record<string, J>): J => obj({ format: num(1), name: str('deep1'), size: num(2), block_size: num(1), locations: obj({ '10.0.0.1': obj({ blocks: arr([arr([num(0), num(2)])]) }) }), ...over })
  switch (i.where) {
    case 'doc': return deep()
    case 'name': return seed({ name: deep(str('x')) })
    case 'size': return seed({ size: deep() })
    case 'block_size': return seed({ block_size: deep() })
    case 'used_size': return seed({ used_size: deep() })
    case 'blocks': return seed({ blocks: deep() })
    case 'block': return seed({ blocks: arr([deep(), obj({})]) })
    case 'state': return seed({ blocks: arr([obj({ '10.0.0.1': deep() }), obj({})]) })
    case 'synced': return seed({ blocks: arr([obj({ '10.0.0.1': obj({ synced: deep() }) }), obj({})]) })
    case 'sync_status': return seed({ blocks: arr([obj({ '10.0.0.1': obj({ sync_status: deep() }) }), obj({})]) })
    case 'format': return stored({ format: deep() })
    case 'locations': return stored({ locations: deep() })
    case 'ranges': return stored({ locations: obj({ '10.0.0.1': obj({ blocks: arr([deep()]) }) }) })
    case 'hypervisors': return seed({ hypervisors: arr([deep(str('h'))]) })
  }
}

interface CliCtx { dir: string, config: string, n: number }

async function runCli (args: string[], signal: AbortSignal): Promise<{ code: number | null, signal: string | null, stdout: string, stderr: string }> {
  return await new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    const out: Buffer[] = []
    const err: Buffer[] = []
    child.stdout.on('data', (c: Buffer) => out.push(c))
    child.stderr.on('data', (c: Buffer) => err.push(c))
    const kill = (): void => { if (child.exitCode === null && child.pid !== undefined) child.kill('SIGKILL') }
    signal.addEventListener('abort', kill)
    child.on('error', reject)
    child.on('close', (code, sig) => {
      signal.removeEventListener('abort', kill)
      resolvePromise({ code, signal: sig, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() })
    })
  })
}

export const metadataCli: Target<CliInput, CliCtx> = {
  name: 'metadata-cli',
  summary: '`ukai image import-metadata FILE` (the real CLI, a child process, no node running) with documents nested 2,000 to 1,000,000 levels deep at every field of the seed and stored formats',
  contract: 'crash: an exit code other than 2 (bad metadata), a killed process, or a message that is not one line ("ukai: ...") on stderr; hang: no exit within 30 s (the child is then killed); violation: an image stored for the refused document',
  defaultCases: 24,
  shardSize: 24,
  msPerCase: 900,
  cpuShare: 0.7,
  caseTimeoutMs: 30_000,
  sliceCases: 2,
  arbitrary: fc.record({
    where: fc.constantFrom<Where>('doc', 'name', 'size', 'block_size', 'used_size', 'blocks', 'block', 'state', 'synced', 'sync_status', 'format', 'locations', 'ranges', 'hypervisors'),
    depth: fc.oneof(fc.integer({ min: 2000, max: 6000 }), fc.constantFrom(10_000, 100_000, 1_000_000)),
    kind: fc.constantFrom('arr' as const, 'obj' as const)
  }),
  setup: async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ukai-fuzz-cli-'))
    const config = join(dir, 'config.json')
    await writeFile(config, JSON.stringify({ image_root: 'images', metadata_root: 'metadata', control_port: await freePort(), proxy_port: 22222 }))
    return { dir, config, n: 0 }
  },
  run: async (input, ctx, { signal }) => {
    const file = join(ctx.dir, `doc-${ctx.n++}.json`)
    await writeFile(file, render(deepDoc(input)))
    try {
      const r = await runCli(['--config', ctx.config, 'image', 'import-metadata', file], signal)
      if (signal.aborted) throw hang('the CLI did not exit within 30 s')
      const lines = r.stderr.split('\n').filter((l) => l !== '')
      const said = compact(r.stderr.trim(), 300)
      if (r.code !== 2) throw crash(`exit ${r.code ?? `by signal ${r.signal!}`} (documented: 2) for a document nested ${input.depth} deep at '${input.where}': ${said}`)
      if (lines.length !== 1 || !lines[0]!.startsWith('ukai: ')) throw crash(`exit 2, but the message is ${lines.length} lines, not one "ukai: ..." line: ${said}`)
      const shards = await readdir(join(ctx.dir, 'metadata', 'shards')).catch(() => [] as string[])
      if (shards.some((s) => s.startsWith('images'))) throw violation(`the refused document left ${shards.filter((s) => s.startsWith('images')).join(', ')} in the store`)
    } finally {
      await rm(file, { force: true })
    }
  },
  teardown: async (ctx) => { await rm(ctx.dir, { recursive: true, force: true }) },
  show: (i) => `a document nested ${i.depth} levels deep (${i.kind === 'arr' ? 'arrays' : 'objects'}) at '${i.where}': ${showJson(deepDoc(i))}`
}
