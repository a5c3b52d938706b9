/**
 * The nodes of a cluster as they registered in the metadata store, and the
 * control API calls one node makes to another: allocate or destroy a
 * replica's block files, fence an image after a writer takeover, make a
 * node apply a metadata change, capacity, and an RTT probe. Replica calls
 * are best effort where the data path does not depend on them: a replica
 * is also allocated on a peer's first contact, and a node removes the
 * block files of an image destroyed elsewhere when it sees the metadata go.
 */
import type { Config } from '../config/config.js'
import { ControlClient, controlTlsOf } from '../control/client.js'
import { UkaiError, toUkaiError } from '../errors.js'
import { canonicalLocation } from '../metadata/names.js'
import type { MetadataStore, NodeInfo } from '../metadata/store.js'
import { loadControlToken } from '../control/token.js'
import type { FenceReply } from './node.js'
import type { MoveResult } from './move.js'
import type { NodeStorage } from './storage.js'
import type { ImageStats, NodeErrorReport } from './stats.js'

export interface NodeStatus {
  id: string
  control: string
  started: string
  /** True while the node's lease lives (it runs and reaches the metadata store). */
  alive: boolean
  /** Process and host of the running node. */
  pid?: number
  host?: string
  /** True when this node's probe of its control API got an answer. */
  reachable: boolean
  /** Round trip of a control API probe from the asking node, ms. */
  rtt_ms?: number
  capacity?: { total: number, free: number, available: number }
  open_images?: string[]
  error?: string
}

/** What every node was asked (askEvery): who it is, whether it answered, why not. */
export interface NodeAnswer {
  id: string
  alive: boolean
  reachable: boolean
  error?: string
}

/** One registered node's storage report (storage.ts), or why there is none. */
export type NodeStorageStatus = Partial<NodeStorage> & NodeAnswer

/** One node's `GET /v1/stats`: its I/O of every image it knows and the locations it has in the error state. */
export interface NodeIoStats {
  node: string
  /** When the node read its counters, ms since the epoch (rates are differences over it). */
  time: number
  images: ImageStats[]
  errors: NodeErrorReport[]
}


/** How long a node may take to report its storage (it walks its image_root). */
const STORAGE_TIMEOUT_MS = 30_000

/** How long a probe of another node may take. */
const PROBE_TIMEOUT_MS = 3000

/**
 * How long this node's RTT measurements to its peers stand before a
 * request for them probes again (GET /v1/rtt): a dashboard refreshing
 * often, or many of them, costs at most one round of probes per node per
 * this period.
 */
export const RTT_FRESH_MS = 5000

/** This node's RTT to each registered node alive, ms, as it last measured them (GET /v1/rtt). */
export interface PeerRtt {
  node: string
  /** When the round of probes ended, ms since the epoch. */
  measured: number
  rtt_ms: Record<string, number>
  /** Nodes alive that did not answer the probe, and why. */
  errors: Record<string, string>
}

export class NodeDirectory {
  private readonly config: Config
  private readonly store: MetadataStore

  /** How long a round of RTT probes stands (RTT_FRESH_MS; tests shorten it). */
  rttFreshMs = RTT_FRESH_MS
  /** The last round of RTT probes (this node's or status()'s), and the round under way. */
  private lastRtt: PeerRtt | undefined
  private rttRound: Promise<PeerRtt> | undefined
  /** The cluster-wide RTT answer under way: concurrent GET /v1/nodes/rtt share it. */
  private matrix: Promise<Array<NodeAnswer & { rtt_ms?: Record<string, number> }>> | undefined
  /** Rounds of probes this node made for its RTT answer (a round probes every node alive once). */
  rttRounds = 0

  constructor (config: Config, store: MetadataStore) {
    this.config = config
    this.store = store
  }

  /** The registration of the node a location names, if it registered. */
  async find (location: string): Promise<NodeInfo | undefined> {
    const want = canonicalLocation(location, this.config.proxy_port)
    for (const n of await this.store.listNodes()) {
      try {
        if (canonicalLocation(n.info.id, this.config.proxy_port) === want) return n.info
      } catch {}
    }
    return undefined
  }

  private token: Promise<string> | undefined

  /** The cluster's control token (control/token.ts), read once. */
  async controlToken (): Promise<string> {
    this.token ??= loadControlToken(this.config, this.store)
    this.token.catch(() => { this.token = undefined })
    return await this.token
  }

