/**
 * This node's metrics in the Prometheus text format (`GET /metrics` on
 * the control port), with prom-client and a Registry of the node's own
 * (never the library's global one: two nodes in one process, as tests
 * run them, would mix their series).
 *
 * Counters and gauges are read at scrape time from what the node keeps
 * anyway (each image's IoStats, the metadata, the sync status, the error
 * state), so `/metrics` and `GET /v1/images/NAME/stats` always agree.
 * Only the latency histogram is fed as the I/O happens (IoStats.observe).
 * The list is in README.md ("Metrics") and docs/ARCHITECTURE.md.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'
import type { ImageStats } from './stats.js'

/** What the metrics read from the node at each scrape. */
export interface MetricsSource {
  readonly nodeId: string
  /** Stats of every image this node knows. */
  allStats: () => ImageStats[]
  /** Locations in the error state, as this node sees them. */
  errorLocations: () => string[]
  /** Registered nodes and whether each one's lease lives; undefined when the store cannot tell now. */
  nodes: () => Promise<Array<{ id: string, alive: boolean }> | undefined>
}

/** Replica request latency buckets, seconds: a local page-cache hit to a peer at its io_timeout. */
const LATENCY_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

export class NodeMetrics {
  readonly registry = new Registry()
  private readonly latency: Histogram<'image' | 'location' | 'op'>
  /** Label sets of the histogram per image, so a destroyed image's series go. */
  private readonly observed = new Map<string, Set<string>>()

