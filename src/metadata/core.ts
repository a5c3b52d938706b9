/**
 * The metadata core: the small key-value contract every metadata backend
 * implements, and everything shared in a cluster is built on (image
 * documents, dirty-block logs, the node registry, open sets, writer
 * leases; see store.ts). Its shape is etcd's v3 API cut down to what UKAI
 * uses:
 *
 * - `range(prefix)`: every key under a prefix, with its revisions, read
 *   at one revision (a consistent snapshot);
 * - `txn(compares, ops)`: if every compare holds, apply every op,
 *   atomically (compare-and-swap on revisions);
 * - `watch(prefix)`: puts and deletes under a prefix, as they happen;
 * - leases: keys that live only as long as their lease is kept alive.
 *
 * Keys are relative to the backend's root ("images/vm01/meta/header"); a
 * backend maps them to its own namespace. The first two segments of a key
 * ("images/vm01", "nodes/10.0.0.1:22222") are its *shard*: a backend may
 * refuse a transaction that spans shards (`supports.crossShardTxn`), and
 * the store never issues one. Revisions only grow, per shard at least
 * (etcd's are global): a snapshot read at a higher revision of a shard is
 * never older than one read at a lower.
 */

export interface KeyValue {
  key: string
  value: string
  /** Revision of the transaction that created the key (since it last did not exist). */
  createRevision: number
  /** Revision of the transaction that last changed it. */
  modRevision: number
  /** Number of changes since creation (1 after creation). */
  version: number
  /** The lease the key is attached to, if any. */
  lease: string | undefined
}

export interface RangeResult {
  kvs: KeyValue[]
  /** Revision the snapshot was read at. */
  revision: number
}

/**
 * One condition of a transaction. With `prefix`, it must hold for every
 * key under `key` (and holds when there is none, compared with an absent
 * key's zeros), exactly as etcd compares over a range.
 */
export interface Compare {
  key: string
  prefix?: boolean
  target: 'mod' | 'create' | 'version'
  op: '==' | '<' | '>' | '!='
  value: number
}

export type TxnOp =
  | { type: 'put', key: string, value: string, lease?: string | undefined }
  | { type: 'delete', key: string, prefix?: boolean }

export interface TxnResult {
  succeeded: boolean
  /** Revision after the transaction (its own when it succeeded and changed something). */
  revision: number
}

export interface WatchEvent {
  type: 'put' | 'delete'
  key: string
  /** Revision of the change. */
  revision: number
}

export interface WatchHandlers {
  /** Changes, in revision order per key. */
  onEvents: (events: WatchEvent[]) => void
  /**
   * Events may have been missed (the backend reconnected, history was
   * compacted): the watcher must re-read what it depends on.
   */
  onReset?: () => void
}

export interface Watcher {
  close: () => Promise<void>
}

export interface Lease {
  readonly id: string
  readonly ttlSeconds: number
  /**
   * Renews the lease once. Resolves true when the backend confirmed it is
   * alive, false when it no longer exists (expired or revoked); rejects
   * when the backend could not be reached.
   */
  keepAlive: () => Promise<boolean>
  /** Ends the lease; every key attached to it goes. */
  revoke: () => Promise<void>
}

export interface CoreSupports {
  /** Transactions may touch keys of more than one shard. */
  crossShardTxn: boolean
  /** Leases expire by time (etcd); otherwise they live as long as the process that holds them (file). */
  timedLeases: boolean
}

export interface MetadataCore {
  readonly kind: string
  readonly supports: CoreSupports
  /** Where the data lives, for messages ("file /var/lib/ukai/metadata", "etcd http://..."). */
  readonly description: string
  range: (prefix: string) => Promise<RangeResult>
  get: (key: string) => Promise<KeyValue | undefined>
  txn: (compares: Compare[], ops: TxnOp[]) => Promise<TxnResult>
  watch: (prefix: string, handlers: WatchHandlers) => Promise<Watcher>
  grantLease: (ttlSeconds: number) => Promise<Lease>
  /** True while the lease (anyone's) is alive. */
  leaseAlive: (id: string) => Promise<boolean>
  /** Ends anyone's lease (a dead node's, on its restart). */
  revokeLease: (id: string) => Promise<void>
  close: () => Promise<void>
}

/** The shard of a key: its first two segments. */
export function shardOf (key: string): string {
  const i = key.indexOf('/')
  const j = i < 0 ? -1 : key.indexOf('/', i + 1)
  return j < 0 ? key : key.slice(0, j)
}

/** The value an absent key compares with: zero revisions, zero version. */
export function compareValue (kv: KeyValue | undefined, target: Compare['target']): number {
  if (kv === undefined) return 0
  return target === 'mod' ? kv.modRevision : target === 'create' ? kv.createRevision : kv.version
}

export function compareHolds (c: Compare, actual: number): boolean {
  switch (c.op) {
    case '==': return actual === c.value
    case '!=': return actual !== c.value
    case '<': return actual < c.value
    case '>': return actual > c.value
  }
}

/** True when `c` holds over `kvs` (the keys it names: one, or every key under a prefix). */
export function compareMatches (c: Compare, kvs: KeyValue[]): boolean {
  if (kvs.length === 0) return compareHolds(c, 0)
  return kvs.every((kv) => compareHolds(c, compareValue(kv, c.target)))
}
