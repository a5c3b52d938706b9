/**
 * A replica on another node, reached through the peer protocol: NBD to
 * the node's proxy port, whose byte offsets are the image's
 * (block * block_size + offset). Reads go to the export `replica/<image>`
 * (read-only); a writer's requests to `replica/<image>@<generation>`, the
 * export of its writer generation, which the peer checks against the
 * metadata store when the connection opens and fences when a newer
 * generation takes over. Connections are pooled per export and opened on
 * first use; a request never opens a connection of its own. Latency is
 * measured on every request so reads can prefer the closest node.
 */
import { UkaiError } from '../errors.js'
import type { Range } from '../metadata/range-set.js'
import type { DiscardMode, Replica } from '../replica/replica.js'
import { NbdClient, type ClientTls, type NbdTarget } from './nbd-client.js'

export const REPLICA_EXPORT_PREFIX = 'replica/'

/** The export a peer serves a replica under: read-only, or for the writer of `generation` (and `epoch`, see fences.ts). */
export function replicaExportName (image: string, generation?: number, epoch = 0): string {
  if (generation === undefined) return `${REPLICA_EXPORT_PREFIX}${image}`
  return `${REPLICA_EXPORT_PREFIX}${image}@${generation}${epoch > 0 ? `.${epoch}` : ''}`
}

/** The image, generation and epoch an export name asks for, or undefined when it is no replica export. */
export function parseReplicaExport (name: string): { image: string, generation: number | undefined, epoch: number } | undefined {
  const m = /^replica\/([^@/]+)(?:@([1-9][0-9]{0,12})(?:\.([1-9][0-9]{0,5}))?)?$/.exec(name)
  if (m === null) return undefined
  const epoch = m[3] === undefined ? 0 : Number(m[3])
  if (epoch >= 2 ** 20) return undefined
  return { image: m[1]!, generation: m[2] === undefined ? undefined : Number(m[2]), epoch }
}

export interface RemoteReplicaOptions {
  timeoutMs: number
  /** Connections per image. */
  connections?: number
  /** Block size of an image (from its metadata). */
  blockSizeOf: (image: string) => number | undefined
  /** Speak TLS to the peer, with this node's certificate. */
  tls?: ClientTls
}

interface Pool {
  image: string
  /** The export's name. */
  name: string
  clients: NbdClient[]
  next: number
  connecting: Promise<NbdClient> | undefined
  /** A connection was chosen in this tick: the tick's requests go on it too (see ready). */
  chosen: boolean
}

export class RemoteReplica implements Replica {
  readonly isLocal = false
  readonly location: string
  readonly target: NbdTarget
  private readonly options: RemoteReplicaOptions
  /** Pools per export name. */
  private readonly pools = new Map<string, Pool>()
  /**
   * Per image, the epoch of this writer's connections (fences.ts): raised
   * when a request to the peer went unanswered, so that nothing sent
   * before can land after what is sent next.
   */
  private readonly epochs = new Map<string, number>()
  /**
   * Per image, the connections whose writes the peer acknowledged since
   * the image's last flush here, with how many (a write that failed is the
   * caller's to record, and is not counted).
   */
  private readonly unflushed = new Map<string, Map<NbdClient, number>>()
  /** Smoothed request latency in ms (undefined until measured). */
  rtt: number | undefined

  constructor (location: string, target: NbdTarget, options: RemoteReplicaOptions) {
    this.location = location
    this.target = target
    this.options = options
  }

  private base (image: string, block: number): number {
    return block * this.blockSize(image)
  }

  private blockSize (image: string): number {
    const bs = this.options.blockSizeOf(image)
    if (bs === undefined) throw new UkaiError('UKAI_ERR_NOT_FOUND', `image '${image}' is not known on this node`)
    return bs
  }

  /** The pool of an export, made when missing. */
  private pool (image: string, generation?: number): Pool {
    const name = replicaExportName(image, generation, generation === undefined ? 0 : this.epochs.get(image) ?? 0)
    let pool = this.pools.get(name)
    if (pool === undefined) {
      // A new generation's pool: the older one's connections are refused from now on.
      if (generation !== undefined) {
        for (const [n, p] of this.pools) if (p.image === image && n !== replicaExportName(image)) void this.closePool(n)
      }
      pool = { image, name, clients: [], next: 0, connecting: undefined, chosen: false }
      this.pools.set(name, pool)
    }
    return pool
  }