  constructor (source: MetricsSource) {
    const registers = [this.registry]
    this.registry.setDefaultLabels({ node: source.nodeId })
    collectDefaultMetrics({ register: this.registry })

    // One scrape reads the stats once; every metric's collect() uses that read.
    let cached: { at: number, stats: ImageStats[] } | undefined
    const stats = (): ImageStats[] => {
      const now = Date.now()
      if (cached === undefined || now - cached.at > 100) cached = { at: now, stats: source.allStats() }
      return cached.stats
    }

    const perImage = (name: string, help: string, value: (s: ImageStats) => number): void => {
      new Counter({
        name, help, labelNames: ['image'], registers,
        collect () { this.reset(); for (const s of stats()) this.inc({ image: s.image }, value(s)) }
      })
    }
    perImage('ukai_image_hypervisor_reads_total', 'Reads hypervisors (NBD, FUSE) made of the image on this node', (s) => s.reads)
    perImage('ukai_image_hypervisor_writes_total', 'Writes hypervisors (NBD, FUSE) made to the image on this node', (s) => s.writes)
    perImage('ukai_image_hypervisor_read_bytes_total', 'Bytes hypervisors read from the image on this node', (s) => s.bytesRead)
    perImage('ukai_image_hypervisor_written_bytes_total', 'Bytes hypervisors wrote to the image on this node', (s) => s.bytesWritten)
    perImage('ukai_image_reads_local_total', "Replica reads this node's own replica served", (s) => s.reads_local)
    perImage('ukai_image_reads_remote_total', 'Replica reads another node served (over the peer protocol)', (s) => s.reads_remote)
    perImage('ukai_image_read_bytes_local_total', "Bytes this node's own replica served", (s) => s.read_bytes_local)
    perImage('ukai_image_read_bytes_remote_total', 'Bytes other nodes served', (s) => s.read_bytes_remote)
    perImage('ukai_image_peer_reads_total', "Reads other nodes made of this node's replica (peer protocol)", (s) => s.peer_reads)
    perImage('ukai_image_peer_read_bytes_total', "Bytes other nodes read from this node's replica", (s) => s.peer_read_bytes)
    perImage('ukai_image_peer_writes_total', "Writes other nodes made to this node's replica", (s) => s.peer_writes)
    perImage('ukai_image_peer_written_bytes_total', "Bytes other nodes wrote to this node's replica", (s) => s.peer_written_bytes)
    perImage('ukai_image_peer_status_requests_total', "Block status requests other nodes made of this node's replica", (s) => s.peer_status_requests)

    type L = 'image' | 'location'
    const perLocation = (kind: 'counter' | 'gauge', name: string, help: string, value: (l: ImageStats['locations'][string]) => number): void => {
      const collect = function (this: Counter<L> | Gauge<L>): void {
        this.reset()
        for (const s of stats()) {
          for (const [location, l] of Object.entries(s.locations)) {
            if (this instanceof Gauge) this.set({ image: s.image, location }, value(l))
            else this.inc({ image: s.image, location }, value(l))
          }
        }
      }
      if (kind === 'counter') new Counter<L>({ name, help, labelNames: ['image', 'location'], registers, collect })
      else new Gauge<L>({ name, help, labelNames: ['image', 'location'], registers, collect })
    }
    perLocation('counter', 'ukai_image_reads_total', 'Replica reads served by the location (one per block piece)', (l) => l.reads)
    perLocation('counter', 'ukai_image_read_bytes_total', 'Bytes the location served', (l) => l.read_bytes)
    perLocation('counter', 'ukai_image_writes_total', 'Replica writes the location took (one per block piece)', (l) => l.writes)
    perLocation('counter', 'ukai_image_written_bytes_total', 'Bytes the location took', (l) => l.written_bytes)
    perLocation('gauge', 'ukai_image_blocks', 'Blocks of the image the metadata places on the location', (l) => l.blocks)
    perLocation('gauge', 'ukai_image_out_of_sync_blocks', 'Blocks of the image out of sync on the location (from the metadata)', (l) => l.out_of_sync_blocks)

    const perSync = (name: string, help: string, value: (s: NonNullable<ImageStats['sync']>) => number): void => {
      new Gauge({
        name, help, labelNames: ['image'], registers,
        collect () { this.reset(); for (const s of stats()) if (s.sync !== null) this.set({ image: s.image }, value(s.sync)) }
      })
    }
    perSync('ukai_sync_running', '1 while this node syncs the image, 0 after (series only once a sync ran here)', (s) => s.running ? 1 : 0)
    perSync('ukai_sync_blocks_total', 'Blocks the running (or last) sync has to copy', (s) => s.blocks)
    perSync('ukai_sync_blocks_done', 'Blocks the running (or last) sync has done', (s) => s.done)
    perSync('ukai_sync_bytes_done', 'Bytes the running (or last) sync has copied', (s) => s.bytes)
    perSync('ukai_sync_blocks_failed', 'Replicas the running (or last) sync could not copy', (s) => s.failed)

    this.latency = new Histogram({
      name: 'ukai_replica_request_seconds',
      help: 'Latency of replica requests that succeeded, per location (op: read or write)',
      labelNames: ['image', 'location', 'op'],
      buckets: LATENCY_BUCKETS,
      registers,
      collect: () => this.dropGone(new Set(stats().map((s) => s.image)))
    })

    new Gauge({
      name: 'ukai_location_error',
      help: 'Locations in the error state, as this node sees them (skipped until retry_after)',
      labelNames: ['location'],
      registers,
      collect () { this.reset(); for (const location of source.errorLocations()) this.set({ location }, 1) }
    })
    new Gauge({
      name: 'ukai_node_up',
      help: "Registered nodes: 1 while the node's lease lives, 0 when it does not",
      labelNames: ['id'],
      registers,
      async collect () {
        const nodes = await source.nodes()
        if (nodes === undefined) return // the store is away: the last answer stands
        this.reset()
        for (const n of nodes) this.set({ id: n.id }, n.alive ? 1 : 0)
      }
    })
  }

  /** The histogram's feed for one image's IoStats.observe. */
  observer (image: string): (location: string, op: 'read' | 'write', seconds: number) => void {
    return (location, op, seconds) => {
      let set = this.observed.get(image)
      if (set === undefined) { set = new Set(); this.observed.set(image, set) }
      const key = `${location}\n${op}`
      if (!set.has(key)) set.add(key)
      this.latency.observe({ image, location, op }, seconds)
    }
  }

  /** Histogram series of images this node no longer knows go. */
  private dropGone (known: Set<string>): void {
    for (const [image, keys] of this.observed) {
      if (known.has(image)) continue
      for (const key of keys) {
        const [location, op] = key.split('\n') as [string, string]
        this.latency.remove({ image, location, op })
      }
      this.observed.delete(image)
    }
  }

  /** The scrape: text format 0.0.4. */
  async text (): Promise<{ contentType: string, body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() }
  }
}