  private async client (n: NodeInfo, timeoutMs = PROBE_TIMEOUT_MS): Promise<ControlClient> {
    return new ControlClient(n.control_address, n.control_port, timeoutMs, await this.controlToken(), controlTlsOf(this.config, n.id))
  }

  private async require (location: string): Promise<NodeInfo> {
    const n = await this.find(location)
    if (n === undefined) throw new UkaiError('UKAI_ERR_NOT_FOUND', `node ${location} has not registered`)
    return n
  }

  /**
   * Runs a replica call on the node a location names. Returns a warning
   * (not an error) when the node is not registered or does not answer.
   */
  async replicaCall (location: string, method: 'POST' | 'DELETE', image: string): Promise<string | undefined> {
    const n = await this.find(location)
    if (n === undefined) return `node ${location} has not registered; its replica of '${image}' is handled when it next sees the image`
    try {
      await (await this.client(n)).call(method, `/v1/replicas/${encodeURIComponent(image)}`)
      return undefined
    } catch (err) {
      return `node ${location}: ${toUkaiError(err).message}`
    }
  }

  /** Asks the node at `location` to refuse writes of generations older than `generation` of `image`. */
  async fence (location: string, image: string, generation: number, timeoutMs: number): Promise<FenceReply> {
    const n = await this.require(location)
    return await (await this.client(n, timeoutMs)).call<FenceReply>('POST', `/v1/images/${encodeURIComponent(image)}/fence`, { generation })
  }

  /** Asks the node at `location` to apply revision `revision` of `image` (or newer) before it answers. */
  async refresh (location: string, image: string, revision: number, timeoutMs: number): Promise<void> {
    const n = await this.require(location)
    await (await this.client(n, timeoutMs)).call('POST', `/v1/images/${encodeURIComponent(image)}/refresh`, { revision })
  }

  /**
   * Asks the node at `location` to remove its own location's blocks
   * [start, end) of `image` (it has the image open: it leaves its replica
   * before the removal is stored, UkaiNode.removeLocation).
   */
  async removeOwnLocation (location: string, image: string, start: number | undefined, end: number | undefined, timeoutMs: number): Promise<void> {
    const n = await this.require(location)
    // The API's END is inclusive.
    await (await this.client(n, timeoutMs)).call('DELETE', `/v1/images/${encodeURIComponent(image)}/locations`, { location, start, end: end === undefined ? undefined : end - 1 })
  }

  /** Asks the node `node` to cancel the move of `image` it runs (UkaiNode.cancelMove). */
  async cancelMove (node: string, image: string, timeoutMs: number): Promise<{ node: string, result?: MoveResult }> {
    const n = await this.require(node)
    return await (await this.client(n, timeoutMs)).call('DELETE', `/v1/images/${encodeURIComponent(image)}/move`)
  }

  /** Every registered node: alive from its lease; capacity and the RTT of a probe from the ones alive. */
  async status (): Promise<NodeStatus[]> {
    const round: PeerRtt = { node: this.config.id, measured: 0, rtt_ms: {}, errors: {} }
    const list = await Promise.all((await this.store.listNodes()).map(async ({ info, alive }) => {
      const base: NodeStatus = {
        id: info.id,
        control: `${info.control_address}:${info.control_port}`,
        started: alive?.started ?? info.started,
        alive: alive !== undefined,
        ...(alive !== undefined ? { pid: alive.pid, host: alive.host } : {}),
        reachable: false
      }
      if (alive === undefined) return base
      try {
        const c = await this.client(alive)
        const t0 = performance.now()
        await c.call('GET', '/v1/ping')
        const rtt = performance.now() - t0
        round.rtt_ms[info.id] = Math.round(rtt * 1000) / 1000
        const i = await c.call<{ capacity: NodeStatus['capacity'], open_images: string[] }>('GET', '/v1/node')
        return { ...base, reachable: true, rtt_ms: Math.round(rtt * 1000) / 1000, capacity: i.capacity, open_images: i.open_images }
      } catch (err) {
        const error = toUkaiError(err).message
        if (round.rtt_ms[info.id] === undefined) round.errors[info.id] = error
        return { ...base, error }
      }
    }))
    // Those probes are a round of RTT measurements too: GET /v1/rtt answers them while fresh.
    round.measured = Date.now()
    this.lastRtt = round
    return list
  }

