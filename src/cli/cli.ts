/**
 * `ukai` subcommands. Image and node commands talk to the local node's
 * control API; when no node is running they act on the metadata store and
 * block files directly (the same ImageService), so an operator can prepare
 * images before the first start.
 */
import { readFile } from 'node:fs/promises'
import { parseArgs, type ParseArgsConfig } from 'node:util'
import { loadConfig, type Config } from '../config/config.js'
import { ControlClient, RawJson, controlTlsOf, callStream, isNotRunning } from '../control/client.js'
import { loadControlToken, tokenFromFile } from '../control/token.js'
import { UkaiError, invalidArgument, toUkaiError } from '../errors.js'
import { BlockStore } from '../blockstore/block-store.js'
import { ImageService, describe, parseInfoFormat, summarise, type ImageSummary } from '../node/images.js'
import { openStore } from '../node/node.js'
import type { NodeStatus } from '../node/directory.js'
import { formatSize, parseSize } from '../util/size.js'
import type { SyncProgress } from '../volume/volume.js'
import { runServer } from './server.js'
import { exportImage, importImage } from './transfer.js'
import { formatStorage } from './storage.js'
import type { NodeStorageStatus } from '../node/directory.js'
import { jsonError, show } from '../util/show.js'
import { CA_CERT, createCa, describeCert, issueCert } from '../tls/certs.js'
import { canonicalLocation } from '../metadata/names.js'
import { join } from 'node:path'

const USAGE = `usage: ukai [--config PATH] COMMAND ...

  server [--mount DIR] [--nbd SOCKET|HOST:PORT]...   run this node
  image create NAME -s SIZE [-b BLOCK_SIZE] [-l LOCATION]... [-h HYPERVISOR]...
  image import-metadata FILE|-                       add an image from its metadata JSON
  image import FILE NAME [-b BLOCK_SIZE] [-l LOCATION]... [-h HYPERVISOR]... [--resume] [--json]
                                                     a new image with a raw disk file's data (holes kept)
  image export NAME FILE [--force] [--json]          the image's data into a raw, sparse file
  image list [--json]
  image info NAME [--json | --format seed|ukai]
  image destroy NAME
  image add-location NAME LOCATION [-s START] [-e END]      place blocks START..END there too (out of sync until synced)
  image remove-location NAME LOCATION [-s START] [-e END]   refused if a block would lose its last in-sync copy
  image add-hypervisor NAME HYPERVISOR
  image remove-hypervisor NAME HYPERVISOR
  sync IMAGE [-s START] [-e END]                      copy out-of-sync replicas of blocks START..END
  nodes list [--json]                                registered nodes: alive (lease), reachable, RTT, free space
  nodes best                                         the node with the most free space
  nodes errors [--json]                              locations in the error state
  nodes storage [--json]                             per node: space each image's block files take, orphans
  control-token                                      print the control API's bearer token
  cert ca DIR                                        create the cluster's CA (ca-cert.pem, ca-key.pem)
  cert node ID --ca DIR --out DIR [--host HOST]...   a node's key and certificate (the node's tls_dir)
  cert client NAME --ca DIR --out DIR                a hypervisor's key and certificate (QEMU tls-creds-x509 dir)
  version

Every command takes --config PATH (default: $UKAI_CONFIG, else /etc/ukai/config).
Sizes take suffixes: K, M, G, T (powers of 1024), also KiB, MB, ...`

export class Exit extends Error {
  constructor (readonly code: number, message: string) { super(message) }
}

type Options = NonNullable<ParseArgsConfig['options']>

function parse (args: string[], options: Options): { values: Record<string, unknown>, positionals: string[] } {
  try {
    const r = parseArgs({ args, options: { ...options, config: { type: 'string' }, help: { type: 'boolean' } }, allowPositionals: true, strict: true })
    return { values: r.values as Record<string, unknown>, positionals: r.positionals }
  } catch (err) {
    // One line: parseArgs explains an ambiguous value over three.
    const first = (err as Error).message.split('\n')[0]!.replace(/\.$/, '')
    const hint = /ambiguous/.test(first) ? ": a value starting with '-' is given as --OPTION=VALUE" : ''
    throw invalidArgument(`${first}${hint} (see 'ukai --help')`)
  }
}

