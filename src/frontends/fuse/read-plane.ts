/**
 * One open image on the native FUSE plane: which of its blocks the
 * addon may read from this node's block files by itself, and its reads
 * folded into the image's statistics.
 *
 * The volume tells the plane, in the same tick as each change, the
 * blocks chooseReader would read locally (Volume.attachReadPlane). New
 * blocks are granted; blocks that left the set are revoked at once (no
 * native read of them starts after update returns) and drained (the
 * returned promise resolves when the native reads of them under way have
 * finished), and the volume waits for that drain before the change
 * counts. So a read the addon serves by itself either started while the
 * local copy was one TypeScript would have read, or finished before the
 * write that made it stale was acknowledged: never stale data after an
 * acknowledgement.
 */
import { RangeSet } from '../../metadata/range-set.js'
import type { IoStats, LocalReadPlane, Volume } from '../../volume/volume.js'
import type { FuseAddon } from './native-addon.js'

export interface BlockFiles {
  /** The image's directory of block files on this node. */
  dir: string
  prefix: string
  width: number
  suffix: string
}

function rangesOf (set: RangeSet): Float64Array {
  const out: number[] = []
  for (const [s, e] of set.ranges()) out.push(s, e)
  return Float64Array.from(out)
}

export class ImageReadPlane implements LocalReadPlane {
  readonly slot: number
  readonly volume: Volume
  private readonly addon: FuseAddon
  private granted = new RangeSet()
  private usedSize: number
  private readonly detach: () => void
  private readonly stats: IoStats
  private closed = false

  constructor (addon: FuseAddon, volume: Volume, files: BlockFiles) {
    this.addon = addon
    this.volume = volume
    this.usedSize = volume.usedSize
    this.slot = addon.registerImage(files.dir, files.prefix, files.width, files.suffix, volume.blockSize, volume.meta.blockCount, volume.usedSize)
    this.stats = volume.stats
    // One plane per image at a time (native-mount.ts): the image's stats fold its reads in when read.
    this.stats.collect = this.collect
    this.detach = volume.attachReadPlane(this)
  }

  update (readable: RangeSet, usedSize: number): Promise<void> | undefined {
    if (this.closed) return undefined
    if (usedSize !== this.usedSize) {
      this.usedSize = usedSize
      this.addon.setUsedSize(this.slot, usedSize)
    }
    const lost = this.granted.clone().removeSet(readable)
    const gained = readable.clone().removeSet(this.granted)
    this.granted = readable.clone()
    if (!gained.isEmpty) this.addon.grant(this.slot, rangesOf(gained))
    if (lost.isEmpty) return undefined
    const ranges = rangesOf(lost)
    this.addon.revoke(this.slot, ranges)
    return this.addon.drain(this.slot, ranges)
  }

  private readonly collect = (): void => { if (!this.closed) this.fold(this.addon.takeCounters(this.slot)) }

  /** Native reads, into the image's counters (hypervisor reads and this node's replica reads). */
  private fold (counters: Float64Array): void {
    const [reads, bytes, pieces, seconds] = counters as unknown as [number, number, number, number]
    if (reads === 0) return
    const st = this.stats
    st.reads += reads
    st.bytesRead += bytes
    const location = this.volume.localLocation()
    if (location === undefined) return
    st.readsFrom[location] = (st.readsFrom[location] ?? 0) + pieces
    const io = st.replicas[location] ??= { local: true, reads: 0, readBytes: 0, readSeconds: 0, writes: 0, writtenBytes: 0, writeSeconds: 0 }
    io.reads += pieces
    io.readBytes += bytes
    io.readSeconds += seconds
  }

  /** Ends the plane of this image: no native read of it from now on; resolves once none is under way. */
  async close (): Promise<void> {
    if (this.closed) return
    this.detach()
    this.fold(this.addon.takeCounters(this.slot))
    this.closed = true
    if (this.stats.collect === this.collect) delete this.stats.collect
    // What reads under way until now add comes with the unregistration.
    this.fold(await this.addon.unregisterImage(this.slot))
  }
}
