/**
 * This node's membership of the cluster: its registration under a lease
 * of its own, kept alive while the node runs.
 *
 * - One process per node id. A second process with the id of a live node
 *   is refused before it touches any state (UKAI_ERR_NODE_ID_IN_USE,
 *   exit code 11). The registration of an earlier run of this node on
 *   this machine (same host, same control port, which was free a moment
 *   ago, so nobody listens on it) is recognised as dead and its lease
 *   ended at once; a registration from elsewhere may be a node that died
 *   less than a lease ago, so it is waited out for one lease before the
 *   start is refused.
 * - Fail-stop: on etcd the lease is renewed every third of its TTL, and
 *   the node counts its lease as valid only until one TTL (less a margin)
 *   after the last renewal it sent that etcd confirmed. A writer stops
 *   writing when its lease is not known to be valid, before etcd can give
 *   the image to another node. The file store's leases live as long as
 *   the process, so they are always valid.
 * - A lease etcd no longer has (expired while the node could not reach
 *   it) is 'lost': the node's writer sessions are fenced, and the node
 *   registers again under a new lease.
 */
import { EventEmitter } from 'node:events'
import { hostname } from 'node:os'
import type { Config } from '../config/config.js'
import { UkaiError } from '../errors.js'
import type { Lease } from '../metadata/core.js'
import type { MetadataStore, NodeAlive, NodeInfo } from '../metadata/store.js'

/** Part of the TTL kept as a margin against clock drift and slow answers. */
const MARGIN = 0.25

export class NodeMembership extends EventEmitter {
  private readonly store: MetadataStore
  private readonly config: Config
  private readonly info: NodeInfo
  lease: Lease
  alive: NodeAlive
  /** Until when (ms since the epoch) the lease is known to be valid. */
  validUntil: number
  private timer: NodeJS.Timeout | undefined
  private closed = false
  private readonly waiters = new Set<() => void>()

  private constructor (store: MetadataStore, config: Config, info: NodeInfo, lease: Lease, alive: NodeAlive, sentAt: number) {
    super()
    this.store = store
    this.config = config
    this.info = info
    this.lease = lease
    this.alive = alive
    this.validUntil = this.validity(sentAt)
  }

  /** Registers this node (see the module comment); throws UKAI_ERR_NODE_ID_IN_USE for a live duplicate. */
  static async join (store: MetadataStore, config: Config, log: (m: string) => void = () => {}): Promise<NodeMembership> {
    const info: NodeInfo = { id: config.id, control_address: config.control_address, control_port: config.control_port, started: new Date().toISOString() }
    const sentAt = Date.now()
    const lease = await store.grantLease(config.lease_ttl)
    try {
      const alive = await NodeMembership.register(store, config, info, lease, log)
      const m = new NodeMembership(store, config, info, lease, alive, sentAt)
      m.schedule()
      return m
    } catch (err) {
      await lease.revoke().catch(() => {})
      throw err
    }
  }

  private static async register (store: MetadataStore, config: Config, info: NodeInfo, lease: Lease, log: (m: string) => void): Promise<NodeAlive> {
    const deadline = Date.now() + (config.lease_ttl + 2) * 1000
    let waiting = false
    for (;;) {
      const r = await store.registerNode(info, lease)
      if (r.registered) return r.alive
      const h = r.holder
      if (h.lease === lease.id) return h
      if (h.host === hostname() && h.control_port === config.control_port && h.control_address === config.control_address) {
        // An earlier run of this node on this machine: its control port was
        // free when this one started, so that process is gone.
        log(`the registration of an earlier run of node ${config.id} (pid ${h.pid}) is left over; ending it`)
        await store.revokeLease(h.lease).catch(() => {})
        continue
      }
      if (!store.core.supports.timedLeases || Date.now() > deadline) {
        throw new UkaiError('UKAI_ERR_NODE_ID_IN_USE',
          `node id ${config.id} is in use by a running node (pid ${h.pid} on host ${h.host}, control API ${h.control_address}:${h.control_port}, started ${h.started}); ` +
          'give this node its own id (config key "id"), or stop the other one', { id: config.id })
      }
      if (!waiting) {
        waiting = true
        log(`node id ${config.id} is registered by pid ${h.pid} on host ${h.host}; waiting up to ${config.lease_ttl + 2} s for that registration to expire`)
      }
      await new Promise((resolve) => setTimeout(resolve, 500))
    }
  }

  get leaseId (): string { return this.lease.id }
  get ttlMs (): number { return this.config.lease_ttl * 1000 }

  private validity (sentAt: number): number {
    return this.store.core.supports.timedLeases ? sentAt + this.ttlMs * (1 - MARGIN) : Number.POSITIVE_INFINITY
  }

  /** True while the lease is known to be valid (a writer may write). */
  get valid (): boolean { return Date.now() < this.validUntil }

  /**
   * Resolves once the lease is known to be valid; fails after `timeoutMs`
   * (the writer then fails its write rather than risk a second writer).
   */
  async waitValid (timeoutMs: number): Promise<void> {
    if (this.valid) return
    await new Promise<void>((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer)
        this.waiters.delete(done)
        resolve()
      }
      const timer = setTimeout(() => {
        this.waiters.delete(done)
        reject(new UkaiError('UKAI_ERR_METADATA_UNAVAILABLE',
          `node ${this.config.id} could not renew its lease with the metadata store (${this.store.description}); writes stop until it can`))
      }, timeoutMs)
      this.waiters.add(done)
    })
  }

  private schedule (): void {
    if (this.closed || !this.store.core.supports.timedLeases) return
    this.timer = setTimeout(() => { void this.renew() }, Math.max(200, this.ttlMs / 3))
    this.timer.unref()
  }

  private async renew (): Promise<void> {
    const sentAt = Date.now()
    try {
      if (await this.lease.keepAlive()) {
        this.validUntil = this.validity(sentAt)
        for (const w of [...this.waiters]) w()
      } else {
        await this.rejoin()
      }
    } catch {
      // Unreachable: try again soon; the lease stays valid until validUntil.
      if (!this.closed) {
        this.timer = setTimeout(() => { void this.renew() }, 500)
        this.timer.unref()
      }
      return
    }
    this.schedule()
  }

  /** The lease is gone: everything on it went with it. Register again under a new one. */
  private async rejoin (): Promise<void> {
    this.validUntil = 0
    this.emit('lost')
    const sentAt = Date.now()
    const lease = await this.store.grantLease(this.config.lease_ttl)
    try {
      this.alive = await NodeMembership.register(this.store, this.config, this.info, lease, () => {})
    } catch (err) {
      await lease.revoke().catch(() => {})
      throw err
    }
    this.lease = lease
    this.validUntil = this.validity(sentAt)
    for (const w of [...this.waiters]) w()
    this.emit('rejoined')
  }

  /** Leaves the cluster: the lease ends, and with it everything on it (open images, writer leases). */
  async close (): Promise<void> {
    if (this.closed) return
    this.closed = true
    clearTimeout(this.timer)
    await this.lease.revoke().catch(() => {})
  }
}