function expect (positionals: string[], names: string[], command: string): string[] {
  if (positionals.length !== names.length) {
    throw invalidArgument(`'ukai ${command}' takes ${names.length === 0 ? 'no arguments' : names.join(' ')}, got ${positionals.length === 0 ? 'none' : positionals.map((p) => show(p)).join(' ')}`)
  }
  return positionals
}

/** The cluster's control token: from control_token_file, or from the metadata store. */
async function controlToken (config: Config): Promise<string> {
  if (config.control_token_file !== undefined) return await tokenFromFile(config.control_token_file)
  const store = await openStore(config)
  try {
    return await loadControlToken(config, store)
  } finally {
    await store.close()
  }
}

/** A client of this config's node, with the cluster's token. */
async function controlClient (config: Config): Promise<ControlClient> {
  return new ControlClient(config.control_address, config.control_port, 0, await controlToken(config), controlTlsOf(config, config.id))
}

/** Runs `fn` against the running node's API, or offline against the local stores. */
async function withImages<T> (config: Config, online: (c: ControlClient) => Promise<T>, offline: (s: ImageService) => Promise<T>): Promise<T> {
  const client = await controlClient(config)
  try {
    return await online(client)
  } catch (err) {
    if (!isNotRunning(err)) throw err
  }
  const store = await openStore(config)
  try {
    const warn = (m: string): void => { process.stderr.write(`ukai: warning: ${m}\n`) }
    return await offline(new ImageService(config, store, new BlockStore(config.image_root, config.blockname_format), warn))
  } finally {
    await store.close()
  }
}

const print = (s: string): void => { process.stdout.write(s + '\n') }
const printJson = (v: unknown): void => print(JSON.stringify(v, null, 2))

function table (rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)))
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n')
}

