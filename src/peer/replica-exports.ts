/**
 * The peer side of the peer protocol: this node's replicas served as NBD
 * exports on the proxy port, so other nodes reach this node's block files
 * with the same NBD server code that serves hypervisors. An export's byte
 * offsets are the image's; every request is checked against the blocks
 * this node holds in the image's metadata, so a peer with a stale view
 * can never scatter data where it does not belong. The I/O goes straight
 * to the block store, never through a Volume (a replica is not replicated
 * again).
 *
 * `replica/<image>` is read-only. Writes come through
 * `replica/<image>@<generation>`, the export of one writer generation:
 * opening it is refused unless the metadata store says that generation
 * holds the image's writer lease now, and every write passes this node's
 * fence (fences.ts), so a writer that was taken over from cannot write
 * here once the new one has fenced this node or connected to it.
 *
 * Over TLS (config key tls_dir) every connection shows a node certificate
 * of the cluster CA, and a writer generation's export opens only for the
 * node that holds that generation: no other node, and no client at all,
 * can write a replica behind the writer's dirty log and out-of-sync
 * marking.
 */
import { UkaiError, imageNotFound } from '../errors.js'
import type { BlockStore, DiscardMode } from '../blockstore/block-store.js'
import { incarnationOf } from '../node/images.js'
import type { ExportInfo, ExportProvider, NbdBackend, OpenExport } from '../frontends/nbd/exports.js'
import type { ImageMeta, LocationState } from '../metadata/image.js'
import type { UkaiNode } from '../node/node.js'
import { splitRange, type Piece } from '../volume/block-math.js'
import type { Extent } from '../volume/volume.js'
import { parseReplicaExport } from './remote-replica.js'
import { allSettledOrThrow } from '../util/settle.js'
import type { PeerIdentity } from '../tls/identity.js'

export class ReplicaExports implements ExportProvider {
  private readonly node: UkaiNode

  constructor (node: UkaiNode) {
    this.node = node
  }

  /** Replica exports are not listed: peers know what they ask for. */
  list (): string[] { return [] }

  private held (name: string): { image: string, generation: number | undefined, epoch: number, meta: ImageMeta, here: LocationState } | undefined {
    const parsed = parseReplicaExport(name)
    if (parsed === undefined) return undefined
    const { image, generation, epoch } = parsed
    const meta = this.node.imageMeta(image)
    if (meta === undefined) return undefined
    const here = this.node.placedHere(meta)
    return here === undefined ? undefined : { image, generation, epoch, meta, here }
  }

  describe (name: string): ExportInfo | undefined {
    const h = this.held(name)
    return h === undefined ? undefined : { size: h.meta.size, readOnly: h.generation === undefined }
  }

  async open (name: string, _who: string, peer?: PeerIdentity): Promise<OpenExport> {
    // Over TLS, only the cluster's nodes: a hypervisor's client certificate is for the NBD export.
    if (this.node.tls !== undefined && peer?.role !== 'node') {
      throw new UkaiError('UKAI_ERR_PERMISSION', `the peer port serves only nodes of this cluster, and the client's certificate is ${peer === undefined ? 'missing' : `${peer.role} ${peer.name}'s`}`)
    }
    const h = this.held(name)
    if (h === undefined) throw imageNotFound(name)
    // What this node knows of the image (its watch keeps it current): a
    // reader's open needs no metadata store, so reads go on while it is away.
    let incarnation = this.node.incarnationOf(h.image)
    if (h.generation !== undefined) {
      // Only the writer the metadata store names now may write here.
      const st = await this.node.store.requireState(h.image)
      incarnation = incarnationOf(st)
      if (st.writer === undefined || st.writer.generation !== h.generation) {
        throw new UkaiError('UKAI_ERR_FENCED',
          `image '${h.image}': writer generation ${h.generation} does not hold the writer lease (${st.writer === undefined ? 'nobody does' : `generation ${st.writer.generation} of node ${st.writer.node} does`})`)
      }
      // And only from that writer's node, as its certificate proves.
      if (peer !== undefined && !this.node.sameNode(peer.name, st.writer.node)) {
        throw new UkaiError('UKAI_ERR_FENCED',
          `image '${h.image}': node ${peer.name} asked to write as generation ${h.generation}, which is node ${st.writer.node}'s`)
      }
      // The writer's new epoch: its earlier connections' writes are refused from now on.
      await this.node.fences.raise(h.image, h.generation, h.epoch)
    }
    // A missing replica is never made up here (it would read as zeros for
    // blocks the metadata says are in sync): the peer's request fails, and
    // the writer marks what it writes out of sync; reads go elsewhere.
    if (!await this.node.blocks.has(h.image)) {
      throw new UkaiError('UKAI_ERR_NOT_FOUND', `the replica of image '${h.image}' on node ${this.node.config.id} is missing (${this.node.blocks.imageDir(h.image)})`)
    }
    // Never another image's files under this name (one destroyed while this node was away).
    if (incarnation !== undefined) await this.node.images.bindLocal(h.image, incarnation, false)
    return {
      name,
      size: h.meta.size,
      readOnly: h.generation === undefined,
      backend: new ReplicaBackend(this.node, h.image, h.generation ?? 0, h.epoch),
      close: async () => {}
    }
  }
}

class ReplicaBackend implements NbdBackend {
  private readonly node: UkaiNode
  private readonly blocks: BlockStore
  private readonly image: string
  /** The writer generation (0: read-only) and epoch this connection writes for. */
  private readonly generation: number
  private readonly epoch: number

