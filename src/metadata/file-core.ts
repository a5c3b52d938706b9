/**
 * The embedded metadata core: the MetadataCore contract on files under
 * metadata_root, for the nodes of one machine.
 *
 * - One file per shard (`shards/<shard>.json`: "images/vm01", "nodes/..."),
 *   holding every key of the shard with its revisions. A transaction
 *   touches one shard (`supports.crossShardTxn` is false) and is one
 *   atomic replace of its file: temp file, fsync, rename, fsync of the
 *   directory. A crash leaves the old file or the new one.
 * - Revisions count per shard, kept in the file. A shard whose keys are
 *   all deleted stays as an empty file, so its revisions never go back.
 * - Exclusion between processes: a transaction holds its shard's lock, an
 *   abstract unix socket bound for the duration (`\0ukai-lock-...`). The
 *   kernel frees it when its holder dies, so a killed process never
 *   leaves a lock behind and a recycled pid can never look like its owner.
 * - Leases are abstract sockets too, held by the process that granted
 *   them: a lease is alive exactly as long as its process is. A key whose
 *   lease is dead reads as absent (and compares so).
 * - Watches: inotify on the shard directory; a changed shard file is read
 *   again and compared with what the watcher saw last.
 *
 * Abstract sockets belong to a network namespace: processes sharing one
 * metadata_root must share it too (one machine, one namespace).
 */
import { createHash, randomBytes } from 'node:crypto'
import { promises as fsp, watch as fsWatch, realpathSync, type FSWatcher } from 'node:fs'
import { connect, createServer, type Server } from 'node:net'
import { join } from 'node:path'
import { UkaiError } from '../errors.js'
import { KeyedQueue } from '../util/keyed-queue.js'
import { mkdirDurable, replaceFileDurable } from '../util/durable-fs.js'
import {
  compareMatches, shardOf, type Compare, type CoreSupports, type KeyValue, type Lease, type MetadataCore,
  type RangeResult, type TxnOp, type TxnResult, type WatchEvent, type WatchHandlers, type Watcher
} from './core.js'
import { jsonError } from '../util/show.js'

interface StoredKey { v: string, c: number, m: number, ver: number, l?: string }
interface ShardDoc { shard: string, revision: number, keys: Record<string, StoredKey> }

/** How long a transaction waits for another process's lock on its shard. */
const LOCK_TIMEOUT_MS = 10_000
const SHARD_FILE = /^[^.].*\.json$/
const TEMP_FILE = /^\.(.+)\.([0-9a-f]{16})\.(\d+)\.tmp$/
/** Longest shard file name before it is hashed instead. */
const MAX_FILE_NAME = 200

/** Listens on an abstract unix socket; false when another socket holds the name. */
async function bindAbstract (name: string): Promise<Server | undefined> {
  const server = createServer((s) => s.destroy())
  return await new Promise<Server | undefined>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => err.code === 'EADDRINUSE' ? resolve(undefined) : reject(err))
    server.listen({ path: `\0${name}` }, () => { server.unref(); resolve(server) })
  })
}

async function closeServer (server: Server): Promise<void> {
  await new Promise<void>((resolve) => server.close(() => resolve()))
}

/** True while some process listens on the abstract socket `name`. */
async function abstractAlive (name: string): Promise<boolean> {
  return await new Promise<boolean>((resolve) => {
    const s = connect({ path: `\0${name}` })
    const timer = setTimeout(() => { s.destroy(); resolve(true) }, 1000)
    s.once('connect', () => { clearTimeout(timer); s.destroy(); resolve(true) })
    // Only a refused connection proves that nobody listens.
    s.once('error', (err: NodeJS.ErrnoException) => { clearTimeout(timer); resolve(err.code !== 'ECONNREFUSED') })
  })
}

const leaseSocket = (id: string): string => `ukai-lease-${id}`
const instanceSocket = (id: string): string => `ukai-instance-${id}`

