/**
 * A cluster of real `ukai server` processes on 127.0.0.1, each with its own
 * ports and image_root, sharing their metadata: on a real etcd started for
 * the cluster (`etcd: true`), or in one metadata directory (the embedded
 * store, for nodes of one machine). Helpers read the metadata and what
 * every node holds on disk, to check replicas against a model.
 */
import { randomBytes } from 'node:crypto'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { encodeStored } from '../../src/metadata/codec.js'
import { EtcdCore } from '../../src/metadata/etcd-core.js'
import { FileCore } from '../../src/metadata/file-core.js'
import type { RangeSet } from '../../src/metadata/range-set.js'
import { MetadataStore, type ImageState } from '../../src/metadata/store.js'
import { TestEtcd } from './etcd.js'
import { CLI, TestNode, run } from './node-process.js'

export interface ClusterOptions {
  nodes: number
  /** Indexes of the nodes that mount FUSE. */
  mount?: number[]
  /** Indexes of the nodes that serve NBD. */
  nbd?: number[]
  config?: Record<string, unknown>
  /** Metadata on a real etcd started for the cluster (else a shared metadata directory). */
  etcd?: boolean
  /**
   * Nodes speak mutual TLS with certificates of a CA made for the cluster
   * (default); false: plain text on loopback.
   */
  tls?: boolean
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
  readonly etcd: TestEtcd | undefined
  /** The metadata keys every node's config names. */
  readonly metadataConfig: Record<string, unknown>
  /** The cluster CA's directory when its nodes speak TLS. */
  tlsCa: string | undefined
  private storeOpened: Promise<MetadataStore> | undefined

  private constructor (dir: string, nodes: TestNode[], etcd: TestEtcd | undefined, metadataConfig: Record<string, unknown>) {
    this.dir = dir
    this.metadataRoot = join(dir, 'metadata')
    this.nodes = nodes
    this.etcd = etcd
    this.metadataConfig = metadataConfig
  }

  static async start (opts: ClusterOptions): Promise<Cluster> {
    const dir = await mkdtemp(join(tmpdir(), 'ukai-cluster-'))
    const nodes: TestNode[] = []
    let etcd: TestEtcd | undefined
    try {
      if (opts.etcd === true) etcd = await TestEtcd.start()
      const metadataConfig = etcd !== undefined
        ? { metadata_servers: etcd.servers, metadata_prefix: `c-${randomBytes(4).toString('hex')}` }
        : { metadata_root: join(dir, 'metadata') }
      const tlsCa = opts.tls === false ? undefined : join(dir, 'ca')
      if (tlsCa !== undefined) {
        const r = await run(process.execPath, [CLI, 'cert', 'ca', tlsCa])
        if (r.code !== 0) throw new Error(`ukai cert ca: ${r.stderr}`)
      }
      for (let i = 0; i < opts.nodes; i++) {
        nodes.push(await TestNode.start({
          tlsCa,
          mount: opts.mount?.includes(i) ?? false,
          nbd: opts.nbd?.includes(i) ?? false,
          config: { ...metadataConfig, ...opts.config }
        }))
      }
      const cluster = new Cluster(dir, nodes, etcd, metadataConfig)
      cluster.tlsCa = tlsCa
      return cluster
    } catch (err) {
      for (const n of nodes) await n.destroy()
      await etcd?.destroy()
      await rm(dir, { recursive: true, force: true })
      throw err
    }
  }

  /** The cluster's metadata store, as a client of its own (opened once). */
  async store (): Promise<MetadataStore> {
    this.storeOpened ??= (async () => this.etcd !== undefined
      ? new MetadataStore(new EtcdCore({ servers: this.etcd.servers, prefix: this.metadataConfig.metadata_prefix as string }), 22222)
      : new MetadataStore(await FileCore.open(this.metadataRoot), 22222))()
    return await this.storeOpened
  }

  async state (name: string): Promise<ImageState> {
    return await (await this.store()).requireState(name)
  }

  /** The image's metadata in the stored format. */
  async image (name: string): Promise<StoredImageDoc> {
    return encodeStored((await this.state(name)).meta)
  }

  async dirtyLog (name: string): Promise<RangeSet> {
    return (await this.state(name)).dirty
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
    if (this.storeOpened !== undefined) await (await this.storeOpened).close().catch(() => {})
    await this.etcd?.destroy()
    await rm(this.dir, { recursive: true, force: true })
  }
}