  /**
   * A connection of the pool that is open now, or undefined when one must
   * be opened first. The requests of one event-loop tick go on one
   * connection, the next tick's on the next: a tick's requests then leave
   * in one socket write (nbd-client.ts corks per tick) and reach the peer
   * in one read, instead of one write per connection per tick, while the
   * pool's connections still share the load (a large write on one does
   * not hold up the next tick's requests).
   */
  private ready (pool: Pool): NbdClient | undefined {
    const want = this.options.connections ?? 2
    let n = pool.clients.length
    if (pool.clients.some((c) => c.closed)) {
      pool.clients = pool.clients.filter((c) => !c.closed)
      n = pool.clients.length
    }
    if (n === 0 || (n < want && pool.connecting === undefined)) return undefined
    if (!pool.chosen) {
      pool.chosen = true
      pool.next = (pool.next + 1) % n
      process.nextTick(() => { pool.chosen = false })
    }
    return pool.clients[pool.next % n]!
  }

  /** A connection of the pool for `image` (for the writer of `generation`, if given). */
  private async client (image: string, generation?: number): Promise<NbdClient> {
    const pool = this.pool(image, generation)
    const open = this.ready(pool)
    if (open !== undefined) return open
    if (pool.connecting === undefined) {
      const p = pool
      pool.connecting = NbdClient.connect(this.target, pool.name, { timeoutMs: this.options.timeoutMs, tls: this.options.tls, blockStatus: true })
        .then((c) => { p.clients.push(c); return c })
        .finally(() => { p.connecting = undefined })
    }
    return await pool.connecting
  }

  private async timed<T> (fn: () => Promise<T>): Promise<T> {
    const t0 = performance.now()
    const r = await fn()
    this.measured(t0)
    return r
  }

  /** A request that started at `t0` was answered: the latency reads prefer low. */
  private measured (t0: number): void {
    const ms = performance.now() - t0
    this.rtt = this.rtt === undefined ? ms : this.rtt * 0.9 + ms * 0.1
  }

  async read (image: string, block: number, offset: number, buf: Buffer): Promise<void> {
    const at = this.base(image, block) + offset
    const c = await this.client(image)
    await this.timed(async () => await c.read(at, buf))
  }

  async write (image: string, block: number, offset: number, data: Buffer, generation: number): Promise<void> {
    const at = this.base(image, block) + offset
    // The common case without a promise chain of its own: a connection is
    // open, and the request goes out in this tick, with the local write.
    const c = this.ready(this.pool(image, generation))
    if (c === undefined) {
      await this.writing(image, generation, async (c) => await this.timed(async () => await c.write(at, data)))
      return
    }
    const t0 = performance.now()
    try {
      await c.write(at, data)
    } catch (err) {
      this.failed(image, generation, c, err)
      throw err
    }
    this.measured(t0)
    this.took(image, c)
  }

  async discard (image: string, block: number, offset: number, length: number, mode: DiscardMode, generation: number): Promise<void> {
    const at = this.base(image, block) + offset
    await this.writing(image, generation, async (c) => {
      if (mode === 'trim') await c.trim(at, length)
      else await c.writeZeroes(at, length, mode === 'zero-allocated')
    })
  }

  /**
   * Runs a writing request. When the peer does not answer it (a timeout,
   * a broken connection: not an error answer), the writer's next
   * connection to the peer is of a new epoch: whatever of this request is
   * still on its way is refused there from then on.
   */
  private async writing (image: string, generation: number, fn: (c: NbdClient) => Promise<void>): Promise<void> {
    const c = await this.client(image, generation)
    try {
      await fn(c)
    } catch (err) {
      this.failed(image, generation, c, err)
      throw err
    }
    this.took(image, c)
  }

  /** `c` acknowledged a write of `image`: the next flush must cover that connection. */
  private took (image: string, c: NbdClient): void {
    let took = this.unflushed.get(image)
    if (took === undefined) { took = new Map(); this.unflushed.set(image, took) }
    took.set(c, (took.get(c) ?? 0) + 1)
  }

