/**
 * A replica on another node, reached through the peer protocol: NBD to
 * the node's proxy port, one export per image, `replica/<image>`, whose
 * byte offsets are the image's (block * block_size + offset). Connections
 * are pooled per image and opened on first use; a request never opens a
 * connection of its own. Latency is measured on every request so reads
 * can prefer the closest node.
 */
import { UkaiError } from '../errors.js'
import type { DiscardMode, Replica } from '../replica/replica.js'
import { NbdClient, type NbdTarget } from './nbd-client.js'

export const REPLICA_EXPORT_PREFIX = 'replica/'

export interface RemoteReplicaOptions {
  timeoutMs: number
  /** Connections per image. */
  connections?: number
  /** Block size of an image (from its metadata). */
  blockSizeOf: (image: string) => number | undefined
}

interface Pool { clients: NbdClient[], next: number, connecting: Promise<NbdClient> | undefined }

export class RemoteReplica implements Replica {
  readonly isLocal = false
  readonly location: string
  readonly target: NbdTarget
  private readonly options: RemoteReplicaOptions
  private readonly pools = new Map<string, Pool>()
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

  private async client (image: string): Promise<NbdClient> {
    let pool = this.pools.get(image)
    if (pool === undefined) {
      pool = { clients: [], next: 0, connecting: undefined }
      this.pools.set(image, pool)
    }
    pool.clients = pool.clients.filter((c) => !c.closed)
    const want = this.options.connections ?? 2
    if (pool.clients.length >= want || (pool.clients.length > 0 && pool.connecting !== undefined)) {
      pool.next = (pool.next + 1) % pool.clients.length
      return pool.clients[pool.next]!
    }
    if (pool.connecting === undefined) {
      const p = pool
      pool.connecting = NbdClient.connect(this.target, REPLICA_EXPORT_PREFIX + image, { timeoutMs: this.options.timeoutMs })
        .then((c) => { p.clients.push(c); return c })
        .finally(() => { p.connecting = undefined })
    }
    return await pool.connecting
  }

  private async timed<T> (fn: () => Promise<T>): Promise<T> {
    const t0 = performance.now()
    const r = await fn()
    const ms = performance.now() - t0
    this.rtt = this.rtt === undefined ? ms : this.rtt * 0.9 + ms * 0.1
    return r
  }

  async read (image: string, block: number, offset: number, buf: Buffer): Promise<void> {
    const at = this.base(image, block) + offset
    const c = await this.client(image)
    await this.timed(async () => await c.read(at, buf))
  }

  async write (image: string, block: number, offset: number, data: Buffer): Promise<void> {
    const at = this.base(image, block) + offset
    const c = await this.client(image)
    await this.timed(async () => await c.write(at, data))
  }

  async discard (image: string, block: number, offset: number, length: number, mode: DiscardMode): Promise<void> {
    const at = this.base(image, block) + offset
    const c = await this.client(image)
    if (mode === 'trim') await c.trim(at, length)
    else await c.writeZeroes(at, length, mode === 'zero-allocated')
  }

  async flush (image: string): Promise<void> {
    // Every connection of the pool: a flush covers its own connection's writes.
    await this.client(image)
    const pool = this.pools.get(image)!
    await Promise.all(pool.clients.filter((c) => !c.closed).map(async (c) => await c.flush()))
  }

  /** Without block status on the peer path, a remote block is all data. */
  async allocatedLength (image: string, _block: number): Promise<number> {
    return this.blockSize(image)
  }

  /** Drops the connections of one image (it was closed or destroyed). */
  async closeImage (image: string): Promise<void> {
    const pool = this.pools.get(image)
    this.pools.delete(image)
    await Promise.all((pool?.clients ?? []).map(async (c) => await c.close().catch(() => {})))
  }

  async close (): Promise<void> {
    for (const image of [...this.pools.keys()]) await this.closeImage(image)
  }
}
