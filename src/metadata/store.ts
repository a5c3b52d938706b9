/**
 * MetadataStore: everything a UKAI cluster shares, built on the small
 * metadata core (core.ts) that each backend implements: files for one
 * machine (file-core.ts), etcd for a cluster (etcd-core.ts). The store
 * holds the rules, so both backends behave the same (the conformance
 * suite in store.conformance.ts runs on each):
 *
 * - image metadata as small keys (keys.ts); an update is a read, a change,
 *   a validation, and a transaction that writes only the keys that changed
 *   and only if no key of the image's metadata changed since the read (a
 *   compare over the prefix): concurrent updates are retried, never lost;
 * - the dirty-block log, and the writer lease with its generation: the
 *   holder's changes carry a guard (its writer key's revision), so a
 *   writer that was fenced can change nothing more;
 * - who has an image open (keys on each node's lease), so no node
 *   destroys an image in use anywhere;
 * - the node registry, with liveness from each node's lease.
 *
 * A backend that cannot be reached fails a call with
 * UKAI_ERR_METADATA_UNAVAILABLE; changes retry until it is back or their
 * deadline passes.
 */
import { hostname } from 'node:os'
import { randomUUID } from 'node:crypto'
import { UkaiError, imageNotFound } from '../errors.js'
import { KeyedQueue } from '../util/keyed-queue.js'
import type { Compare, KeyValue, Lease, MetadataCore, TxnOp, Watcher } from './core.js'
import { ImageMeta, validateImage } from './image.js'
import {
  controlTokenKey, decodeHeader, decodeImage, dirtyKey, encodeImageKeys, generationKey, headerKey, imageOfKey, imagePrefix, imagesPrefix,
  locPrefix, metaPrefix, moveKey, nodeAliveKey, nodeInfoKey, nodesPrefix, openKey, openPrefix, writerKey
} from './keys.js'
import { canonicalLocation, validateImageName } from './names.js'
import { RangeSet } from './range-set.js'
import { jsonError, show } from '../util/show.js'

export type WriterPurpose = 'write' | 'sync'

/** The holder of an image's writer lease. */
export interface WriterRecord {
  node: string
  /** Raised by every grant of the lease; replicas refuse writes of older generations. */
  generation: number
  /** The holder's session: one per grant, so a holder knows its own key. */
  session: string
  /** 'write': a hypervisor's writer; 'sync': a resync or a reconciliation, which any writer may take over. */
  purpose: WriterPurpose
  since: string
  /** Revision of the writer key: the guard of the holder's changes. */
  modRevision: number
}

/** Who has an image open on one node. */
export interface OpenRecord {
  node: string
  readers: number
  writers: number
  since: string
}

/** Everything the store holds about one image, read at one revision. */
export interface ImageState {
  meta: ImageMeta
  incarnation: string
  created: string
  dirty: RangeSet
  writer: WriterRecord | undefined
  /** The last writer generation granted (0: never written). */
  generation: number
  opens: OpenRecord[]
  /** Revision of the header's creation: tells this image from a later one of the same name. */
  headerCreate: number
  generationMod: number
  /** The stored keys of the image's metadata, for the next update's diff. */
  metaKeys: Map<string, string>
  /** A move under way, when one is recorded. */
  move: MoveIntent | undefined
}

/** A move of an image under way (`ukai image move`), recorded so that its node resumes it after a restart. */
export interface MoveIntent {
  /** The node that runs it. */
  node: string
  /** The request as the node took it (move.ts's MoveRequest). */
  request: { to: string, from?: string, start?: number, end?: number, rate?: number }
  since: string
}

export interface WriterRequest {
  node: string
  session: string
  purpose: WriterPurpose
  /** The lease the writer key lives on (the holder node's). */
  lease: string
  /**
   * Whether the current holder may be fenced for this request. Called
   * only for a live holder that is not this session.
   */
  mayTakeOver: (holder: WriterRecord, state: ImageState) => boolean
}

export interface WriterGrant {
  generation: number
  /** The writer key's revision: pass it as the guard of every change. */
  guard: number
  /** The holder that was fenced by this grant, if any. */
  previous: WriterRecord | undefined
  state: ImageState
}

export interface NodeInfo {
  id: string
  control_address: string
  control_port: number
  /** ISO time of the node's last start. */
  started: string
}

/** What a running node states about itself, on its lease. */
export interface NodeAlive extends NodeInfo {
  pid: number
  host: string
  /** Made at each start: tells a process from an earlier one with the same id. */
  incarnation: string
  lease: string
}

