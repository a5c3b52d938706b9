/**
 * Block ranges of this node's replicas that it no longer lets anyone read,
 * ahead of their removal from the metadata (UkaiNode.removeLocation).
 *
 * Once a removal is stored, the writer, wherever it runs, stops writing
 * the replica; a node that reads it over the network learns of the
 * removal only when its own watch (or the writer's push) catches up. So
 * the replica's node stops serving reads of the range *before* the
 * removal is stored: a peer's read of it is answered with an error, and
 * the reader goes to another in-sync copy (a read error answer never puts
 * a node in the error state). Writes still land, so the replica stays
 * current until the writer stops writing it. A range is forgotten once
 * this node holds the revision that removed it (its metadata then has no
 * such block here, and the peer export refuses it for that reason); a
 * removal that failed gives it back at once.
 */
import { RangeSet } from '../metadata/range-set.js'

interface Entry { blocks: RangeSet, until?: number }

export class LeavingReplicas {
  private readonly byImage = new Map<string, Entry[]>()

  /** Stops reads of blocks [start, end) of this node's replica of `image`. */
  leave (image: string, start: number, end: number): { removed: (revision: number) => void, cancel: () => void } {
    const entry: Entry = { blocks: RangeSet.of(start, end) }
    let list = this.byImage.get(image)
    if (list === undefined) { list = []; this.byImage.set(image, list) }
    list.push(entry)
    return {
      removed: (revision) => { entry.until = revision },
      cancel: () => { this.drop(image, entry) }
    }
  }

  /** True when block `block` of `image` is being left; `revision` is this node's view of the image. */
  has (image: string, block: number, revision: number): boolean {
    const list = this.byImage.get(image)
    if (list === undefined) return false
    for (const e of [...list]) if (e.until !== undefined && e.until <= revision) this.drop(image, e)
    return list.some((e) => e.blocks.has(block))
  }

  private drop (image: string, entry: Entry): void {
    const list = this.byImage.get(image)
    if (list === undefined) return
    const i = list.indexOf(entry)
    if (i >= 0) list.splice(i, 1)
    if (list.length === 0) this.byImage.delete(image)
  }
}
