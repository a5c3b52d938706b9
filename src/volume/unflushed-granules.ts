/**
 * The granules (GRANULE-sized pieces of the image) written to one location
 * since its last flush, kept per block: what a location that stopped
 * answering may have lost with its page cache, for its fine records
 * (volume.ts, recordFailures).
 *
 * Per block, not one set for the image: random small writes make many
 * ranges, and one sorted array of them costs an insertion into the middle
 * of a long array per write (RangeSet.add was 10-15% of the node's JS
 * thread under random 4 KiB writes, in every in-sync location's set). A
 * block's set stays short, and what recordFailures asks for (one block's
 * granules) is a lookup.
 */
import type { Range } from '../metadata/range-set.js'
import { RangeSet } from '../metadata/range-set.js'

export class UnflushedGranules {
  private readonly blocks = new Map<number, RangeSet>()
  private ranges = 0
  private readonly limit: number

  /** `limit`: ranges kept in all, beyond which `add` says the set is too large to be worth keeping. */
  constructor (limit: number) {
    this.limit = limit
  }

  /** Adds granules [start, end) written to `block`; false once more than the limit of ranges are held. */
  add (block: number, [start, end]: Range): boolean {
    let set = this.blocks.get(block)
    if (set === undefined) { set = new RangeSet(); this.blocks.set(block, set) }
    const before = set.rangeCount
    set.add(start, end)
    this.ranges += set.rangeCount - before
    return this.ranges <= this.limit
  }

  /** The granules written to `block` (a copy; empty when none). */
  of (block: number): RangeSet {
    return this.blocks.get(block)?.clone() ?? new RangeSet()
  }

  /** Forgets what was written to `block`. */
  drop (block: number): void {
    const set = this.blocks.get(block)
    if (set === undefined) return
    this.ranges -= set.rangeCount
    this.blocks.delete(block)
  }

  /** Ranges held, all blocks together. */
  get rangeCount (): number { return this.ranges }
}
