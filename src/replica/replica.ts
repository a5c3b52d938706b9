/**
 * A replica is one location's copy of an image's blocks. The volume talks
 * to every location through this small operation set (nbdkit's model:
 * pread, pwrite, zero/trim, flush, extents), whether the blocks are on
 * this node (LocalReplica) or on a peer.
 */
import type { BlockStore, DiscardMode } from '../blockstore/block-store.js'
import type { FenceTable } from '../node/fences.js'
import type { Range } from '../metadata/range-set.js'

export type { DiscardMode }

export interface Replica {
  /** The location (node address) as the image metadata names it. */
  readonly location: string
  readonly isLocal: boolean
  /** Smoothed request latency in ms, for remote replicas once measured. */
  readonly rtt?: number | undefined
  read (image: string, block: number, offset: number, buf: Buffer): Promise<void>
  /**
   * Writes as the writer of `generation`: a replica that has seen a newer
   * generation refuses it (UKAI_ERR_FENCED).
   */
  write (image: string, block: number, offset: number, data: Buffer, generation: number): Promise<void>
  /** Trims or zeroes a range; see BlockStore.discard for the modes. */
  discard (image: string, block: number, offset: number, length: number, mode: DiscardMode, generation: number): Promise<void>
  flush (image: string): Promise<void>
  /** Bytes from the start of the block that may hold data (the rest reads as zeros). */
  allocatedLength (image: string, block: number): Promise<number>
  /**
   * The ranges of [start, end) of the block (offsets in it) that may hold
   * data; the rest reads as zeros. Reporting data where there is none is
   * allowed (a copy then reads zeros), never the other way round.
   */
  dataExtents (image: string, block: number, start: number, end: number): Promise<Range[]>
}

/** Finds the replica object for a location, or undefined when it cannot be reached at all. */
export interface ReplicaProvider {
  replicaFor (location: string): Replica | undefined
}

/** This node's replicas: its block files, behind the node's fences. */
export class LocalReplica implements Replica {
  readonly isLocal = true
  readonly location: string
  private readonly blocks: BlockStore
  private readonly fences: FenceTable

  constructor (location: string, blocks: BlockStore, fences: FenceTable) {
    this.location = location
    this.blocks = blocks
    this.fences = fences
  }

  async read (image: string, block: number, offset: number, buf: Buffer): Promise<void> {
    await this.blocks.read(image, block, offset, buf)
  }

  async write (image: string, block: number, offset: number, data: Buffer, generation: number): Promise<void> {
    const leave = this.fences.enter(image, generation)
    try {
      await this.blocks.write(image, block, offset, data)
    } finally { leave() }
  }

  async discard (image: string, block: number, offset: number, length: number, mode: DiscardMode, generation: number): Promise<void> {
    const leave = this.fences.enter(image, generation)
    try {
      await this.blocks.discard(image, block, offset, length, mode)
    } finally { leave() }
  }

  async flush (image: string): Promise<void> {
    await this.blocks.flush(image)
  }

  async allocatedLength (image: string, block: number): Promise<number> {
    return await this.blocks.allocatedLength(image, block)
  }

  async dataExtents (image: string, block: number, start: number, end: number): Promise<Range[]> {
    return await this.blocks.dataExtents(image, block, start, end)
  }
}
