/**
 * `ukai` subcommands, parsed by commander: `--help` on every command
 * prints that command's usage and exits 0; an unknown command or option,
 * or a missing argument, is one line on stderr and exit 2.
 *
 * Image and node commands talk to the local node's control API; when no
 * node is running they act on the metadata store and block files directly
 * (the same ImageService), so an operator can prepare images before the
 * first start. Nothing here loads the FUSE binding: `ukai server --mount`
 * loads it when it mounts (frontends/fuse/load.ts), so every other
 * command works on a host without libfuse.
 */
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Command, CommanderError, Option } from 'commander'
import { loadConfig, type Config } from '../config/config.js'
import { ControlClient, RawJson, controlTlsOf, callStream, isNotRunning } from '../control/client.js'
import { loadControlToken, tokenFromFile } from '../control/token.js'
import { UkaiError, invalidArgument, toUkaiError } from '../errors.js'
import { BlockStore } from '../blockstore/block-store.js'
import { ImageService, describe, parseInfoFormat, summarise, type ImageSummary } from '../node/images.js'
import { openStore } from '../node/node.js'
import type { NodeStatus } from '../node/directory.js'
import type { ImageStats } from '../node/stats.js'
import { formatSize, parseSize } from '../util/size.js'
import type { SyncProgress } from '../volume/volume.js'
import { jsonError, show } from '../util/show.js'
import { CA_CERT, createCa, describeCert, issueCert } from '../tls/certs.js'
import { canonicalLocation } from '../metadata/names.js'
import { progressReporter } from './progress.js'
import { exportImage, importImage } from './transfer.js'
import { formatStorage } from './storage.js'
import type { NodeStorageStatus } from '../node/directory.js'
import type { MoveResult } from '../node/move.js'

export const VERSION = '0.1.0'

/** Thrown by commander (through exitOverride) for `command`: help shown, or bad usage. */
class UsageError extends Error {
  constructor (readonly error: CommanderError, readonly command: Command) { super(error.message) }
}