  constructor (node: UkaiNode, image: string, generation: number, epoch: number) {
    this.node = node
    this.blocks = node.blocks
    this.image = image
    this.generation = generation
    this.epoch = epoch
  }

  /** Runs a write of this connection's generation and epoch through the fence. */
  private async fenced<T> (fn: () => Promise<T>): Promise<T> {
    const leave = this.node.fences.enter(this.image, this.generation, this.epoch)
    try { return await fn() } finally { leave() }
  }

  get blockSize (): number { return this.meta().blockSize }

  /** The image's current metadata; it may change while a peer is connected. */
  private meta (): ImageMeta {
    const meta = this.node.imageMeta(this.image)
    if (meta === undefined) throw imageNotFound(this.image)
    return meta
  }

  /**
   * Pieces of a request, each checked to be a block this node holds; for
   * a read (or block status), one this node is not leaving either
   * (LeavingReplicas): the reader goes to another copy.
   */
  private pieces (offset: number, length: number, reading = false): Piece[] {
    const meta = this.meta()
    const pieces = splitRange(offset, length, meta.blockSize, meta.size)
    const here = this.node.placedHere(meta)
    for (const p of pieces) {
      if (here === undefined || !here.blocks.has(p.block)) {
        throw new UkaiError('UKAI_ERR_PERMISSION', `block ${p.block} of image '${this.image}' is not placed on this node`)
      }
      if (reading && this.node.leaving.has(this.image, p.block, meta.revision)) {
        throw new UkaiError('UKAI_ERR_PERMISSION', `block ${p.block} of image '${this.image}' is being removed from this node; read another replica`)
      }
    }
    return pieces
  }

  async read (offset: number, buf: Buffer): Promise<number> {
    const pieces = this.pieces(offset, buf.length, true)
    await allSettledOrThrow(pieces.map(async (p) =>
      await this.blocks.read(this.image, p.block, p.offset, buf.subarray(p.bufferOffset, p.bufferOffset + p.length))))
    const served = this.node.ioStatsOf(this.image).served
    served.reads++
    served.readBytes += buf.length
    return pieces.reduce((n, p) => n + p.length, 0)
  }

  /** `released` (NbdBackend.write): called once every piece is written; not after a failure. */
  async write (offset: number, data: Buffer, released?: () => void): Promise<void> {
    await this.fenced(async () => await allSettledOrThrow(this.pieces(offset, data.length).map(async (p) =>
      await this.blocks.write(this.image, p.block, p.offset, data.subarray(p.bufferOffset, p.bufferOffset + p.length)))))
    const served = this.node.ioStatsOf(this.image).served
    served.writes++
    served.writtenBytes += data.length
    released?.()
  }

  async flush (): Promise<void> {
    await this.blocks.flush(this.image)
  }

  private async discard (offset: number, length: number, mode: DiscardMode): Promise<void> {
    await this.fenced(async () => await allSettledOrThrow(this.pieces(offset, length).map(async (p) =>
      await this.blocks.discard(this.image, p.block, p.offset, p.length, mode))))
  }

  async trim (offset: number, length: number): Promise<void> {
    await this.discard(offset, length, 'trim')
  }

  async zero (offset: number, length: number, mayFree: boolean): Promise<void> {
    await this.discard(offset, length, mayFree ? 'zero' : 'zero-allocated')
  }

  async extents (offset: number, length: number): Promise<Extent[]> {
    this.node.ioStatsOf(this.image).served.statusRequests++
    const out: Extent[] = []
    for (const p of this.pieces(offset, length, true)) {
      const base = offset + p.bufferOffset - p.offset
      let at = p.offset
      for (const [s, e] of await this.blocks.dataExtents(this.image, p.block, p.offset, p.offset + p.length)) {
        if (s > at) out.push({ offset: base + at, length: s - at, hole: true, zero: true })
        out.push({ offset: base + s, length: e - s, hole: false, zero: false })
        at = e
      }
      if (at < p.offset + p.length) out.push({ offset: base + at, length: p.offset + p.length - at, hole: true, zero: true })
    }
    return out
  }

  /** Zeroing is fast only where it cuts a file's tail; say no otherwise. */
  async zeroIsFast (): Promise<boolean> {
    return false
  }
}
