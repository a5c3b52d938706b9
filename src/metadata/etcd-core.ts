/**
 * The cluster's metadata core: the MetadataCore contract on etcd (v3 API,
 * through the `etcd3` client). Every key lives under `<prefix>/`, so one
 * etcd can hold several clusters. etcd gives everything the contract asks
 * for natively: ranges read at one revision, transactions with compares
 * over a key or a range, watches that resume at the revision they left,
 * and leases that expire when their keepalives stop.
 *
 * Fault handling is the store's (store.ts retries what must not be lost);
 * the client only fails fast: every call has a deadline, no call is
 * retried behind the caller's back, and no circuit breaker holds calls
 * back once etcd is reachable again.
 */
import { Etcd3, type IKeyValue, type IOptions } from 'etcd3'
import { ExponentialBackoff, noop } from 'cockatiel'
import { UkaiError } from '../errors.js'
import type {
  Compare, CoreSupports, KeyValue, Lease, MetadataCore, RangeResult, TxnOp, TxnResult, WatchEvent, WatchHandlers, Watcher
} from './core.js'

/** How long one call to etcd may take before it counts as failed. */
const CALL_TIMEOUT_MS = 5000

interface KeepAliveStream {
  once: (event: string, fn: (arg: never) => void) => void
  write: (req: { ID: string }) => void
  end: () => void
}

export interface EtcdCoreOptions {
  /** Client URLs: "http://host:2379". */
  servers: string[]
  /** Namespace of this cluster's keys. */
  prefix: string
}

/** The first key after every key that starts with `prefix` (etcd's range_end). */
export function prefixEnd (prefix: Buffer): Buffer {
  const end = Buffer.from(prefix)
  for (let i = end.length - 1; i >= 0; i--) {
    if (end[i]! < 0xff) {
      end[i]!++
      return end.subarray(0, i + 1)
    }
  }
  return Buffer.from([0])
}

const TARGETS = { mod: 'Mod', create: 'Create', version: 'Version' } as const
const RESULTS = { '==': 'Equal', '!=': 'NotEqual', '<': 'Less', '>': 'Greater' } as const
const FIELD = { mod: 'mod_revision', create: 'create_revision', version: 'version' } as const

/** Any failure to talk to etcd, as one error the store can retry on. */
function unavailable (servers: string[], err: unknown): UkaiError {
  if (err instanceof UkaiError) return err
  return new UkaiError('UKAI_ERR_METADATA_UNAVAILABLE', `metadata servers ${servers.join(', ')}: ${(err as Error)?.message ?? String(err)}`, undefined, { cause: err })
}

export class EtcdCore implements MetadataCore {
  readonly kind = 'etcd'
  readonly supports: CoreSupports = { crossShardTxn: true, timedLeases: true }
  readonly description: string
  private readonly client: Etcd3
  private readonly servers: string[]
  private readonly prefix: string

  constructor (options: EtcdCoreOptions) {
    this.servers = options.servers
    this.prefix = `${options.prefix}/`
    this.description = `etcd ${options.servers.join(',')} (prefix ${options.prefix}/)`
    const clientOptions: IOptions = {
      hosts: options.servers,
      dialTimeout: CALL_TIMEOUT_MS,
      defaultCallOptions: (ctx) => ctx.isStream ? {} : { deadline: Date.now() + CALL_TIMEOUT_MS },
      faultHandling: {
        host: () => noop,
        global: noop,
        // etcd3 calls next() on it: a cockatiel 3 backoff factory serves.
        watchBackoff: new ExponentialBackoff({ initialDelay: 50, maxDelay: 1000 }) as unknown as NonNullable<IOptions['faultHandling']>['watchBackoff']
      }
    }
    this.client = new Etcd3(clientOptions)
  }

  private key (k: string): Buffer { return Buffer.from(this.prefix + k) }

  private decode (kv: IKeyValue): KeyValue {
    const lease = String(kv.lease)
    return {
      key: kv.key.toString().slice(this.prefix.length),
      value: kv.value.toString(),
      createRevision: Number(kv.create_revision),
      modRevision: Number(kv.mod_revision),
      version: Number(kv.version),
      lease: lease === '0' ? undefined : lease
    }
  }

  private async call<T> (fn: () => Promise<T>): Promise<T> {
    try {
      return await fn()
    } catch (err) {
      throw unavailable(this.servers, err)
    }
  }