  /**
   * This node's RTT to every registered node alive (itself included), ms:
   * the last round of probes while it is younger than rttFreshMs (its own
   * or status()'s), else a new round, which concurrent callers share. So
   * however often it is asked, a node probes each other node at most once
   * per rttFreshMs for it.
   */
  async recentRtt (): Promise<PeerRtt> {
    const last = this.lastRtt
    if (last !== undefined && Date.now() - last.measured < this.rttFreshMs) return last
    if (this.rttRound !== undefined) return await this.rttRound
    const round = this.probeRound()
    this.rttRound = round
    try {
      return await round
    } finally {
      this.rttRound = undefined
    }
  }

  /** One GET /v1/ping of every registered node alive, in parallel, each bounded by PROBE_TIMEOUT_MS. */
  private async probeRound (): Promise<PeerRtt> {
    this.rttRounds++
    const round: PeerRtt = { node: this.config.id, measured: 0, rtt_ms: {}, errors: {} }
    await Promise.all((await this.store.listNodes()).map(async ({ info, alive }) => {
      if (alive === undefined) return
      try {
        const c = await this.client(alive)
        const t0 = performance.now()
        await c.call('GET', '/v1/ping')
        round.rtt_ms[info.id] = Math.round((performance.now() - t0) * 1000) / 1000
      } catch (err) {
        round.errors[info.id] = toUkaiError(err).message
      }
    }))
    round.measured = Date.now()
    this.lastRtt = round
    return round
  }

  /** Every registered node's storage report, asked of each node that is alive (GET /v1/storage). */
  async storage (): Promise<NodeStorageStatus[]> {
    return await this.askEach('/v1/storage', STORAGE_TIMEOUT_MS, (report: NodeStorage) => report)
  }

  /** Every registered node's I/O statistics of every image it knows, and its error state (GET /v1/stats). */
  async stats (): Promise<Array<NodeAnswer & Partial<NodeIoStats>>> {
    return await this.askEach('/v1/stats', PROBE_TIMEOUT_MS, (report: NodeIoStats) => report)
  }

  /**
   * The RTT from every node that is alive to every other, ms: each one's
   * recent measurements (GET /v1/rtt, recentRtt), so a request costs one
   * call per node and no new probes while they are fresh; concurrent
   * requests share one answer.
   */
  async rtt (): Promise<Array<NodeAnswer & { rtt_ms?: Record<string, number> }>> {
    if (this.matrix !== undefined) return await this.matrix
    // A node probes the others in parallel, each probe bounded by PROBE_TIMEOUT_MS.
    const matrix = this.askEvery(2 * PROBE_TIMEOUT_MS, async (c) => {
      try {
        return { rtt_ms: (await c.call<PeerRtt>('GET', '/v1/rtt')).rtt_ms }
      } catch (err) {
        if (toUkaiError(err).code !== 'UKAI_ERR_NOT_FOUND') throw err
        // A node of an earlier version, without /v1/rtt: its probes of every node, as before.
        const list = await c.call<NodeStatus[]>('GET', '/v1/nodes')
        return { rtt_ms: Object.fromEntries(list.filter((n) => n.rtt_ms !== undefined).map((n) => [n.id, n.rtt_ms!])) }
      }
    })
    this.matrix = matrix
    try {
      return await matrix
    } finally {
      this.matrix = undefined
    }
  }

  /** `GET path` of every registered node that is alive, each answer through `pick`; why not, for the others. */
  private async askEach<T, R extends object> (path: string, timeoutMs: number, pick: (answer: T) => R): Promise<Array<NodeAnswer & Partial<R>>> {
    return await this.askEvery(timeoutMs, async (c) => pick(await c.call<T>('GET', path)))
  }

  /** `ask` of every registered node that is alive; why not, for the others. */
  private async askEvery<R extends object> (timeoutMs: number, ask: (client: ControlClient) => Promise<R>): Promise<Array<NodeAnswer & Partial<R>>> {
    return await Promise.all((await this.store.listNodes()).map(async ({ info, alive }) => {
      const base: NodeAnswer = { id: info.id, alive: alive !== undefined, reachable: false }
      if (alive === undefined) return { ...base, error: 'not alive (its lease ended: the node is down)' } as NodeAnswer & Partial<R>
      try {
        const answer = await ask(await this.client(alive, timeoutMs))
        return { ...base, ...answer, id: info.id, reachable: true }
      } catch (err) {
        return { ...base, error: toUkaiError(err).message } as NodeAnswer & Partial<R>
      }
    }))
  }
}