export interface NodeEntry {
  info: NodeInfo
  /** Present while the node runs (its lease lives). */
  alive: NodeAlive | undefined
}

export interface ImageWatch {
  /** Something of the image changed (its metadata, log, writer, opens), or it was created or destroyed. */
  onImage: (name: string) => void
  /** Changes may have been missed: re-read every image. */
  onReset?: () => void
}

export interface ChangeOptions {
  /** The writer lease this change depends on: it fails with UKAI_ERR_FENCED once another holder has it. */
  guard?: number | undefined
  /** Until when (ms since the epoch) a change retries while the backend is unreachable. */
  until?: number | undefined
  /** Refuse the change (UKAI_ERR_BUSY) while this node has the image open. */
  notOpenOn?: string | undefined
}

/** How long a change retries an unreachable backend by default. */
const DEFAULT_RETRY_MS = 30_000

function validateNodeInfo (r: NodeInfo): NodeInfo {
  if (typeof r.id !== 'string' || !/^[A-Za-z0-9.:_[\]-]{1,300}$/.test(r.id) || typeof r.control_address !== 'string' ||
    !Number.isInteger(r.control_port) || r.control_port < 1 || r.control_port > 65535 || typeof r.started !== 'string') {
    throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', `invalid node record ${show(r)}`)
  }
  return r
}

const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))

export const fenced = (name: string, holder?: WriterRecord): UkaiError =>
  new UkaiError('UKAI_ERR_FENCED',
    `image '${name}': this node no longer holds the writer lease${holder !== undefined ? ` (node ${holder.node} took it over, generation ${holder.generation})` : ''}; its writes are refused`,
    { image: name })

/** A stored MoveIntent, or undefined when there is none or it is not one. */
function parseMove (kv: KeyValue | undefined): MoveIntent | undefined {
  const m = kv === undefined ? undefined : parse<MoveIntent>(kv)
  if (typeof m !== 'object' || m === null || typeof m.node !== 'string' || typeof m.request !== 'object' || m.request === null || typeof m.request.to !== 'string') return undefined
  return m
}

function parse<T> (kv: KeyValue): T | undefined {
  try { return JSON.parse(kv.value) as T } catch { return undefined }
}

export class MetadataStore {
  readonly core: MetadataCore
  private readonly defaultPort: number
  private readonly retryMs: number
  /** Transactions (file) or updates (store) of one key in this process run one at a time. */
  private readonly queues = new KeyedQueue()

  constructor (core: MetadataCore, defaultPort: number, options: { retryMs?: number } = {}) {
    this.core = core
    this.defaultPort = defaultPort
    this.retryMs = options.retryMs ?? DEFAULT_RETRY_MS
  }

  get kind (): string { return this.core.kind }
  get description (): string { return this.core.description }

  /** Node ids as keys: one spelling per node ("host:port", lower case). */
  private nodeKey (id: string): string {
    return canonicalLocation(id, this.defaultPort)
  }

  /** Runs `fn` again while the backend is unreachable, until `until`. */
  private async retrying<T> (fn: () => Promise<T>, until?: number): Promise<T> {
    const deadline = until ?? Date.now() + this.retryMs
    for (let wait = 50; ; wait = Math.min(wait * 2, 1000)) {
      try {
        return await fn()
      } catch (err) {
        if (!(err instanceof UkaiError) || err.code !== 'UKAI_ERR_METADATA_UNAVAILABLE' || Date.now() + wait > deadline) throw err
      }
      await sleep(wait)
    }
  }

  /** Compare-and-swap loops: after a few lost races, back off a little so they end. */
  private async raced (attempt: number): Promise<void> {
    if (attempt > 1000) throw new UkaiError('UKAI_ERR_BUSY', 'the metadata changed under this update 1000 times in a row')
    if (attempt > 3) await sleep(Math.random() * Math.min(50, attempt * 2))
  }


  // ---- images -----------------------------------------------------------

  async list (): Promise<string[]> {
    const { kvs } = await this.core.range(imagesPrefix)
    const names = new Set<string>()
    for (const kv of kvs) {
      const name = imageOfKey(kv.key)
      if (name !== undefined && kv.key === headerKey(name)) names.add(name)
    }
    return [...names].sort()
  }

