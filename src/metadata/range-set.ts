/**
 * A set of block indexes kept as sorted, disjoint, non-adjacent half-open
 * ranges [start, end). This is how placement and sync state are stored:
 * a uniform 1 TiB image costs one range per location, not one object per
 * block (DESIGN.md, metadata/).
 */
export type Range = [start: number, end: number]

export class RangeSet {
  // Flat [s0, e0, s1, e1, ...], sorted, with e_i < s_{i+1} (never touching).
  private r: number[]

  constructor (ranges: Iterable<Range> = []) {
    this.r = []
    for (const [s, e] of ranges) this.add(s, e)
  }

  static of (start: number, end: number): RangeSet {
    const set = new RangeSet()
    set.add(start, end)
    return set
  }

  clone (): RangeSet {
    const c = new RangeSet()
    c.r = this.r.slice()
    return c
  }

  get isEmpty (): boolean { return this.r.length === 0 }

  /** Number of block indexes in the set. */
  get size (): number {
    let n = 0
    for (let i = 0; i < this.r.length; i += 2) n += this.r[i + 1]! - this.r[i]!
    return n
  }

  /** Index of the first range whose end is > x (binary search over pairs). */
  private firstEndAbove (x: number): number {
    let lo = 0
    let hi = this.r.length / 2
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      if (this.r[mid * 2 + 1]! > x) hi = mid
      else lo = mid + 1
    }
    return lo
  }

  has (x: number): boolean {
    const i = this.firstEndAbove(x)
    return i < this.r.length / 2 && this.r[i * 2]! <= x
  }

  /** True when every index of [start, end) is in the set. */
  covers (start: number, end: number): boolean {
    if (start >= end) return true
    const i = this.firstEndAbove(start)
    return i < this.r.length / 2 && this.r[i * 2]! <= start && this.r[i * 2 + 1]! >= end
  }

  /** True when some index of [start, end) is in the set. */
  overlaps (start: number, end: number): boolean {
    if (start >= end) return false
    const i = this.firstEndAbove(start)
    return i < this.r.length / 2 && this.r[i * 2]! < end
  }

  add (start: number, end: number): this {
    checkRange(start, end)
    if (start === end) return this
    // Ranges that touch or overlap [start, end) merge with it.
    const i = this.firstEndAbove(start - 1) // first range with end >= start
    let j = i
    let s = start
    let e = end
    while (j < this.r.length / 2 && this.r[j * 2]! <= end) {
      s = Math.min(s, this.r[j * 2]!)
      e = Math.max(e, this.r[j * 2 + 1]!)
      j++
    }
    this.r.splice(i * 2, (j - i) * 2, s, e)
    return this
  }

  remove (start: number, end: number): this {
    checkRange(start, end)
    if (start === end) return this
    const i = this.firstEndAbove(start)
    let j = i
    const keep: number[] = []
    while (j < this.r.length / 2 && this.r[j * 2]! < end) {
      const s = this.r[j * 2]!
      const e = this.r[j * 2 + 1]!
      if (s < start) keep.push(s, start)
      if (e > end) keep.push(end, e)
      j++
    }
    this.r.splice(i * 2, (j - i) * 2, ...keep)
    return this
  }

  addSet (other: RangeSet): this {
    for (const [s, e] of other.ranges()) this.add(s, e)
    return this
  }

  removeSet (other: RangeSet): this {
    for (const [s, e] of other.ranges()) this.remove(s, e)
    return this
  }

  /** The parts of [start, end) that are in the set. */
  * within (start: number, end: number): Generator<Range> {
    // An empty query has no parts (without this, [x, x) or worse was yielded).
    if (start >= end) return
    for (let i = this.firstEndAbove(start); i < this.r.length / 2 && this.r[i * 2]! < end; i++) {
      yield [Math.max(start, this.r[i * 2]!), Math.min(end, this.r[i * 2 + 1]!)]
    }
  }

  * ranges (): Generator<Range> {
    for (let i = 0; i < this.r.length; i += 2) yield [this.r[i]!, this.r[i + 1]!]
  }

  * values (): Generator<number> {
    for (const [s, e] of this.ranges()) for (let x = s; x < e; x++) yield x
  }

  /** How many disjoint ranges the set is made of. */
  get rangeCount (): number { return this.r.length / 2 }

  /** Smallest index, or undefined when empty. */
  get first (): number | undefined { return this.r[0] }
  /** One past the largest index, or undefined when empty. */
  get end (): number | undefined { return this.r.length === 0 ? undefined : this.r[this.r.length - 1] }

  equals (other: RangeSet): boolean {
    return this.r.length === other.r.length && this.r.every((v, i) => v === other.r[i])
  }

  toJSON (): Range[] { return [...this.ranges()] }
}

function checkRange (start: number, end: number): void {
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end < start) {
    throw new RangeError(`invalid block range [${start}, ${end})`)
  }
}