async function imageCommand (args: string[], configPath: string | undefined): Promise<void> {
  const [sub, ...rest] = args
  switch (sub) {
    case 'create': {
      const { values, positionals } = parse(rest, {
        size: { type: 'string', short: 's' },
        'block-size': { type: 'string', short: 'b' },
        location: { type: 'string', short: 'l', multiple: true },
        hypervisor: { type: 'string', short: 'h', multiple: true }
      })
      const [name] = expect(positionals, ['NAME'], 'image create')
      if (values.size === undefined) throw invalidArgument("'ukai image create' needs -s|--size SIZE")
      const config = loadConfig(configPath)
      const req = {
        name,
        size: parseSize(values.size as string, 'size'),
        ...(values['block-size'] !== undefined ? { block_size: parseSize(values['block-size'] as string, 'block size') } : {}),
        ...(values.location !== undefined ? { locations: values.location as string[] } : {}),
        ...(values.hypervisor !== undefined ? { hypervisors: values.hypervisor as string[] } : {})
      }
      const s = await withImages(config,
        async (c) => await c.call<ImageSummary>('POST', '/v1/images', req),
        async (svc) => summarise(await svc.create(req)))
      print(`created image '${s.name}': ${formatSize(s.size)} in ${s.blocks} blocks of ${formatSize(s.block_size)} on ${s.locations.join(', ')}`)
      return
    }
    case 'import-metadata': {
      const { positionals } = parse(rest, {})
      const [file] = expect(positionals, ['FILE'], 'image import-metadata')
      const text = file === '-' ? await readStdin() : await readFile(file!, 'utf8').catch((err) => { throw invalidArgument(`cannot read ${file!}: ${(err as Error).message}`) })
      let doc: unknown
      try { doc = JSON.parse(text) } catch (err) {
        throw new UkaiError('UKAI_ERR_INVALID_METADATA', `${file!} is not valid JSON (${jsonError(err)})`)
      }
      const config = loadConfig(configPath)
      const s = await withImages(config,
        // The text as it is: a document nested too deeply to serialise again is the node's to refuse.
        async (c) => await c.call<ImageSummary>('POST', '/v1/images/import', new RawJson(text)),
        async (svc) => summarise(await svc.importMetadata(doc)))
      print(`imported image '${s.name}': ${formatSize(s.size)} in ${s.blocks} blocks on ${s.locations.join(', ')}`)
      return
    }
    case 'import': {
      const { values, positionals } = parse(rest, {
        'block-size': { type: 'string', short: 'b' },
        location: { type: 'string', short: 'l', multiple: true },
        hypervisor: { type: 'string', short: 'h', multiple: true },
        resume: { type: 'boolean' },
        json: { type: 'boolean' }
      })
      const [file, name] = expect(positionals, ['FILE', 'NAME'], 'image import')
      const blockSize = values['block-size'] === undefined ? undefined : parseSize(values['block-size'] as string, 'block size')
      const config = loadConfig(configPath)
      await inNode(config, 'import', async (c) => await importImage(c, {
        file: file!, name: name!, blockSize, locations: values.location as string[] | undefined, hypervisors: values.hypervisor as string[] | undefined,
        resume: values.resume === true, json: values.json === true
      }))
      return
    }
    case 'export': {
      const { values, positionals } = parse(rest, { force: { type: 'boolean' }, json: { type: 'boolean' } })
      const [name, file] = expect(positionals, ['NAME', 'FILE'], 'image export')
      const config = loadConfig(configPath)
      await inNode(config, 'export', async (c) => await exportImage(c, { name: name!, file: file!, force: values.force === true, json: values.json === true }))
      return
    }
    case 'list': {
      const { values, positionals } = parse(rest, { json: { type: 'boolean' } })
      expect(positionals, [], 'image list')
      const config = loadConfig(configPath)
      const list = await withImages(config,
        async (c) => await c.call<ImageSummary[]>('GET', '/v1/images'),
        async (svc) => await svc.list())
      if (values.json === true) return printJson(list)
      if (list.length === 0) return print('no images')
      print(table([['NAME', 'SIZE', 'USED', 'BLOCK', 'BLOCKS', 'OUT OF SYNC', 'LOCATIONS'],
        ...list.map((s) => [s.name, formatSize(s.size), formatSize(s.used_size), formatSize(s.block_size), String(s.blocks), String(s.out_of_sync), s.locations.join(',')])]))
      return
    }
    case 'info': {
      const { values, positionals } = parse(rest, { json: { type: 'boolean' }, format: { type: 'string' } })
      const [name] = expect(positionals, ['NAME'], 'image info')
      if (values.json === true && values.format !== undefined) throw invalidArgument('give either --json or --format, not both')
      const format = values.format === undefined ? undefined : parseInfoFormat(values.format)
      const config = loadConfig(configPath)
      const doc = await withImages(config,
        async (c) => await c.call<Record<string, unknown>>('GET', `/v1/images/${encodeURIComponent(name!)}${format !== undefined ? `?format=${format}` : ''}`),
        async (svc) => {
          const meta = await svc.info(name!)
          return (format !== undefined ? describe(meta, format) : { ...summarise(meta), ...describe(meta, 'stored') as object }) as Record<string, unknown>
        })
      if (values.json === true || format !== undefined) return printJson(doc)
      const s = doc as unknown as ImageSummary & { hypervisors: string[] }
      const stored = doc as {
        locations?: Record<string, { blocks: Array<[number, number]>, out_of_sync: Array<[number, number]> }>
        open?: Array<{ node: string, readers: number, writers: number }>
        writer?: { node: string, generation: number, purpose: string, since: string } | null
        dirty_blocks?: number
      }
      print(`image:        ${s.name}`)
      print(`size:         ${formatSize(s.size)} (${s.size} bytes)`)
      print(`used size:    ${formatSize(s.used_size)} (${s.used_size} bytes)`)
      print(`block size:   ${formatSize(s.block_size)} (${s.blocks} blocks)`)
      print(`hypervisors:  ${s.hypervisors.length === 0 ? '-' : s.hypervisors.join(', ')}`)
      print('locations:')
      const ranges = (rs: Array<[number, number]>): string => rs.length === 0 ? '-' : rs.map(([a, b]) => b - a === 1 ? `${a}` : `${a}-${b - 1}`).join(',')
      for (const [loc, st] of Object.entries(stored.locations ?? {})) {
        print(`  ${loc}  blocks ${ranges(st.blocks)}  out of sync ${ranges(st.out_of_sync)}`)
      }
      const opens = (stored.open ?? []).map((o) => `${o.node} (${[o.writers > 0 ? 'writing' : '', o.readers > 0 ? `${o.readers} reader(s)` : ''].filter((x) => x !== '').join(', ')})`)
      print(`open on:      ${opens.length === 0 ? '-' : opens.join(', ')}`)
      const w = stored.writer
      print(`writer:       ${w === undefined || w === null ? '-' : `${w.node}, generation ${w.generation}${w.purpose === 'sync' ? ' (resync)' : ''}, since ${w.since}`}`)
      if ((stored.dirty_blocks ?? 0) > 0) print(`dirty blocks: ${stored.dirty_blocks!} (in the dirty-block log)`)
      return
    }
    case 'destroy': {
      const { positionals } = parse(rest, {})
      const [name] = expect(positionals, ['NAME'], 'image destroy')
      const config = loadConfig(configPath)
      await withImages(config,
        async (c) => await c.call('DELETE', `/v1/images/${encodeURIComponent(name!)}`),
        async (svc) => await svc.destroy(name!))
      print(`destroyed image '${name!}'`)
      return
    }
    case 'add-location':
    case 'remove-location': {
      const { values, positionals } = parse(rest, { start: { type: 'string', short: 's' }, end: { type: 'string', short: 'e' } })
      const [name, location] = expect(positionals, ['NAME', 'LOCATION'], `image ${sub}`)
      const range = blockRangeArgs(values)
      const config = loadConfig(configPath)
      const add = sub === 'add-location'
      const s = await withImages(config,
        async (c) => await c.call<ImageSummary>(add ? 'POST' : 'DELETE', `/v1/images/${encodeURIComponent(name!)}/locations`, { location, ...range }),
        async (svc) => summarise(add
          ? await svc.addLocation(name!, location, range.start, range.end === undefined ? undefined : range.end + 1)
          : await svc.removeLocation(name!, location, range.start, range.end === undefined ? undefined : range.end + 1)))
      print(`image '${s.name}': ${add ? 'added' : 'removed'} ${location!}; locations now ${s.locations.join(', ')}${add ? ` (run 'ukai sync ${s.name}' to fill the new replicas)` : ''}`)
      return
    }
    case 'add-hypervisor':
    case 'remove-hypervisor': {
      const { positionals } = parse(rest, {})
      const [name, hv] = expect(positionals, ['NAME', 'HYPERVISOR'], `image ${sub}`)
      const config = loadConfig(configPath)
      const add = sub === 'add-hypervisor'
      const s = await withImages(config,
        async (c) => await c.call<ImageSummary>(add ? 'POST' : 'DELETE', `/v1/images/${encodeURIComponent(name!)}/hypervisors`, { hypervisor: hv }),
        async (svc) => summarise(await svc.setHypervisor(name!, hv, add)))
      print(`image '${s.name}': hypervisors now ${s.hypervisors.join(', ') || '-'}`)
      return
    }
    default:
      throw invalidArgument(`unknown image command ${show(sub ?? '')} (see 'ukai --help')`)
  }
}