  /** Everything about one image, read at one revision; undefined when it does not exist. */
  async state (name: string): Promise<ImageState | undefined> {
    validateImageName(name)
    const { kvs, revision } = await this.core.range(imagePrefix(name))
    const byKey = new Map(kvs.map((kv) => [kv.key, kv]))
    const h = byKey.get(headerKey(name))
    if (h === undefined) return undefined
    const header = decodeHeader(h.value, name)
    const segments = kvs.filter((kv) => kv.key.startsWith(locPrefix(name)))
    const meta = validateImage(decodeImage(header, segments, revision), this.defaultPort)
    const metaKeys = new Map(kvs.filter((kv) => kv.key.startsWith(metaPrefix(name))).map((kv) => [kv.key, kv.value]))
    const d = byKey.get(dirtyKey(name))
    const w = byKey.get(writerKey(name))
    const g = byKey.get(generationKey(name))
    const writerDoc = w === undefined ? undefined : parse<Omit<WriterRecord, 'modRevision'>>(w)
    const opens: OpenRecord[] = []
    for (const kv of kvs) {
      if (!kv.key.startsWith(openPrefix(name))) continue
      const o = parse<OpenRecord>(kv)
      if (o !== undefined) opens.push(o)
    }
    return {
      meta,
      incarnation: header.incarnation,
      created: header.created,
      dirty: d === undefined ? new RangeSet() : decodeDirty(d.value, name),
      writer: writerDoc === undefined ? undefined : { ...writerDoc, modRevision: w!.modRevision },
      generation: g === undefined ? 0 : Number(parse<{ generation: number }>(g)?.generation ?? 0),
      opens: opens.sort((a, b) => a.node.localeCompare(b.node)),
      headerCreate: h.createRevision,
      generationMod: g?.modRevision ?? 0,
      metaKeys,
      move: parseMove(byKey.get(moveKey(name)))
    }
  }

  async get (name: string): Promise<ImageMeta | undefined> {
    return (await this.state(name))?.meta
  }

  async require (name: string): Promise<ImageMeta> {
    const meta = await this.get(name)
    if (meta === undefined) throw imageNotFound(name)
    return meta
  }

  async requireState (name: string): Promise<ImageState> {
    const st = await this.state(name)
    if (st === undefined) throw imageNotFound(name)
    return st
  }

  /** Stores a new image; fails with UKAI_ERR_EXISTS when the name is taken. */
  async create (meta: ImageMeta, options: ChangeOptions = {}): Promise<ImageMeta> {
    validateImage(meta, this.defaultPort)
    const name = meta.name
    const incarnation = randomUUID()
    const keys = encodeImageKeys(meta, incarnation, new Date().toISOString())
    return await this.queues.run(name, async () => await this.retrying(async () => {
      for (let attempt = 0; ; attempt++) {
        await this.raced(attempt)
        const { kvs } = await this.core.range(imagePrefix(name))
        const header = kvs.find((kv) => kv.key === headerKey(name))
        if (header !== undefined) {
          // A retry after an answer that was lost: the image is ours.
          if (decodeHeader(header.value, name).incarnation === incarnation) return await this.require(name)
          throw new UkaiError('UKAI_ERR_EXISTS', `image '${name}' already exists`, { image: name })
        }
        const absent: Compare = { key: headerKey(name), target: 'create', op: '==', value: 0 }
        if (kvs.length > 0) {
          // What an earlier image of this name left (a log, a stale open): cleared first.
          await this.core.txn([absent], [{ type: 'delete', key: imagePrefix(name), prefix: true }])
          continue
        }
        const res = await this.core.txn([absent, { key: imagePrefix(name), prefix: true, target: 'version', op: '==', value: 0 }],
          [...keys].map(([key, value]) => ({ type: 'put', key, value })))
        if (res.succeeded) {
          const stored = meta.clone()
          stored.revision = res.revision
          return stored
        }
      }
    }, options.until))
  }