/** Commander's error for `command` as one line: "unknown option '--x' (see 'ukai image create --help')". */
function usageMessage (u: UsageError): string {
  const path = commandPath(u.command)
  let m = u.error.message.replace(/^error: /, '')
  // Its suggestion comes on a line of its own: kept on the one line.
  m = m.replace(/\n\(Did you mean (.*)\?\)/, " (did you mean '$1'?)")
  if (u.error.code === 'commander.unknownCommand' && u.command.parent !== null) {
    m = m.replace(/^unknown command '/, `unknown command '${path.replace(/^ukai /, '')} `)
  }
  if (u.error.code === 'commander.excessArguments') m = m.replace(`for '${u.command.name()}'`, `for '${path}'`)
  return `${m.split('\n')[0]!.replace(/\.$/, '')} (see '${path} --help')`
}

function commandPath (c: Command): string {
  const names: string[] = []
  for (let x: Command | null = c; x !== null; x = x.parent) names.unshift(x.name())
  return names.join(' ')
}

/** A repeatable option's values: `-l A -l B` is ['A', 'B']. */
const collect = (v: string, prev: string[] | undefined): string[] => [...(prev ?? []), v]

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

/** Runs `fn` against the running node's API; `what` lives only in a running node. */
async function onNode<T> (config: Config, what: string, fn: (c: ControlClient) => Promise<T>): Promise<T> {
  const client = await controlClient(config)
  try {
    return await fn(client)
  } catch (err) {
    if (isNotRunning(err)) throw new UkaiError('UKAI_ERR_CONNECT', `no node is running at ${config.control_address}:${config.control_port}; ${what}`)
    throw err
  }
}

const print = (s: string): void => { process.stdout.write(s + '\n') }
const printJson = (v: unknown): void => print(JSON.stringify(v, null, 2))

function table (rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)))
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n')
}

/** -s START / -e END block numbers (END inclusive), as the API takes them. */
function blockRangeArgs (values: { start?: string, end?: string }): { start?: number, end?: number } {
  const block = (v: string | undefined, what: string): number | undefined => {
    if (v === undefined) return undefined
    if (!/^\d+$/.test(v)) throw invalidArgument(`${what} must be a block number, got ${show(v)}`)
    return Number(v)
  }
  const start = block(values.start, '-s START')
  const end = block(values.end, '-e END')
  if (start !== undefined && end !== undefined && end < start) throw invalidArgument(`-e END (${end}) is before -s START (${start})`)
  return { ...(start !== undefined ? { start } : {}), ...(end !== undefined ? { end } : {}) }
}

const rangeOptions = (c: Command, what: string): Command => c
  .option('-s, --start <START>', `first block ${what} (default: 0)`)
  .option('-e, --end <END>', `last block ${what}, inclusive (default: the last block)`)

async function readStdin (): Promise<string> {
  const chunks: Buffer[] = []
  for await (const c of process.stdin) chunks.push(c as Buffer)
  return Buffer.concat(chunks).toString('utf8')
}

/** The command tree. `config()` loads the config the --config pre-pass found; `exit(code)` sets the exit code. */
function program (config: () => Config, exit: (code: number) => void): Command {
  const ukai = new Command('ukai')
    .description('Distributed storage of virtual machine disk images: runs a node, and manages images and nodes through its control API.')
    .usage('[--config PATH] COMMAND ...')
    .helpOption('--help', 'show this help')
    .helpCommand('help [command]', 'show the help of a command')
    .version(`ukai ${VERSION}`, '--version', 'print the version')
    .option('--config <PATH>', 'config file (default: $UKAI_CONFIG, else /etc/ukai/config); any command takes it, anywhere')
    .configureHelp({ showGlobalOptions: true })
    .configureOutput({ outputError: () => {} })
    .showSuggestionAfterError(true)
    .addHelpText('after', `
Sizes take suffixes K, M, G, T (powers of 1024), also KiB, MB, ...
Listings take --json. Exit codes: 0 success, 2 bad input, 3 not found,
4 already exists, 5 busy, 6 not permitted, 7 no space, 8 not supported,
9 I/O error, 10 no node reachable, 11 node id in use, 12 metadata store
unreachable, 13 fenced, 14 control token refused.`)

  ukai.command('server')
    .description('run this node: the control API, the peer port, and optionally a FUSE mount and NBD exports')
    .option('--mount <DIR>', 'show every image as a file in DIR (FUSE; needs libfuse2)')
    .option('--nbd <SOCKET|HOST:PORT>', 'export every image over NBD on a unix socket or TCP (repeatable)', collect)
    .option('--debug', "FUSE's debug output")
    .action(async (o: { mount?: string, nbd?: string[], debug?: boolean }) => {
      const { runServer } = await import('./server.js')
      exit(await runServer(config(), { mount: o.mount, nbd: o.nbd ?? [], debug: o.debug === true }))
    })

  imageCommands(ukai.command('image').description('create, list, inspect, place and destroy images'), config)

  rangeOptions(ukai.command('sync')
    .description('copy every out-of-sync replica of blocks START..END from an in-sync one (on the node that writes the image)')
    .argument('<IMAGE>', 'image name'), 'to sync')
    .option('--json', 'progress and result as JSON lines on stdout')
    .action(async (name: string, o: { start?: string, end?: string, json?: boolean }) => {
      await syncCommand(config(), name, blockRangeArgs(o), o.json === true)
    })

  ukai.command('stats')
    .description("an image's I/O on this node: reads and writes per location, local and remote, mean latency, out-of-sync blocks, sync progress")
    .argument('<IMAGE>', 'image name')
    .option('--json', 'as JSON')
    .action(async (name: string, o: { json?: boolean }) => {
      const c = config()
      const stats = await onNode(c, 'I/O statistics live in a running node', async (client) =>
        await client.call<ImageStats>('GET', `/v1/images/${encodeURIComponent(name)}/stats`))
      if (o.json === true) return printJson(stats)
      printStats(stats)
    })

  const nodes = ukai.command('nodes').description('the nodes of the cluster')
  nodes.command('list')
    .description('registered nodes: alive (lease), reachable, RTT, free space, open images')
    .option('--json', 'as JSON')
    .action(async (o: { json?: boolean }) => {
      const list = await nodeStatus(config())
      if (o.json === true) return printJson(list)
      if (list.length === 0) return print('no node has registered')
      print(table([['NODE', 'CONTROL', 'ALIVE', 'REACHABLE', 'RTT', 'AVAILABLE', 'TOTAL', 'OPEN IMAGES'],
        ...list.map((n) => [n.id, n.control, n.alive ? 'yes' : 'no', n.reachable ? 'yes' : 'no', n.rtt_ms !== undefined ? `${n.rtt_ms.toFixed(2)} ms` : '-',
          n.capacity !== undefined ? formatSize(n.capacity.available) : '-', n.capacity !== undefined ? formatSize(n.capacity.total) : '-',
          (n.open_images ?? []).join(',') || '-'])]))
    })
  nodes.command('best')
    .description('the node with the most free space (for a new image)')
    .option('--json', "the node's status as JSON")
    .action(async (o: { json?: boolean }) => {
      // The original's "best node for a new image": the most free space.
      const best = (await nodeStatus(config())).filter((n) => n.reachable && n.capacity !== undefined)
        .sort((a, b) => b.capacity!.available - a.capacity!.available)[0]
      if (best === undefined) throw new UkaiError('UKAI_ERR_UNAVAILABLE', 'no registered node answers')
      if (o.json === true) return printJson(best)
      print(best.id)
    })
  nodes.command('errors')
    .description('locations in the error state (skipped by I/O until RETRY AFTER)')
    .option('--json', 'as JSON')
    .action(async (o: { json?: boolean }) => {
      const c = config()
      const list = await onNode(c, 'the error state lives in a running node', async (client) =>
        await client.call<Array<{ location: string, reason: string, since: string, retry_after: string }>>('GET', '/v1/nodes/errors'))
      if (o.json === true) return printJson(list)
      if (list.length === 0) return print('no node is in the error state')
      print(table([['LOCATION', 'RETRY AFTER', 'REASON'], ...list.map((e) => [e.location, e.retry_after, e.reason])]))
    })

  nodes.command('storage')
    .description("per node: the space each image's block files take there, and what is orphaned (no image places it there)")
    .option('--json', 'as JSON')
    .action(async (o: { json?: boolean }) => {
      const list = await withImages(config(),
        async (c) => await c.call<NodeStorageStatus[]>('GET', '/v1/nodes/storage'),
        async (svc) => await svc.directory.storage())
      if (o.json === true) return printJson(list)
      print(formatStorage(list))
    })

  ukai.command('control-token')
    .description("print the control API's bearer token (for curl, Prometheus, ...)")
    .action(async () => { print(await controlToken(config())) })

  certCommands(ukai.command('cert').description("the cluster's CA and its certificates (needs openssl; no config, no node)"))

  ukai.command('version').description('print the version').action(() => { print(`ukai ${VERSION}`) })
  return ukai
}

function imageCommands (image: Command, config: () => Config): void {
  image.command('create')
    .description('create an image, all blocks on every LOCATION (default: this node)')
    .argument('<NAME>', 'image name: 1-128 letters, digits, ".", "_", "-"')
    .requiredOption('-s, --size <SIZE>', 'image size')
    .option('-b, --block-size <SIZE>', 'block size, a power of two from 4K to 1G (default: config default_block_size)')
    .option('-l, --location <LOCATION>', 'a node holding every block, host or host:port (repeatable)', collect)
    .option('-h, --hypervisor <HYPERVISOR>', 'a node that may take the image over, e.g. a live migration target (repeatable)', collect)
    .action(async (name: string, o: { size: string, blockSize?: string, location?: string[], hypervisor?: string[] }) => {
      const req = {
        name,
        size: parseSize(o.size, 'size'),
        ...(o.blockSize !== undefined ? { block_size: parseSize(o.blockSize, 'block size') } : {}),
        ...(o.location !== undefined ? { locations: o.location } : {}),
        ...(o.hypervisor !== undefined ? { hypervisors: o.hypervisor } : {})
      }
      const s = await withImages(config(),
        async (c) => await c.call<ImageSummary>('POST', '/v1/images', req),
        async (svc) => summarise(await svc.create(req)))
      print(`created image '${s.name}': ${formatSize(s.size)} in ${s.blocks} blocks of ${formatSize(s.block_size)} on ${s.locations.join(', ')}`)
    })

  image.command('import')
    .description("a new image with a raw disk file's data (holes and zero pages are not sent); through the running node")
    .argument('<FILE>', 'raw disk file (qcow2: qemu-img convert -O raw first, or straight into the NBD export)')
    .argument('<NAME>', 'image name')
    .option('-b, --block-size <BLOCK_SIZE>', 'block size (default: the config\'s)')
    .option('-l, --location <LOCATION>', 'a node to place every block on (repeatable; default: this node)', collect)
    .option('-h, --hypervisor <HYPERVISOR>', 'a hypervisor allowed to run it (repeatable)', collect)
    .option('--resume', 'into the image an interrupted import left (same size), sending the data again')
    .option('--json', 'progress and result as JSON lines')
    .action(async (file: string, name: string, o: { blockSize?: string, location?: string[], hypervisor?: string[], resume?: boolean, json?: boolean }) => {
      const blockSize = o.blockSize === undefined ? undefined : parseSize(o.blockSize, 'block size')
      await onNode(config(), 'import runs through a node', async (c) => await importImage(c, {
        file, name, blockSize, locations: o.location, hypervisors: o.hypervisor, resume: o.resume === true, json: o.json === true
      }))
    })

  image.command('export')
    .description("the image's data into a raw, sparse file (stop the VM first: this is no snapshot); through the running node")
    .argument('<NAME>', 'image name')
    .argument('<FILE>', 'raw file to write')
    .option('--force', 'replace FILE if it exists')
    .option('--json', 'progress and result as JSON lines')
    .action(async (name: string, file: string, o: { force?: boolean, json?: boolean }) => {
      await onNode(config(), 'export runs through a node', async (c) => await exportImage(c, { name, file, force: o.force === true, json: o.json === true }))
    })

  rangeOptions(image.command('move')
    .description('relocate blocks START..END to another node while the image is in use: add the location, copy, drop the old copy (its node deletes the files); run again to resume; --cancel stops a move under way')
    .argument('<NAME>', 'image name')
    .option('--to <NODE>', 'the node the blocks move to (required unless --cancel)')
    .option('--from <NODE>', 'the node they move away from (default: the only other one holding them)')
    .option('--rate <SIZE>', 'most bytes per second the copy takes (e.g. 100M; at least 1M)'), 'to move')
    .option('--cancel', 'stop the move of the image under way, wherever it runs (consistent; run the move again to resume it)')
    .option('--json', 'progress and result as JSON lines')
    .action(async (name: string, o: { to?: string, from?: string, start?: string, end?: string, rate?: string, cancel?: boolean, json?: boolean }) => {
      if (o.cancel === true) {
        if (o.to !== undefined || o.from !== undefined || o.rate !== undefined || o.start !== undefined || o.end !== undefined) {
          throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', '--cancel takes no other option than --json: it stops whatever move of the image runs')
        }
        const r = await onNode(config(), 'a move is cancelled by a node', async (c) =>
          await c.call<{ node: string, result?: MoveResult }>('DELETE', `/v1/images/${encodeURIComponent(name)}/move`))
        if (o.json === true) print(JSON.stringify(r))
        else print(r.result !== undefined ? `cancelled the move of '${name}' on ${r.node} after ${r.result.done} of ${r.result.blocks} block(s); run the move again to resume it` : `cancelled the move of '${name}' recorded for ${r.node} (not running); it will not resume`)
        return
      }
      if (o.to === undefined) throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', "required option '--to <NODE>' not specified")
      const body = {
        to: o.to,
        ...(o.from !== undefined ? { from: o.from } : {}),
        ...blockRangeArgs(o),
        ...(o.rate !== undefined ? { rate: parseSize(o.rate, 'rate') } : {})
      }
      await moveCommand(config(), name, body, o.json === true)
    })

  image.command('import-metadata')
    .description("add an image from its metadata JSON: the original UKAI's (either spelling) or UKAI's own stored format")
    .argument('<FILE>', 'the JSON file, or - for standard input')
    .action(async (file: string) => {
      const text = file === '-' ? await readStdin() : await readFile(file, 'utf8').catch((err) => { throw invalidArgument(`cannot read ${file}: ${(err as Error).message}`) })
      let doc: unknown
      try { doc = JSON.parse(text) } catch (err) {
        throw new UkaiError('UKAI_ERR_INVALID_METADATA', `${file} is not valid JSON (${jsonError(err)})`)
      }
      const s = await withImages(config(),
        // The text as it is: a document nested too deeply to serialise again is the node's to refuse.
        async (c) => await c.call<ImageSummary>('POST', '/v1/images/import', new RawJson(text)),
        async (svc) => summarise(await svc.importMetadata(doc)))
      print(`imported image '${s.name}': ${formatSize(s.size)} in ${s.blocks} blocks on ${s.locations.join(', ')}`)
    })

  image.command('list')
    .description('every image: size, used size, block size, out-of-sync blocks, locations')
    .option('--json', 'as JSON')
    .action(async (o: { json?: boolean }) => {
      const list = await withImages(config(),
        async (c) => await c.call<ImageSummary[]>('GET', '/v1/images'),
        async (svc) => await svc.list())
      if (o.json === true) return printJson(list)
      if (list.length === 0) return print('no images')
      print(table([['NAME', 'SIZE', 'USED', 'BLOCK', 'BLOCKS', 'OUT OF SYNC', 'LOCATIONS'],
        ...list.map((s) => [s.name, formatSize(s.size), formatSize(s.used_size), formatSize(s.block_size), String(s.blocks), String(s.out_of_sync), s.locations.join(',')])]))
    })

  image.command('info')
    .description('one image: its placement per location, who has it open, its writer')
    .argument('<NAME>', 'image name')
    .addOption(new Option('--json', 'as JSON (any image, blocks in ranges)').conflicts('format'))
    .addOption(new Option('--format <FORMAT>', 'the metadata JSON, one entry per block: seed (the original\'s) or ukai (its later spelling); stored: UKAI\'s own')
      .choices(['seed', 'ukai', 'stored']))
    .action(async (name: string, o: { json?: boolean, format?: string }) => {
      const format = o.format === undefined ? undefined : parseInfoFormat(o.format)
      const doc = await withImages(config(),
        async (c) => await c.call<Record<string, unknown>>('GET', `/v1/images/${encodeURIComponent(name)}${format !== undefined ? `?format=${format}` : ''}`),
        async (svc) => {
          const meta = await svc.info(name)
          return (format !== undefined ? describe(meta, format) : { ...summarise(meta), ...describe(meta, 'stored') as object }) as Record<string, unknown>
        })
      if (o.json === true || format !== undefined) return printJson(doc)
      printInfo(doc)
    })

  image.command('destroy')
    .description('destroy an image and its block files on every node (refused while it is open on any node)')
    .argument('<NAME>', 'image name')
    .action(async (name: string) => {
      await withImages(config(),
        async (c) => await c.call('DELETE', `/v1/images/${encodeURIComponent(name)}`),
        async (svc) => await svc.destroy(name))
      print(`destroyed image '${name}'`)
    })

  for (const add of [true, false]) {
    rangeOptions(image.command(add ? 'add-location' : 'remove-location')
      .description(add
        ? "place blocks START..END on LOCATION too (out of sync until 'ukai sync')"
        : 'remove blocks START..END from LOCATION; refused if a block would lose its last in-sync copy')
      .argument('<NAME>', 'image name')
      .argument('<LOCATION>', 'node address, host or host:port'), add ? 'to place' : 'to remove')
      .action(async (name: string, location: string, o: { start?: string, end?: string }) => {
        const range = blockRangeArgs(o)
        const end = range.end === undefined ? undefined : range.end + 1
        const s = await withImages(config(),
          async (c) => await c.call<ImageSummary>(add ? 'POST' : 'DELETE', `/v1/images/${encodeURIComponent(name)}/locations`, { location, ...range }),
          async (svc) => summarise(add ? await svc.addLocation(name, location, range.start, end) : await svc.removeLocation(name, location, range.start, end)))
        print(`image '${s.name}': ${add ? 'added' : 'removed'} ${location}; locations now ${s.locations.join(', ')}${add ? ` (run 'ukai sync ${s.name}' to fill the new replicas)` : ''}`)
      })
    image.command(add ? 'add-hypervisor' : 'remove-hypervisor')
      .description(add ? 'let the node HYPERVISOR take the image over (a live migration target)' : 'no longer let HYPERVISOR take the image over')
      .argument('<NAME>', 'image name')
      .argument('<HYPERVISOR>', 'node address')
      .action(async (name: string, hv: string) => {
        const s = await withImages(config(),
          async (c) => await c.call<ImageSummary>(add ? 'POST' : 'DELETE', `/v1/images/${encodeURIComponent(name)}/hypervisors`, { hypervisor: hv }),
          async (svc) => summarise(await svc.setHypervisor(name, hv, add)))
        print(`image '${s.name}': hypervisors now ${s.hypervisors.join(', ') || '-'}`)
      })
  }
}

function printInfo (doc: Record<string, unknown>): void {
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
}

/** Mean latency of `n` requests that took `seconds` in all. */
const mean = (seconds: number, n: number): string => n === 0 ? '-' : `${(seconds / n * 1000).toFixed(3)} ms`

function printStats (s: ImageStats): void {
  print(`image ${s.image} on node ${s.node}, since the node started:`)
  print(`  hypervisor I/O: ${s.reads} read(s), ${formatSize(s.bytesRead)}; ${s.writes} write(s), ${formatSize(s.bytesWritten)}`)
  print(`  replica reads:  ${s.reads_local} local (${formatSize(s.read_bytes_local)}), ${s.reads_remote} remote (${formatSize(s.read_bytes_remote)})`)
  print(`  served to peers: ${s.peer_reads} read(s) (${formatSize(s.peer_read_bytes)}), ${s.peer_writes} write(s) (${formatSize(s.peer_written_bytes)}), ${s.peer_status_requests} block status request(s)`)
  print(`  out of sync:    ${s.out_of_sync_blocks} block replica(s)`)
  if (s.sync !== null) {
    const y = s.sync
    print(`  sync:           ${y.running ? 'running' : `ended ${y.ended ?? ''}`}, ${y.done}/${y.blocks} block(s), ${formatSize(y.bytes)} copied${y.failed > 0 ? `, ${y.failed} failed` : ''} (started ${y.started})`)
  }
  const rows = Object.entries(s.locations).map(([loc, l]) => [loc, l.local ? 'yes' : 'no', String(l.reads), formatSize(l.read_bytes), mean(l.read_seconds, l.reads),
    String(l.writes), formatSize(l.written_bytes), mean(l.write_seconds, l.writes), String(l.blocks), String(l.out_of_sync_blocks)])
  if (rows.length === 0) return
  print('')
  print(table([['LOCATION', 'LOCAL', 'READS', 'READ', 'MEAN READ', 'WRITES', 'WRITTEN', 'MEAN WRITE', 'BLOCKS', 'OUT OF SYNC'], ...rows]))
}

async function nodeStatus (config: Config): Promise<NodeStatus[]> {
  return await withImages(config,
    async (c) => await c.call<NodeStatus[]>('GET', '/v1/nodes'),
    async (svc) => await svc.directory.status())
}

/** What a sync and a move answer: blocks done of all, bytes copied, and the copies that failed. */
interface CopyResult { blocks: number, done: number, bytes: number, failed: Array<{ block: number, location?: string, reason: string }> }

/**
 * Runs a sync or a move on the node (`POST /v1/images/NAME/sync|move`),
 * its progress streamed to a bar, plain lines or --json lines; each
 * failed copy is said on stderr (unless --json). Returns the result.
 */
async function copyCommand<R extends CopyResult> (config: Config, name: string, what: 'sync' | 'move', body: Record<string, unknown>, json: boolean): Promise<R> {
  const progress = progressReporter({ label: `${what} ${name}`, json })
  let started = false
  const onProgress = (p: CopyResult): void => {
    if (!started) { started = true; progress.start(p.blocks) }
    progress.update({ done: p.done, bytes: p.bytes })
  }
  let result: R
  try {
    result = await onNode(config, `${what} runs in a node`, async (client) =>
      await callStream<R>(client, 'POST', `/v1/images/${encodeURIComponent(name)}/${what}`, body, (p) => onProgress(p as CopyResult)))
  } catch (err) {
    progress.fail(err)
    throw err
  }
  onProgress(result)
  progress.end(result)
  if (!json) for (const f of result.failed) process.stderr.write(`ukai: block ${f.block}${f.location !== undefined ? ` on ${f.location}` : ''}: ${f.reason}\n`)
  return result
}

async function syncCommand (config: Config, name: string, body: { start?: number, end?: number }, json: boolean): Promise<void> {
  const result = await copyCommand<SyncProgress>(config, name, 'sync', body, json)
  if (!json) print(`synced ${result.done - new Set(result.failed.map((f) => f.block)).size} of ${result.blocks} block(s), ${formatSize(result.bytes)} copied`)
  if (result.failed.length > 0) throw new UkaiError('UKAI_ERR_UNAVAILABLE', `${result.failed.length} replica(s) could not be synced; run the sync again once their nodes are back`)
}

async function moveCommand (config: Config, name: string, body: Record<string, unknown>, json: boolean): Promise<void> {
  const result = await copyCommand<MoveResult>(config, name, 'move', body, json)
  if (result.cancelled === true) {
    if (!json) print(`the move was cancelled after ${result.done} of ${result.blocks} block(s) (${formatSize(result.bytes)} copied); run it again to resume`)
    throw new UkaiError('UKAI_ERR_BUSY', `the move of image '${name}' was cancelled before it was through`, { image: name })
  }
  if (!json) print(`moved ${result.done} of ${result.blocks} block(s) to ${result.to}${result.from !== undefined ? ` from ${result.from}` : ''}, ${formatSize(result.bytes)} copied`)
  if (result.failed.length > 0) throw new UkaiError('UKAI_ERR_UNAVAILABLE', `${result.failed.length} replica(s) could not be copied; nothing was removed from the old location for them: run the move again once their nodes are back`)
}

function certCommands (cert: Command): void {
  cert.command('ca')
    .description("create the cluster's CA in DIR (ca-cert.pem, ca-key.pem: keep the key safe)")
    .argument('<DIR>', 'directory')
    .action(async (dir: string) => {
      await createCa(dir)
      print(await describeCert(join(dir, CA_CERT)))
    })
  for (const kind of ['node', 'client'] as const) {
    const c = cert.command(kind)
      .description(kind === 'node' ? "a node's key and certificate, issued by the CA (the node's tls_dir)" : "a hypervisor's key and certificate (QEMU's tls-creds-x509 directory)")
      .argument(kind === 'node' ? '<ID>' : '<NAME>', kind === 'node' ? "the node's id, host:port" : 'the client name')
      .requiredOption('--ca <DIR>', 'the CA directory')
      .requiredOption('--out <DIR>', 'where the key and certificate go')
    if (kind === 'node') c.option('--host <HOST>', 'another name or address of the node for the certificate (repeatable)', collect)
    c.action(async (name: string, o: { ca: string, out: string, host?: string[] }) => {
      if (kind === 'node') {
        try { canonicalLocation(name, 22222) } catch { throw invalidArgument(`node id ${show(name)} is not a node address "host:port"`) }
      }
      const made = await issueCert(o.ca, kind, name, o.out, { hosts: o.host })
      print(await describeCert(made.cert))
    })
  }
}

/** Pulls --config PATH (or --config=PATH) out of the arguments, wherever it stands. */
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

function everyCommand (c: Command): Command[] {
  return [c, ...c.commands.flatMap((s) => everyCommand(s))]
}

export async function main (argv: string[]): Promise<number> {
  let code = 0
  try {
    const { configPath, rest } = takeConfig(argv)
    const ukai = program(() => loadConfig(configPath), (c) => { code = c })
    for (const c of everyCommand(ukai)) c.exitOverride((err) => { throw new UsageError(err, c) })
    await ukai.parseAsync(rest, { from: 'user' })
    return code
  } catch (err) {
    if (err instanceof UsageError) {
      // --help, --version: printed already.
      if (err.error.code === 'commander.helpDisplayed' || err.error.code === 'commander.version') return 0
      // `ukai help X` (0), or a command group without its command: its help went to stderr (2).
      if (err.error.code === 'commander.help') return err.error.exitCode === 0 ? 0 : 2
      process.stderr.write(`ukai: ${usageMessage(err)}\n`)
      return 2
    }
    const e = toUkaiError(err)
    process.stderr.write(`ukai: ${e.message}\n`)
    return e.mapping.exit
  }
}