async function nodesCommand (args: string[], configPath: string | undefined): Promise<void> {
  const [sub, ...rest] = args
  if (sub === 'list' || sub === 'best') {
    const { values, positionals } = parse(rest, { json: { type: 'boolean' } })
    expect(positionals, [], `nodes ${sub}`)
    const config = loadConfig(configPath)
    const nodes = await withImages(config,
      async (c) => await c.call<NodeStatus[]>('GET', '/v1/nodes'),
      async (svc) => await svc.directory.status())
    if (sub === 'best') {
      // The original's "best node for a new image": the most free space.
      const best = nodes.filter((n) => n.reachable && n.capacity !== undefined)
        .sort((a, b) => b.capacity!.available - a.capacity!.available)[0]
      if (best === undefined) throw new UkaiError('UKAI_ERR_UNAVAILABLE', 'no registered node answers')
      if (values.json === true) return printJson(best)
      return print(best.id)
    }
    if (values.json === true) return printJson(nodes)
    if (nodes.length === 0) return print('no node has registered')
    print(table([['NODE', 'CONTROL', 'ALIVE', 'REACHABLE', 'RTT', 'AVAILABLE', 'TOTAL', 'OPEN IMAGES'],
      ...nodes.map((n) => [n.id, n.control, n.alive ? 'yes' : 'no', n.reachable ? 'yes' : 'no', n.rtt_ms !== undefined ? `${n.rtt_ms.toFixed(2)} ms` : '-',
        n.capacity !== undefined ? formatSize(n.capacity.available) : '-', n.capacity !== undefined ? formatSize(n.capacity.total) : '-',
        (n.open_images ?? []).join(',') || '-'])]))
    return
  }
  if (sub === 'storage') {
    const { values, positionals } = parse(rest, { json: { type: 'boolean' } })
    expect(positionals, [], 'nodes storage')
    const config = loadConfig(configPath)
    const nodes = await withImages(config,
      async (c) => await c.call<NodeStorageStatus[]>('GET', '/v1/nodes/storage'),
      async (svc) => await svc.directory.storage())
    return values.json === true ? printJson(nodes) : print(formatStorage(nodes))
  }
  if (sub !== 'errors') throw invalidArgument(`unknown nodes command ${show(sub ?? '')} (see 'ukai --help')`)
  const { values, positionals } = parse(rest, { json: { type: 'boolean' } })
  expect(positionals, [], 'nodes errors')
  const config = loadConfig(configPath)
  const client = await controlClient(config)
  let list: Array<{ location: string, reason: string, retry_after: string }>
  try {
    list = await client.call('GET', '/v1/nodes/errors')
  } catch (err) {
    if (isNotRunning(err)) throw new UkaiError('UKAI_ERR_CONNECT', `no node is running at ${config.control_address}:${config.control_port}; the error state lives in a running node`)
    throw err
  }
  if (values.json === true) return printJson(list)
  if (list.length === 0) return print('no node is in the error state')
  print(table([['LOCATION', 'RETRY AFTER', 'REASON'], ...list.map((e) => [e.location, e.retry_after, e.reason])]))
}