  /**
   * Read-modify-write of one image: `change` gets a private copy and
   * returns it (or another ImageMeta) to store. The result is validated
   * before anything is written, so a bad change stores nothing; a change
   * that lost a race with another is run again on the newer metadata.
   */
  async update (name: string, change: (meta: ImageMeta) => ImageMeta | Promise<ImageMeta>, options: ChangeOptions = {}): Promise<ImageMeta> {
    validateImageName(name)
    return await this.queues.run(name, async () => await this.retrying(async () => {
      for (let attempt = 0; ; attempt++) {
        await this.raced(attempt)
        const st = await this.requireState(name)
        if (options.guard !== undefined && st.writer?.modRevision !== options.guard) throw fenced(name, st.writer)
        const busyNode = options.notOpenOn === undefined ? undefined : this.nodeKey(options.notOpenOn)
        if (busyNode !== undefined && st.opens.some((o) => this.nodeKey(o.node) === busyNode)) {
          throw new UkaiError('UKAI_ERR_BUSY', `image '${name}' is open on node ${options.notOpenOn!}; close it there first`, { image: name, node: options.notOpenOn })
        }
        const next = await change(st.meta.clone())
        if (next.name !== name) throw new UkaiError('UKAI_ERR_INVALID_ARGUMENT', 'an update may not rename an image')
        validateImage(next, this.defaultPort)
        const keys = encodeImageKeys(next, st.incarnation, st.created)
        const ops: TxnOp[] = []
        for (const [key, value] of keys) if (st.metaKeys.get(key) !== value) ops.push({ type: 'put', key, value })
        for (const key of st.metaKeys.keys()) if (!keys.has(key)) ops.push({ type: 'delete', key })
        next.revision = st.meta.revision
        if (ops.length === 0) return next
        const compares: Compare[] = [
          { key: headerKey(name), target: 'create', op: '==', value: st.headerCreate },
          { key: metaPrefix(name), prefix: true, target: 'mod', op: '<', value: st.meta.revision + 1 }
        ]
        if (options.guard !== undefined) compares.push({ key: writerKey(name), target: 'mod', op: '==', value: options.guard })
        if (busyNode !== undefined) compares.push({ key: openKey(name, busyNode), target: 'version', op: '==', value: 0 })
        const res = await this.core.txn(compares, ops)
        if (res.succeeded) {
          next.revision = res.revision
          return next
        }
      }
    }, options.until))
  }

  /**
   * Removes an image's metadata, its dirty-block log and everything else
   * the store holds of it. Refused (UKAI_ERR_BUSY) while the image is
   * open on any node.
   */
  async delete (name: string, options: ChangeOptions = {}): Promise<void> {
    validateImageName(name)
    await this.queues.run(name, async () => {
      let gone = false
      await this.retrying(async () => {
        for (let attempt = 0; ; attempt++) {
          await this.raced(attempt)
          const st = await this.state(name)
          if (st === undefined) {
            if (gone) return
            throw imageNotFound(name)
          }
          const users = describeUsers(st)
          if (users !== undefined) {
            throw new UkaiError('UKAI_ERR_BUSY', `image '${name}' is open on ${users}; stop its users before destroying it`, { image: name, opens: st.opens })
          }
          gone = true
          const res = await this.core.txn([
            { key: headerKey(name), target: 'create', op: '==', value: st.headerCreate },
            { key: openPrefix(name), prefix: true, target: 'version', op: '==', value: 0 },
            { key: writerKey(name), target: 'version', op: '==', value: 0 }
          ], [{ type: 'delete', key: imagePrefix(name), prefix: true }])
          if (res.succeeded) return
          gone = false
        }
      }, options.until)
    })
  }

  // ---- dirty-block log ---------------------------------------------------

  /**
   * The dirty-block log of an image: blocks a writer may have left
   * different on its in-sync replicas (a write in flight when it died).
   * Durable before the writes it covers start (DESIGN.md invariant 4).
   */
  async getDirty (name: string): Promise<RangeSet> {
    return (await this.state(name))?.dirty ?? new RangeSet()
  }

  /** Replaces the dirty-block log durably; with a guard, only while that writer holds the lease. */
  async putDirty (name: string, blocks: RangeSet, options: ChangeOptions = {}): Promise<void> {
    validateImageName(name)
    const op: TxnOp = blocks.isEmpty
      ? { type: 'delete', key: dirtyKey(name) }
      : { type: 'put', key: dirtyKey(name), value: JSON.stringify({ dirty: blocks.toJSON() }) }
    await this.retrying(async () => {
      const compares: Compare[] = [{ key: headerKey(name), target: 'create', op: '>', value: 0 }]
      if (options.guard !== undefined) compares.push({ key: writerKey(name), target: 'mod', op: '==', value: options.guard })
      if ((await this.core.txn(compares, [op])).succeeded) return
      const st = await this.requireState(name)
      throw fenced(name, st.writer)
    }, options.until)
  }

  /** Records a move of the image under way (MoveIntent); undefined removes the record. */
  async putMove (name: string, intent: MoveIntent | undefined): Promise<void> {
    validateImageName(name)
    const op: TxnOp = intent === undefined
      ? { type: 'delete', key: moveKey(name) }
      : { type: 'put', key: moveKey(name), value: JSON.stringify(intent) }
    await this.retrying(async () => {
      // Only while the image exists: a destroyed image's move is over.
      if ((await this.core.txn([{ key: headerKey(name), target: 'create', op: '>', value: 0 }], [op])).succeeded || intent === undefined) return
      throw imageNotFound(name)
    })
  }