export class FileCore implements MetadataCore {
  readonly kind = 'file'
  readonly supports: CoreSupports = { crossShardTxn: false, timedLeases: false }
  readonly root: string
  readonly description: string
  private readonly dir: string
  /** Distinguishes this store's lock names from other stores' on the machine. */
  private readonly rootId: string
  readonly instanceId: string
  private readonly instance: Server
  private tempCounter = 0
  /** Transactions (file) or updates (store) of one key in this process run one at a time. */
  private readonly queues = new KeyedQueue()
  private readonly ownLeases = new Map<string, Server>()
  /** Leases of other processes found dead: they never come back. */
  private readonly deadLeases = new Set<string>()
  private readonly watchers = new Set<{ prefix: string, handlers: WatchHandlers }>()
  /** What watchers last saw of each shard: key -> modRevision. */
  private readonly seen = new Map<string, Map<string, number>>()
  /** Revision of the shard state in `seen`: an older file read late is ignored. */
  private readonly seenRevision = new Map<string, number>()
  private notifying: Promise<void> = Promise.resolve()
  private fsWatcher: FSWatcher | undefined
  private closed = false

  private constructor (root: string, dir: string, instanceId: string, instance: Server) {
    this.root = root
    this.dir = dir
    this.description = `file ${root}`
    this.rootId = createHash('sha256').update(realpathSync(root)).digest('hex').slice(0, 16)
    this.instanceId = instanceId
    this.instance = instance
  }

  static async open (root: string): Promise<FileCore> {
    const dir = join(root, 'shards')
    await mkdirDurable(dir)
    let id: string
    let instance: Server | undefined
    do {
      id = randomBytes(8).toString('hex')
      instance = await bindAbstract(instanceSocket(id))
    } while (instance === undefined)
    const core = new FileCore(root, dir, id, instance)
    await core.removeDeadTemps()
    return core
  }

  /**
   * Temp files of processes that died before their rename. A live
   * process's temp files are never touched: another process may be
   * between its write and its rename right now.
   */
  private async removeDeadTemps (): Promise<void> {
    for (const f of await fsp.readdir(this.dir)) {
      const m = TEMP_FILE.exec(f)
      if (m === null || m[2] === this.instanceId) continue
      if (!await abstractAlive(instanceSocket(m[2]!))) await fsp.rm(join(this.dir, f), { force: true })
    }
  }

  private fileName (shard: string): string {
    const enc = encodeURIComponent(shard)
    return enc.length <= MAX_FILE_NAME ? `${enc}.json` : `h-${createHash('sha256').update(shard).digest('hex')}.json`
  }

  private async readShard (shard: string): Promise<ShardDoc> {
    return await this.readShardFile(this.fileName(shard)) ?? { shard, revision: 0, keys: {} }
  }

  private async readShardFile (file: string): Promise<ShardDoc | undefined> {
    let text: string
    try {
      text = await fsp.readFile(join(this.dir, file), 'utf8')
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
      throw err
    }
    let doc: ShardDoc
    try {
      doc = JSON.parse(text) as ShardDoc
    } catch (err) {
      throw new UkaiError('UKAI_ERR_INVALID_METADATA', `metadata file ${join(this.dir, file)} is not valid JSON (${jsonError(err)})`)
    }
    if (typeof doc !== 'object' || doc === null || typeof doc.shard !== 'string' || !Number.isSafeInteger(doc.revision) ||
      typeof doc.keys !== 'object' || doc.keys === null) {
      throw new UkaiError('UKAI_ERR_INVALID_METADATA', `metadata file ${join(this.dir, file)} is not a metadata shard`)
    }
    return doc
  }

  private async writeShard (doc: ShardDoc): Promise<void> {
    const file = this.fileName(doc.shard)
    const tmp = join(this.dir, `.${file}.${this.instanceId}.${++this.tempCounter}.tmp`)
    await replaceFileDurable(join(this.dir, file), tmp, JSON.stringify(doc) + '\n')
  }

  private async isLeaseAlive (id: string): Promise<boolean> {
    if (this.ownLeases.has(id)) return true
    if (this.deadLeases.has(id)) return false
    const alive = await abstractAlive(leaseSocket(id))
    if (!alive) this.deadLeases.add(id)
    return alive
  }

  /** The shard's keys whose lease (if any) is alive. */
  private async liveKeys (doc: ShardDoc): Promise<KeyValue[]> {
    const out: KeyValue[] = []
    for (const [key, k] of Object.entries(doc.keys)) {
      if (k.l !== undefined && !await this.isLeaseAlive(k.l)) continue
      out.push({ key, value: k.v, createRevision: k.c, modRevision: k.m, version: k.ver, lease: k.l })
    }
    return out
  }