/** Runs `fn` against the running node's API; the command needs one (it moves data through a node). */
async function inNode (config: Config, what: string, fn: (c: ControlClient) => Promise<void>): Promise<void> {
  try {
    await fn(await controlClient(config))
  } catch (err) {
    if (isNotRunning(err)) throw new UkaiError('UKAI_ERR_CONNECT', `no node is running at ${config.control_address}:${config.control_port}; ${what} runs through a node`)
    throw err
  }
}

/** -s START / -e END block numbers (END inclusive), as the API takes them. */
function blockRangeArgs (values: Record<string, unknown>): { start?: number, end?: number } {
  const block = (v: unknown, what: string): number | undefined => {
    if (v === undefined) return undefined
    if (!/^\d+$/.test(v as string)) throw invalidArgument(`${what} must be a block number, got ${show(v)}`)
    return Number(v)
  }
  const start = block(values.start, '-s START')
  const end = block(values.end, '-e END')
  if (start !== undefined && end !== undefined && end < start) throw invalidArgument(`-e END (${end}) is before -s START (${start})`)
  return { ...(start !== undefined ? { start } : {}), ...(end !== undefined ? { end } : {}) }
}

async function syncCommand (args: string[], configPath: string | undefined): Promise<void> {
  const { values, positionals } = parse(args, { start: { type: 'string', short: 's' }, end: { type: 'string', short: 'e' } })
  const [name] = expect(positionals, ['IMAGE'], 'sync')
  const body = blockRangeArgs(values)
  const config = loadConfig(configPath)
  const client = await controlClient(config)
  const bar = new ProgressBar(`sync ${name!}`)
  let result: SyncProgress
  try {
    result = await callStream<SyncProgress>(client, 'POST', `/v1/images/${encodeURIComponent(name!)}/sync`, body, (p) => bar.update(p as SyncProgress))
  } catch (err) {
    bar.end()
    if (isNotRunning(err)) throw new UkaiError('UKAI_ERR_CONNECT', `no node is running at ${config.control_address}:${config.control_port}; sync runs in a node`)
    throw err
  }
  bar.update(result)
  bar.end()
  for (const f of result.failed) process.stderr.write(`ukai: block ${f.block}${f.location !== undefined ? ` on ${f.location}` : ''}: ${f.reason}\n`)
  print(`synced ${result.done - new Set(result.failed.map((f) => f.block)).size} of ${result.blocks} block(s), ${formatSize(result.bytes)} copied`)
  if (result.failed.length > 0) throw new UkaiError('UKAI_ERR_UNAVAILABLE', `${result.failed.length} replica(s) could not be synced; run the sync again once their nodes are back`)
}

/** A progress bar on a terminal; a line every 10% otherwise. */
class ProgressBar {
  private readonly label: string
  private readonly tty = process.stderr.isTTY === true
  private lastTenth = -1
  private drawn = false

  constructor (label: string) { this.label = label }