  // ---- who has an image open ------------------------------------------------

  /** Records how many readers and writers `node` has of an image (on the node's lease); zero removes it. */
  async putOpen (name: string, node: string, counts: { readers: number, writers: number }, lease: string, options: ChangeOptions = {}): Promise<void> {
    validateImageName(name)
    const key = openKey(name, this.nodeKey(node))
    await this.retrying(async () => {
      if (counts.readers === 0 && counts.writers === 0) {
        await this.core.txn([], [{ type: 'delete', key }])
        return
      }
      const record: OpenRecord = { node, readers: counts.readers, writers: counts.writers, since: new Date().toISOString() }
      const res = await this.core.txn([{ key: headerKey(name), target: 'create', op: '>', value: 0 }], [{ type: 'put', key, value: JSON.stringify(record), lease }])
      if (!res.succeeded) throw imageNotFound(name)
    }, options.until)
  }

  // ---- the writer lease -----------------------------------------------------

  /**
   * Takes the image's writer lease for `req.session`: when nobody holds
   * it, or the holder is this session already (a retry), or
   * `req.mayTakeOver` allows fencing the holder. Every grant raises the
   * generation. Refused with UKAI_ERR_BUSY otherwise.
   */
  async acquireWriter (name: string, req: WriterRequest, options: ChangeOptions = {}): Promise<WriterGrant> {
    validateImageName(name)
    return await this.queues.run(name, async () => await this.retrying(async () => {
      for (let attempt = 0; ; attempt++) {
        await this.raced(attempt)
        const st = await this.requireState(name)
        const w = st.writer
        if (w !== undefined && w.session === req.session) return { generation: w.generation, guard: w.modRevision, previous: undefined, state: st }
        if (w !== undefined && !req.mayTakeOver(w, st)) {
          throw new UkaiError('UKAI_ERR_BUSY',
            `image '${name}' is being written by node ${w.node} (writer generation ${w.generation}); only a node in the image's hypervisors may take over from a live writer`,
            { image: name, writer: w.node })
        }
        const generation = st.generation + 1
        const record = { node: req.node, generation, session: req.session, purpose: req.purpose, since: new Date().toISOString() }
        const res = await this.core.txn([
          { key: headerKey(name), target: 'create', op: '==', value: st.headerCreate },
          { key: writerKey(name), target: 'mod', op: '==', value: w?.modRevision ?? 0 },
          { key: generationKey(name), target: 'mod', op: '==', value: st.generationMod }
        ], [
          { type: 'put', key: writerKey(name), value: JSON.stringify(record), lease: req.lease },
          { type: 'put', key: generationKey(name), value: JSON.stringify({ generation }) }
        ])
        // The writer key's revision is the transaction's.
        if (res.succeeded) {
          return { generation, guard: res.revision, previous: w, state: { ...st, writer: { ...record, modRevision: res.revision }, generation } }
        }
      }
    }, options.until))
  }

  /** Gives the writer lease back (the last writer closed); a no-op when it is not held with `guard` any more. */
  async releaseWriter (name: string, guard: number, options: ChangeOptions = {}): Promise<void> {
    validateImageName(name)
    await this.retrying(async () => {
      await this.core.txn([{ key: writerKey(name), target: 'mod', op: '==', value: guard }], [{ type: 'delete', key: writerKey(name) }])
    }, options.until)
  }

  // ---- nodes ------------------------------------------------------------------

  /**
   * Registers a node under its lease. Refused, changing nothing, while
   * another live process holds the id: the answer is that process's record.
   */
  async registerNode (info: NodeInfo, lease: Lease, options: ChangeOptions = {}): Promise<{ registered: true, alive: NodeAlive } | { registered: false, holder: NodeAlive }> {
    validateNodeInfo(info)
    const id = this.nodeKey(info.id)
    const alive: NodeAlive = { ...info, pid: process.pid, host: hostname(), incarnation: randomUUID(), lease: lease.id }
    return await this.retrying(async () => {
      for (let attempt = 0; ; attempt++) {
        await this.raced(attempt)
        const res = await this.core.txn([{ key: nodeAliveKey(id), target: 'version', op: '==', value: 0 }], [
          { type: 'put', key: nodeInfoKey(id), value: JSON.stringify(info) },
          { type: 'put', key: nodeAliveKey(id), value: JSON.stringify(alive), lease: lease.id }
        ])
        if (res.succeeded) return { registered: true as const, alive }
        const holder = await this.core.get(nodeAliveKey(id))
        const record = holder === undefined ? undefined : parse<NodeAlive>(holder)
        if (record !== undefined) return { registered: false as const, holder: record }
      }
    }, options.until)
  }

