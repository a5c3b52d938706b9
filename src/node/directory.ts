/**
 * The nodes of a cluster as they registered in the metadata store, and the
 * control API calls one node makes to another: allocate or destroy a
 * replica's block files, capacity, and an RTT probe. These calls are best
 * effort where the data path does not depend on them: a replica is also
 * allocated on a peer's first contact, and a node removes the block files
 * of an image destroyed elsewhere when it sees the metadata go.
 */
import type { Config } from '../config/config.js'
import { ControlClient } from '../control/client.js'
import { toUkaiError } from '../errors.js'
import { canonicalLocation } from '../metadata/names.js'
import type { MetadataStore, NodeRecord } from '../metadata/store.js'

export interface NodeStatus {
  id: string
  control: string
  started: string
  reachable: boolean
  /** Round trip of a control API probe from the asking node, ms. */
  rtt_ms?: number
  capacity?: { total: number, free: number, available: number }
  open_images?: string[]
  error?: string
}

/** How long a probe of another node may take. */
const PROBE_TIMEOUT_MS = 3000

export class NodeDirectory {
  private readonly config: Config
  private readonly store: MetadataStore

  constructor (config: Config, store: MetadataStore) {
    this.config = config
    this.store = store
  }

  async register (): Promise<void> {
    await this.store.putNode({
      id: this.config.id,
      control_address: this.config.control_address,
      control_port: this.config.control_port,
      started: new Date().toISOString()
    })
  }

  /** The registration of the node a location names, if it registered. */
  async find (location: string): Promise<NodeRecord | undefined> {
    const want = canonicalLocation(location, this.config.proxy_port)
    return (await this.store.listNodes()).find((n) => {
      try { return canonicalLocation(n.id, this.config.proxy_port) === want } catch { return false }
    })
  }

  private client (n: NodeRecord): ControlClient {
    return new ControlClient(n.control_address, n.control_port, PROBE_TIMEOUT_MS)
  }

  /**
   * Runs a replica call on the node a location names. Returns a warning
   * (not an error) when the node is not registered or does not answer.
   */
  async replicaCall (location: string, method: 'POST' | 'DELETE', image: string): Promise<string | undefined> {
    const n = await this.find(location)
    if (n === undefined) return `node ${location} has not registered; its replica of '${image}' is handled when it next sees the image`
    try {
      await this.client(n).call(method, `/v1/replicas/${encodeURIComponent(image)}`)
      return undefined
    } catch (err) {
      return `node ${location}: ${toUkaiError(err).message}`
    }
  }

  /** Every registered node with its capacity and the RTT of a probe. */
  async status (): Promise<NodeStatus[]> {
    return await Promise.all((await this.store.listNodes()).map(async (n) => {
      const base: NodeStatus = { id: n.id, control: `${n.control_address}:${n.control_port}`, started: n.started, reachable: false }
      const c = this.client(n)
      try {
        const t0 = performance.now()
        await c.call('GET', '/v1/ping')
        const rtt = performance.now() - t0
        const info = await c.call<{ capacity: NodeStatus['capacity'], open_images: string[] }>('GET', '/v1/node')
        return { ...base, reachable: true, rtt_ms: Math.round(rtt * 1000) / 1000, capacity: info.capacity, open_images: info.open_images }
      } catch (err) {
        return { ...base, error: toUkaiError(err).message }
      }
    }))
  }
}