  async range (prefix: string): Promise<RangeResult> {
    const key = this.key(prefix)
    const res = await this.call(async () => await this.client.kv.range({ key, range_end: prefixEnd(key) }))
    return { kvs: res.kvs.map((kv) => this.decode(kv)), revision: Number(res.header.revision) }
  }

  async get (key: string): Promise<KeyValue | undefined> {
    const res = await this.call(async () => await this.client.kv.range({ key: this.key(key) }))
    return res.kvs.length === 0 ? undefined : this.decode(res.kvs[0]!)
  }

  async txn (compares: Compare[], ops: TxnOp[]): Promise<TxnResult> {
    const compare = compares.map((c) => {
      const key = this.key(c.key)
      return {
        key,
        ...(c.prefix === true ? { range_end: prefixEnd(key) } : {}),
        target: TARGETS[c.target],
        result: RESULTS[c.op],
        [FIELD[c.target]]: String(c.value)
      }
    })
    const success = ops.map((op) => {
      const key = this.key(op.key)
      if (op.type === 'put') return { request_put: { key, value: Buffer.from(op.value), ...(op.lease !== undefined ? { lease: op.lease } : {}) } }
      return { request_delete_range: { key, ...(op.prefix === true ? { range_end: prefixEnd(key) } : {}) } }
    })
    const res = await this.call(async () => await this.client.kv.txn({ compare: compare as never, success, failure: [] }))
    return { succeeded: res.succeeded, revision: Number(res.header.revision) }
  }

  async watch (prefix: string, handlers: WatchHandlers): Promise<Watcher> {
    const w = await this.call(async () => await this.client.watch().prefix(this.prefix + prefix).create())
    let lost = false
    w.on('data', (res) => {
      const events: WatchEvent[] = res.events.map((e) => ({
        type: e.type === 'Delete' ? 'delete' : 'put',
        key: e.kv.key.toString().slice(this.prefix.length),
        revision: Number(e.kv.mod_revision)
      }))
      if (events.length > 0) handlers.onEvents(events)
    })
    // The client resumes a watch where it stopped; whoever depends on it
    // re-reads anyway after a disconnection, in case history was compacted.
    w.on('disconnected', () => { lost = true })
    w.on('connected', () => {
      if (!lost) return
      lost = false
      handlers.onReset?.()
    })
    w.on('error', () => { handlers.onReset?.() })
    return { close: async () => { await w.cancel().catch(() => {}) } }
  }

  async grantLease (ttlSeconds: number): Promise<Lease> {
    const res = await this.call(async () => await this.client.leaseClient.leaseGrant({ TTL: ttlSeconds, ID: 0 }))
    const id = String(res.ID)
    return {
      id,
      ttlSeconds: Number(res.TTL),
      keepAlive: async () => await this.keepAlive(id),
      revoke: async () => await this.revokeLease(id)
    }
  }

  /** One keepalive round trip: true while etcd still has the lease. */
  private async keepAlive (id: string): Promise<boolean> {
    return await this.call(async () => {
      const stream = await this.client.leaseClient.leaseKeepAlive() as unknown as KeepAliveStream
      try {
        const res = await new Promise<{ TTL: string }>((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error(`lease keepalive got no answer in ${CALL_TIMEOUT_MS} ms`)), CALL_TIMEOUT_MS)
          stream.once('data', (r: { TTL: string }) => { clearTimeout(timer); resolve(r) })
          stream.once('error', (err: Error) => { clearTimeout(timer); reject(err) })
          stream.write({ ID: id })
        })
        return Number(res.TTL) > 0
      } finally {
        stream.end()
      }
    })
  }

  async leaseAlive (id: string): Promise<boolean> {
    const res = await this.call(async () => await this.client.leaseClient.leaseTimeToLive({ ID: id, keys: false }))
    // -1: no such lease (expired or revoked); 0 is a lease in its last second.
    return Number(res.TTL) >= 0
  }

  async revokeLease (id: string): Promise<void> {
    try {
      await this.client.leaseClient.leaseRevoke({ ID: id })
    } catch (err) {
      // Already gone: what revoking wanted.
      if (/not found/i.test((err as Error).message)) return
      throw unavailable(this.servers, err)
    }
  }

  async close (): Promise<void> {
    this.client.close()
  }
}