  /** Every registered node, sorted by id; alive while its lease lives. Malformed records are skipped. */
  async listNodes (): Promise<NodeEntry[]> {
    const { kvs } = await this.core.range(nodesPrefix)
    const byId = new Map<string, NodeEntry>()
    for (const kv of kvs) {
      const rest = kv.key.slice(nodesPrefix.length)
      const slash = rest.lastIndexOf('/')
      const id = rest.slice(0, slash)
      const what = rest.slice(slash + 1)
      const doc = parse<NodeInfo & Partial<NodeAlive>>(kv)
      if (doc === undefined) continue
      try { validateNodeInfo(doc) } catch { continue }
      const entry = byId.get(id) ?? { info: doc, alive: undefined }
      if (what === 'info') entry.info = doc
      else if (what === 'alive') entry.alive = doc as NodeAlive
      byId.set(id, entry)
    }
    return [...byId.values()].sort((a, b) => a.info.id.localeCompare(b.info.id))
  }

  // ---- the cluster's control token -------------------------------------------------

  /**
   * The bearer token of every node's control API, kept in the store
   * (`cluster/control-token`) unless the config names a file: made by the
   * first caller, the same for every node and CLI of the cluster.
   */
  async controlToken (make: () => string, options: ChangeOptions = {}): Promise<string> {
    return await this.retrying(async () => {
      for (;;) {
        const kv = await this.core.get(controlTokenKey)
        if (kv !== undefined) return kv.value
        const res = await this.core.txn([{ key: controlTokenKey, target: 'create', op: '==', value: 0 }],
          [{ type: 'put', key: controlTokenKey, value: make() }])
        if (res.succeeded) continue
      }
    }, options.until)
  }

  // ---- leases and watches -----------------------------------------------------------

  async grantLease (ttlSeconds: number): Promise<Lease> {
    return await this.retrying(async () => await this.core.grantLease(ttlSeconds))
  }

  async revokeLease (id: string): Promise<void> {
    await this.retrying(async () => await this.core.revokeLease(id))
  }

  /** Calls `handlers.onImage(name)` after any change to an image, by any process. */
  async watch (handlers: ImageWatch): Promise<Watcher> {
    return await this.core.watch(imagesPrefix, {
      onEvents: (events) => {
        const names = new Set<string>()
        for (const e of events) {
          const name = imageOfKey(e.key)
          if (name !== undefined) names.add(name)
        }
        for (const n of names) handlers.onImage(n)
      },
      onReset: handlers.onReset
    })
  }

  async close (): Promise<void> {
    await this.core.close()
  }
}

/** "node A (writing), node B (2 readers)", or undefined when nobody has the image open. */
export function describeUsers (st: ImageState): string | undefined {
  const parts = st.opens.map((o) => {
    const what = [o.writers > 0 ? 'writing' : '', o.readers > 0 ? `${o.readers} reader${o.readers > 1 ? 's' : ''}` : ''].filter((x) => x !== '')
    return `node ${o.node} (${what.join(', ')})`
  })
  if (st.writer !== undefined && !st.opens.some((o) => o.node === st.writer!.node)) parts.push(`node ${st.writer.node} (writer lease)`)
  return parts.length === 0 ? undefined : parts.join(', ')
}

function decodeDirty (text: string, name: string): RangeSet {
  let doc: unknown
  try { doc = JSON.parse(text) } catch (err) {
    throw new UkaiError('UKAI_ERR_INVALID_METADATA', `dirty-block log of image '${name}' is not valid JSON (${jsonError(err)})`)
  }
  const ranges = (doc as { dirty?: unknown }).dirty
  if (!Array.isArray(ranges) || !ranges.every((r) => Array.isArray(r) && r.length === 2 && r.every((x) => Number.isSafeInteger(x) && x >= 0) && r[0] < r[1])) {
    throw new UkaiError('UKAI_ERR_INVALID_METADATA', `dirty-block log of image '${name}' is malformed`)
  }
  return new RangeSet(ranges as Array<[number, number]>)
}