  /** Shards that may hold keys under `prefix`. */
  private async shardsUnder (prefix: string): Promise<ShardDoc[]> {
    // A prefix longer than its shard ("images/vm01/meta/") lies in that one shard.
    const shard = shardOf(prefix)
    if (shard.length < prefix.length) return [await this.readShard(shard)]
    const out: ShardDoc[] = []
    for (const f of await fsp.readdir(this.dir)) {
      if (!SHARD_FILE.test(f)) continue
      if (!f.startsWith('h-') && !decodeURIComponent(f.slice(0, -5)).startsWith(prefix)) continue
      const doc = await this.readShardFile(f)
      if (doc !== undefined && doc.shard.startsWith(prefix)) out.push(doc)
    }
    return out
  }

  async range (prefix: string): Promise<RangeResult> {
    const kvs: KeyValue[] = []
    let revision = 0
    for (const doc of await this.shardsUnder(prefix)) {
      revision = Math.max(revision, doc.revision)
      for (const kv of await this.liveKeys(doc)) if (kv.key.startsWith(prefix)) kvs.push(kv)
    }
    kvs.sort((a, b) => a.key < b.key ? -1 : a.key > b.key ? 1 : 0)
    return { kvs, revision }
  }

  async get (key: string): Promise<KeyValue | undefined> {
    const doc = await this.readShard(shardOf(key))
    return (await this.liveKeys(doc)).find((kv) => kv.key === key)
  }

  async txn (compares: Compare[], ops: TxnOp[]): Promise<TxnResult> {
    if (this.closed) throw new UkaiError('UKAI_ERR_SHUTDOWN', 'the metadata store is closed')
    const shards = new Set([...compares.map((c) => shardOf(c.key)), ...ops.map((o) => shardOf(o.key))])
    if (shards.size !== 1) {
      throw new UkaiError('UKAI_ERR_INTERNAL', `a transaction of the file metadata store must touch one shard, not ${[...shards].join(', ') || 'none'}`)
    }
    const shard = [...shards][0]!
    return await this.queues.run(shard, async () => await this.locked(shard, async () => {
      const doc = await this.readShard(shard)
      const live = await this.liveKeys(doc)
      const ok = compares.every((c) => compareMatches(c, live.filter((kv) => c.prefix === true ? kv.key.startsWith(c.key) : kv.key === c.key)))
      if (!ok || ops.length === 0) return { succeeded: ok, revision: doc.revision }
      const revision = doc.revision + 1
      // Keys of dead leases go for good with this write.
      const keys: Record<string, StoredKey> = {}
      for (const kv of live) keys[kv.key] = doc.keys[kv.key]!
      for (const op of ops) {
        if (op.type === 'put') {
          if (op.lease !== undefined && !this.ownLeases.has(op.lease)) {
            throw new UkaiError('UKAI_ERR_INTERNAL', `lease ${op.lease} is not held by this process`)
          }
          const old = keys[op.key]
          keys[op.key] = { v: op.value, c: old?.c ?? revision, m: revision, ver: (old?.ver ?? 0) + 1, ...(op.lease !== undefined ? { l: op.lease } : {}) }
        } else {
          for (const k of Object.keys(keys)) if (op.prefix === true ? k.startsWith(op.key) : k === op.key) delete keys[k]
        }
      }
      const next: ShardDoc = { shard, revision, keys }
      await this.writeShard(next)
      this.notify(next)
      return { succeeded: true, revision }
    }))
  }


  /** Runs `fn` holding the shard's lock against other processes. */
  private async locked<T> (shard: string, fn: () => Promise<T>): Promise<T> {
    const name = `ukai-lock-${this.rootId}-${createHash('sha256').update(shard).digest('hex').slice(0, 24)}`
    const deadline = Date.now() + LOCK_TIMEOUT_MS
    let lock: Server | undefined
    for (let wait = 1; (lock = await bindAbstract(name)) === undefined; wait = Math.min(wait * 2, 50)) {
      if (Date.now() > deadline) {
        throw new UkaiError('UKAI_ERR_BUSY', `metadata shard '${shard}' of ${this.root} stayed locked by another process for ${LOCK_TIMEOUT_MS / 1000} s`)
      }
      await new Promise((resolve) => setTimeout(resolve, wait))
    }
    try {
      return await fn()
    } finally {
      await closeServer(lock)
    }
  }