  update (p: SyncProgress): void {
    const frac = p.blocks === 0 ? 1 : p.done / p.blocks
    const text = `${this.label} ${p.done}/${p.blocks} blocks, ${formatSize(p.bytes)}`
    if (this.tty) {
      const width = 30
      const full = Math.round(frac * width)
      process.stderr.write(`\r[${'#'.repeat(full)}${'.'.repeat(width - full)}] ${text}`)
      this.drawn = true
      return
    }
    const tenth = Math.floor(frac * 10)
    if (tenth !== this.lastTenth) {
      this.lastTenth = tenth
      process.stderr.write(`${text} (${tenth * 10}%)\n`)
    }
  }

  end (): void {
    if (this.drawn) process.stderr.write('\n')
    this.drawn = false
  }
}

async function readStdin (): Promise<string> {
  const chunks: Buffer[] = []
  for await (const c of process.stdin) chunks.push(c as Buffer)
  return Buffer.concat(chunks).toString('utf8')
}

/** Pulls --config PATH (or --config=PATH) out of the arguments, wherever it stands. */
/** `ukai cert`: the cluster's CA and its certificates (tls/certs.ts); needs no config and no node. */
async function certCommand (args: string[]): Promise<void> {
  const [sub, ...rest] = args
  switch (sub) {
    case 'ca': {
      const [dir] = expect(parse(rest, {}).positionals, ['DIR'], 'cert ca')
      await createCa(dir!)
      print(await describeCert(join(dir!, CA_CERT)))
      return
    }
    case 'node':
    case 'client': {
      const { values, positionals } = parse(rest, { ca: { type: 'string' }, out: { type: 'string' }, host: { type: 'string', multiple: true } })
      const [name] = expect(positionals, [sub === 'node' ? 'ID' : 'NAME'], `cert ${sub}`)
      if (typeof values.ca !== 'string' || typeof values.out !== 'string') throw invalidArgument(`'ukai cert ${sub}' needs --ca DIR and --out DIR`)
      if (sub === 'node') {
        try { canonicalLocation(name!, 22222) } catch { throw invalidArgument(`node id ${show(name)} is not a node address "host:port"`) }
      }
      const made = await issueCert(values.ca, sub, name!, values.out, { hosts: values.host as string[] | undefined })
      print(await describeCert(made.cert))
      return
    }
    default:
      throw invalidArgument(`'ukai cert' takes ca, node or client, got ${sub === undefined ? 'nothing' : show(sub)}`)
  }
}

function takeConfig (args: string[]): { configPath: string | undefined, rest: string[] } {
  const rest: string[] = []
  let configPath: string | undefined
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!
    if (a === '--config') {
      if (i + 1 >= args.length) throw invalidArgument('--config needs a PATH')
      configPath = args[++i]
    } else if (a.startsWith('--config=')) {
      configPath = a.slice('--config='.length)
    } else rest.push(a)
  }
  return { configPath, rest }
}

export async function main (argv: string[]): Promise<number> {
  try {
    const { configPath, rest } = takeConfig(argv)
    const [command, ...args] = rest
    if (command === undefined || command === 'help' || command === '--help') {
      print(USAGE)
      return command === undefined ? 2 : 0
    }
    if (args.includes('--help')) { print(USAGE); return 0 }
    switch (command) {
      case 'server': {
        const { values, positionals } = parse(args, {
          mount: { type: 'string' },
          nbd: { type: 'string', multiple: true },
          debug: { type: 'boolean' }
        })
        expect(positionals, [], 'server')
        return await runServer(loadConfig(configPath), {
          mount: values.mount as string | undefined,
          nbd: (values.nbd as string[] | undefined) ?? [],
          debug: values.debug === true
        })
      }
      case 'image': await imageCommand(args, configPath); return 0
      case 'nodes': await nodesCommand(args, configPath); return 0
      case 'sync': await syncCommand(args, configPath); return 0
      case 'control-token': {
        expect(parse(args, {}).positionals, [], 'control-token')
        print(await controlToken(loadConfig(configPath)))
        return 0
      }
      case 'cert': await certCommand(args); return 0
      case 'version': print('ukai 0.1.0'); return 0
      default:
        throw invalidArgument(`unknown command ${show(command)} (see 'ukai --help')`)
    }
  } catch (err) {
    const e = toUkaiError(err)
    process.stderr.write(`ukai: ${e.message}\n`)
    return e.mapping.exit
  }
}
