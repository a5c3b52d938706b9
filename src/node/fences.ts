/**
 * Fencing of this node's replicas. Every write to this node's block files
 * (from this node's own Volume, or from a peer through the peer export)
 * carries the writer generation of the session that made it, and passes
 * through the image's gate here: once the gate is raised to generation G,
 * writes of older generations are refused with UKAI_ERR_FENCED, and
 * raising it returns only when every older write already inside has
 * finished. So once every location's gate is raised, nothing an old
 * writer sends can land anywhere (DESIGN.md invariant 6).
 *
 * Within a generation, a writer's connections to a peer also count
 * *epochs*: after a request to the peer timed out (or its connection
 * broke), the writer goes on with a new epoch, and the peer's gate refuses
 * the old epoch's writes from the first new-epoch connection on. A write
 * the writer gave up on (a peer that was stopped, then resumed) can never
 * land after what the writer did next (a resync of that block).
 */
import { UkaiError } from '../errors.js'

/** Epochs per generation in a gate's number: generation * EPOCHS + epoch. */
export const EPOCHS = 2 ** 20

const describe = (n: number): string => n % EPOCHS === 0 ? `generation ${n / EPOCHS}` : `generation ${Math.floor(n / EPOCHS)} epoch ${n % EPOCHS}`

class Gate {
  /** Lowest generation allowed to write. */
  fence = 0
  readonly inflight = new Map<number, number>()
  private readonly drained = new Set<() => void>()

  enter (generation: number, image: string): () => void {
    if (generation < this.fence) {
      throw new UkaiError('UKAI_ERR_FENCED',
        `image '${image}': a write of writer ${describe(generation)} was refused: ${describe(this.fence)} has taken over`, { image })
    }
    this.inflight.set(generation, (this.inflight.get(generation) ?? 0) + 1)
    let left = false
    return () => {
      if (left) return
      left = true
      const n = this.inflight.get(generation)! - 1
      if (n === 0) this.inflight.delete(generation)
      else this.inflight.set(generation, n)
      for (const d of [...this.drained]) d()
    }
  }

  private olderInside (generation: number): boolean {
    for (const g of this.inflight.keys()) if (g < generation) return true
    return false
  }

  async raise (generation: number): Promise<void> {
    if (generation > this.fence) this.fence = generation
    while (this.olderInside(generation)) {
      await new Promise<void>((resolve) => {
        const d = (): void => { this.drained.delete(d); resolve() }
        this.drained.add(d)
      })
    }
  }
}

export class FenceTable {
  private readonly gates = new Map<string, Gate>()

  private gate (image: string): Gate {
    let g = this.gates.get(image)
    if (g === undefined) {
      g = new Gate()
      this.gates.set(image, g)
    }
    return g
  }

  /** The lowest generation that may write to this node's replica of `image`. */
  fenceOf (image: string): number {
    return Math.floor((this.gates.get(image)?.fence ?? 0) / EPOCHS)
  }

  /** Admits one write of `generation` (and `epoch`); the returned function ends it. Throws UKAI_ERR_FENCED for an older one. */
  enter (image: string, generation: number, epoch = 0): () => void {
    return this.gate(image).enter(generation * EPOCHS + epoch, image)
  }

  /** Refuses older generations (and epochs) from now on; resolves once none is writing. */
  async raise (image: string, generation: number, epoch = 0): Promise<void> {
    await this.gate(image).raise(generation * EPOCHS + epoch)
  }

  /** Forgets an image (destroyed; a new one of the same name counts generations anew). */
  drop (image: string): void {
    this.gates.delete(image)
  }
}