  /** A writing request on `c` failed: unanswered (not an error answer), the writer goes on with a new epoch. */
  private failed (image: string, generation: number, c: NbdClient, err: unknown): void {
    if ((err as UkaiError).details?.nbdError !== undefined) return
    const was = this.epochs.get(image) ?? 0
    if (replicaExportName(image, generation, was) === c.exportName) {
      this.epochs.set(image, Math.min(was + 1, 2 ** 20 - 1))
      void this.closePool(c.exportName)
    }
  }

  /**
   * Flushes every connection that took writes since the last flush (a
   * flush covers its own connection's writes). One of them lost since (the
   * peer died, or restarted) fails the flush: what it took may be gone
   * with the peer's page cache, and the writer must not count it durable.
   */
  async flush (image: string): Promise<void> {
    const map = this.unflushed.get(image)
    const took = [...(map ?? [])]
    if (took.length === 0) {
      await (await this.client(image)).flush()
      return
    }
    if (took.some(([c]) => c.closed)) {
      // Said once: the writer records it (it keeps the failure until it has).
      for (const [c] of took) if (c.closed) map?.delete(c)
      throw new UkaiError('UKAI_ERR_CONNECT', `node ${this.location}: the connection that took writes of image '${image}' was lost before they were flushed`)
    }
    await Promise.all(took.map(async ([c]) => await c.flush()))
    // What a connection took while this flush was on its way stays for the next.
    for (const [c, n] of took) {
      const now = map?.get(c) ?? 0
      if (now <= n) map?.delete(c)
      else map?.set(c, now - n)
    }
  }

  /** The bytes of the block the peer has allocated (holes not counted); all of it from a peer without block status. */
  async allocatedLength (image: string, block: number): Promise<number> {
    let n = 0
    for (const e of await this.allocation(image, block, 0, this.blockSize(image))) if (!e.hole) n += e.end - e.start
    return n
  }

  /**
   * The ranges of [start, end) of the block that may hold data, by the
   * peer's block status (base:allocation): what reads as zeros there is
   * left out. A peer without block status gives the whole range (copies
   * then find the zeros by reading).
   */
  async dataExtents (image: string, block: number, start: number, end: number): Promise<Range[]> {
    const out: Range[] = []
    for (const e of await this.allocation(image, block, start, end)) {
      if (e.zero) continue
      const last = out[out.length - 1]
      if (last !== undefined && last[1] === e.start) last[1] = e.end
      else out.push([e.start, e.end])
    }
    return out
  }

  /** Block status of [start, end) of the block, as offsets in the block, asked until all of it is told. */
  private async allocation (image: string, block: number, start: number, end: number): Promise<Array<{ start: number, end: number, hole: boolean, zero: boolean }>> {
    if (start >= end) return []
    const base = this.base(image, block)
    const c = await this.client(image)
    // The last block may end before block_size, with the export.
    end = Math.min(end, c.size - base)
    if (!c.hasBlockStatus || start >= end) return [{ start, end: Math.max(start, end), hole: false, zero: false }]
    const out: Array<{ start: number, end: number, hole: boolean, zero: boolean }> = []
    // "the server MAY return less data than requested ... at least one extent": ask again from where it stopped.
    for (let at = start; at < end;) {
      const extents = await this.timed(async () => await c.blockStatus(base + at, end - at))
      for (const e of extents) {
        out.push({ start: e.offset - base, end: e.offset - base + e.length, hole: e.hole, zero: e.zero })
        at = e.offset - base + e.length
      }
    }
    return out
  }

  private async closePool (name: string): Promise<void> {
    const pool = this.pools.get(name)
    this.pools.delete(name)
    await Promise.all((pool?.clients ?? []).map(async (c) => await c.close().catch(() => {})))
  }

  /** Drops the connections of one image (it was closed or destroyed). */
  async closeImage (image: string): Promise<void> {
    this.unflushed.delete(image)
    await Promise.all([...this.pools].filter(([, p]) => p.image === image).map(async ([n]) => await this.closePool(n)))
  }

  async close (): Promise<void> {
    await Promise.all([...this.pools.keys()].map(async (n) => await this.closePool(n)))
  }
}
