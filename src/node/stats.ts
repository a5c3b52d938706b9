/**
 * What `GET /v1/images/NAME/stats` and `ukai stats` show: one image's I/O
 * on this node since it started (the Volume's IoStats), with the state of
 * each location from the metadata (blocks placed, out of sync) and the
 * progress of a sync this node runs or ran last.
 *
 * Counts are per replica request: a read or write of one block's piece on
 * one location. A hypervisor's request that spans two blocks is one read
 * (`reads`) and two replica reads; a write to a block with two in-sync
 * replicas is one write and two replica writes.
 */
import type { ImageMeta } from '../metadata/image.js'
import type { IoStats, ReplicaIo } from '../volume/volume.js'
import type { NodeErrors } from '../volume/node-errors.js'

/** A location in this node's error state (GET /v1/nodes/errors): skipped until retry_after. */
export interface NodeErrorReport {
  location: string
  reason: string
  since: string
  retry_after: string
}

export function errorReport (errors: NodeErrors): NodeErrorReport[] {
  return errors.list().map((e) => ({
    location: e.location,
    reason: e.reason,
    since: new Date(e.since).toISOString(),
    retry_after: new Date(e.retryAfter).toISOString()
  }))
}

/** A sync of an image on this node: the latest progress of the one running, or of the last one. */
export interface SyncStatus {
  running: boolean
  /** Blocks with an out-of-sync replica in the range when the sync began. */
  blocks: number
  done: number
  bytes: number
  failed: number
  started: string
  ended?: string
}

export interface LocationStats {
  /** True for this node's own replica. */
  local: boolean
  /** Blocks the metadata places there. */
  blocks: number
  out_of_sync_blocks: number
  reads: number
  read_bytes: number
  /** Seconds all those reads took, added up (mean latency: read_seconds / reads). */
  read_seconds: number
  writes: number
  written_bytes: number
  write_seconds: number
}

export interface ImageStats {
  image: string
  node: string
  /** Hypervisor requests (NBD, FUSE) and their bytes. */
  reads: number
  writes: number
  bytesRead: number
  bytesWritten: number
  /** Replica reads per location (the first form of this answer, kept). */
  readsFrom: Record<string, number>
  reads_local: number
  reads_remote: number
  read_bytes_local: number
  read_bytes_remote: number
  out_of_sync_blocks: number
  /** Requests other nodes made of this node's replica (peer protocol): a copy's reads from here, a writer's replicated writes. */
  peer_reads: number
  peer_read_bytes: number
  peer_writes: number
  peer_written_bytes: number
  peer_status_requests: number
  locations: Record<string, LocationStats>
  sync: SyncStatus | null
}

const noIo = (local: boolean): ReplicaIo => ({ local, reads: 0, readBytes: 0, readSeconds: 0, writes: 0, writtenBytes: 0, writeSeconds: 0 })

/**
 * The stats answer. `isLocal` tells this node's own location (for one
 * that served nothing yet); `meta` is undefined for an image this node
 * does not know any more.
 */
export function imageStats (node: string, name: string, io: IoStats, meta: ImageMeta | undefined, sync: SyncStatus | undefined,
  isLocal: (location: string) => boolean): ImageStats {
  const locations: Record<string, LocationStats> = {}
  const names = new Set([...(meta?.locations.keys() ?? []), ...Object.keys(io.replicas)])
  let outOfSync = 0
  const totals = { reads_local: 0, reads_remote: 0, read_bytes_local: 0, read_bytes_remote: 0 }
  for (const loc of names) {
    const st = meta?.locations.get(loc)
    const r = io.replicas[loc] ?? noIo(isLocal(loc))
    const oos = st?.outOfSync.size ?? 0
    outOfSync += oos
    locations[loc] = {
      local: r.local,
      blocks: st?.blocks.size ?? 0,
      out_of_sync_blocks: oos,
      reads: r.reads,
      read_bytes: r.readBytes,
      read_seconds: r.readSeconds,
      writes: r.writes,
      written_bytes: r.writtenBytes,
      write_seconds: r.writeSeconds
    }
    if (r.local) { totals.reads_local += r.reads; totals.read_bytes_local += r.readBytes } else { totals.reads_remote += r.reads; totals.read_bytes_remote += r.readBytes }
  }
  return {
    image: name,
    node,
    reads: io.reads,
    writes: io.writes,
    bytesRead: io.bytesRead,
    bytesWritten: io.bytesWritten,
    readsFrom: { ...io.readsFrom },
    ...totals,
    out_of_sync_blocks: outOfSync,
    peer_reads: io.served.reads,
    peer_read_bytes: io.served.readBytes,
    peer_writes: io.served.writes,
    peer_written_bytes: io.served.writtenBytes,
    peer_status_requests: io.served.statusRequests,
    locations,
    sync: sync === undefined ? null : { ...sync }
  }
}