  async watch (prefix: string, handlers: WatchHandlers): Promise<Watcher> {
    const entry = { prefix, handlers }
    if (this.fsWatcher === undefined) {
      this.fsWatcher = fsWatch(this.dir, { persistent: false }, (_event, filename) => {
        const f = filename === null ? '' : String(filename)
        if (SHARD_FILE.test(f)) void this.reread(f)
      })
      this.fsWatcher.on('error', () => {})
    }
    // What the watcher starts from: the shards as they are now.
    for (const doc of await this.shardsUnder(prefix)) {
      if (!this.seen.has(doc.shard)) {
        this.seen.set(doc.shard, await this.revisions(doc))
        this.seenRevision.set(doc.shard, doc.revision)
      }
    }
    this.watchers.add(entry)
    return {
      close: async () => {
        this.watchers.delete(entry)
        if (this.watchers.size === 0) {
          this.fsWatcher?.close()
          this.fsWatcher = undefined
          this.seen.clear()
          this.seenRevision.clear()
        }
      }
    }
  }

  private async revisions (doc: ShardDoc): Promise<Map<string, number>> {
    return new Map((await this.liveKeys(doc)).map((kv) => [kv.key, kv.modRevision]))
  }

  private async reread (file: string): Promise<void> {
    try {
      const doc = await this.readShardFile(file)
      if (doc !== undefined) this.notify(doc)
    } catch {}
  }

  /**
   * Compares a shard with what watchers saw of it and reports the
   * difference. One comparison at a time, in the order of the calls, so a
   * slow one never reports an older state after a newer.
   */
  private notify (doc: ShardDoc): void {
    if (this.watchers.size === 0) return
    this.notifying = this.notifying.then(async () => await this.revisions(doc)).then((now) => {
      const seenRev = this.seenRevision.get(doc.shard) ?? -1
      if (doc.revision < seenRev) return
      this.seenRevision.set(doc.shard, doc.revision)
      const was = this.seen.get(doc.shard) ?? new Map<string, number>()
      const events: WatchEvent[] = []
      for (const [key, rev] of now) if (was.get(key) !== rev) events.push({ type: 'put', key, revision: rev })
      for (const key of was.keys()) if (!now.has(key)) events.push({ type: 'delete', key, revision: doc.revision })
      this.seen.set(doc.shard, now)
      if (events.length === 0) return
      for (const w of this.watchers) {
        const mine = events.filter((e) => e.key.startsWith(w.prefix))
        if (mine.length > 0) w.handlers.onEvents(mine)
      }
    }).catch(() => {})
  }

  async grantLease (ttlSeconds: number): Promise<Lease> {
    let id: string
    let server: Server | undefined
    do {
      id = randomBytes(8).toString('hex')
      server = await bindAbstract(leaseSocket(id))
    } while (server === undefined)
    this.ownLeases.set(id, server)
    const leaseId = id
    return {
      id: leaseId,
      ttlSeconds,
      keepAlive: async () => this.ownLeases.has(leaseId),
      revoke: async () => await this.revokeLease(leaseId)
    }
  }

  async leaseAlive (id: string): Promise<boolean> {
    return await this.isLeaseAlive(id)
  }

  async revokeLease (id: string): Promise<void> {
    const own = this.ownLeases.get(id)
    if (own !== undefined) {
      this.ownLeases.delete(id)
      this.deadLeases.add(id)
      await closeServer(own)
      return
    }
    // Another process's lease ends with that process.
    if (await this.isLeaseAlive(id)) {
      throw new UkaiError('UKAI_ERR_BUSY', `lease ${id} belongs to a running process; it ends when that process does`)
    }
  }

  async close (): Promise<void> {
    if (this.closed) return
    this.closed = true
    this.watchers.clear()
    this.fsWatcher?.close()
    this.fsWatcher = undefined
    await this.queues.idle()
    for (const id of [...this.ownLeases.keys()]) await this.revokeLease(id)
    await closeServer(this.instance)
  }
}
