/**
 * A cluster of real `ukai server` processes on 127.0.0.1 sharing one
 * metadata directory (the embedded store's way of sharing metadata), each
 * with its own ports and image_root. Helpers read what every node holds on
 * disk, to check replicas against a model.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { TestNode } from './node-process.js'

export interface ClusterOptions {
  nodes: number
  /** Indexes of the nodes that mount FUSE. */
  mount?: number[]
  /** Indexes of the nodes that serve NBD. */
  nbd?: number[]
  config?: Record<string, unknown>
}

export interface StoredImageDoc {
  name: string
  size: number
  block_size: number
  used_size: number
  locations: Record<string, { blocks: Array<[number, number]>, out_of_sync: Array<[number, number]> }>
}

export class Cluster {
  readonly dir: string
  readonly metadataRoot: string
  readonly nodes: TestNode[]

  private constructor (dir: string, nodes: TestNode[]) {
    this.dir = dir
    this.metadataRoot = join(dir, 'metadata')
    this.nodes = nodes
  }

  static async start (opts: ClusterOptions): Promise<Cluster> {
    const dir = await mkdtemp(join(tmpdir(), 'ukai-cluster-'))
    const nodes: TestNode[] = []
    try {
      for (let i = 0; i < opts.nodes; i++) {
        nodes.push(await TestNode.start({
          mount: opts.mount?.includes(i) ?? false,
          nbd: opts.nbd?.includes(i) ?? false,
          config: { metadata_root: join(dir, 'metadata'), ...opts.config }
        }))
      }
    } catch (err) {
      for (const n of nodes) await n.destroy()
      await rm(dir, { recursive: true, force: true })
      throw err
    }
    return new Cluster(dir, nodes)
  }

  async image (name: string): Promise<StoredImageDoc> {
    return JSON.parse(await readFile(join(this.metadataRoot, `${name}.json`), 'utf8'))
  }

  nodeById (id: string): TestNode | undefined {
    return this.nodes.find((n) => n.id === id)
  }

  /** Block `b` as node `n` holds it on disk, padded with zeros to `length`. */
  async blockOnDisk (n: TestNode, image: string, b: number, length: number): Promise<Buffer> {
    let data: Buffer
    try {
      data = await readFile(join(n.imageRoot, image, String(b).padStart(16, '0')))
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
      data = Buffer.alloc(0)
    }
    if (data.length > length) throw new Error(`block ${b} of '${image}' on ${n.id} is ${data.length} bytes, more than the block's ${length}`)
    return Buffer.concat([data, Buffer.alloc(length - data.length)])
  }

  /**
   * Every in-sync replica of every block compared with `model` (or, with
   * no model, with each other). Returns a description of each mismatch.
   */
  async checkReplicas (name: string, model?: Buffer, { includeOutOfSync = false } = {}): Promise<string[]> {
    const doc = await this.image(name)
    const count = Math.ceil(doc.size / doc.block_size)
    const problems: string[] = []
    for (let b = 0; b < count; b++) {
      const length = Math.min(doc.block_size, doc.size - b * doc.block_size)
      let reference: Buffer | undefined = model?.subarray(b * doc.block_size, b * doc.block_size + length)
      for (const [loc, st] of Object.entries(doc.locations)) {
        const holds = st.blocks.some(([s, e]) => b >= s && b < e)
        const outOfSync = st.out_of_sync.some(([s, e]) => b >= s && b < e)
        if (!holds || (outOfSync && !includeOutOfSync)) continue
        const node = this.nodeById(loc)
        if (node === undefined) { problems.push(`block ${b}: location ${loc} is not a cluster node`); continue }
        const data = await this.blockOnDisk(node, name, b, length)
        if (reference === undefined) reference = data
        else if (!data.equals(reference)) problems.push(`block ${b}: ${outOfSync ? 'out-of-sync' : 'in-sync'} replica on ${loc} differs`)
      }
    }
    return problems
  }

  /** Block replicas marked out of sync, per location. */
  async outOfSync (name: string): Promise<Record<string, number>> {
    const doc = await this.image(name)
    const out: Record<string, number> = {}
    for (const [loc, st] of Object.entries(doc.locations)) out[loc] = st.out_of_sync.reduce((n, [s, e]) => n + e - s, 0)
    return out
  }

  async destroy (): Promise<void> {
    for (const n of this.nodes) await n.destroy().catch(() => {})
    await rm(this.dir, { recursive: true, force: true })
  }
}
