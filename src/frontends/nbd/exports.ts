/**
 * What an NBD server serves. The protocol code sees exports only through
 * these interfaces, so the same handshake and transmission code can serve
 * a node's images to a hypervisor (VolumeExports, below) and, later, a
 * node's replicas to its peers (`replica/<image>` exports over the peer
 * protocol).
 */
import type { PeerIdentity } from '../../tls/identity.js'
import { imageNotFound, toUkaiError } from '../../errors.js'
import type { ImageOpen, UkaiNode } from '../../node/node.js'
import type { Extent } from '../../volume/volume.js'

/**
 * The operation set an export serves (nbdkit's model). Volume has exactly
 * this shape; ranges are checked against the export size before a call.
 */
export interface NbdBackend {
  /** Block size of the image: the unit of allocation queries. */
  readonly blockSize: number
  /** Reads into `buf`; returns the bytes read (the rest is left untouched). */
  read: (offset: number, buf: Buffer) => Promise<number>
  /**
   * Writes `data`. `released`, when given, is to be called once nothing
   * reads `data` any more (every copy made, every request that sends it
   * answered): the server then reuses the buffer for a later WRITE
   * (ioBuffers in transmission.ts). A backend that cannot tell never calls it.
   */
  write: (offset: number, data: Buffer, released?: () => void) => Promise<void>
  /** Makes every write acknowledged so far durable. */
  flush: () => Promise<void>
  trim: (offset: number, length: number) => Promise<void>
  /** Zeroes a range; `mayFree` allows holes (false: NBD_CMD_FLAG_NO_HOLE). */
  zero: (offset: number, length: number, mayFree: boolean) => Promise<void>
  extents: (offset: number, length: number) => Promise<Extent[]>
  /** True when zero(offset, length, true) would write no data (NBD_CMD_FLAG_FAST_ZERO). */
  zeroIsFast: (offset: number, length: number) => Promise<boolean>
}

export interface ExportInfo {
  /** Export size in bytes, fixed for the connection once in transmission. */
  size: number
  readOnly: boolean
}

export interface OpenExport extends ExportInfo {
  name: string
  backend: NbdBackend
  /** Ends this connection's use; called once, after its last request finished. */
  close: () => Promise<void>
}

export interface ExportProvider {
  /** Names for NBD_OPT_LIST. */
  list: () => string[]
  /** What NBD_OPT_INFO reports, without opening; undefined for no such export. */
  describe: (name: string) => ExportInfo | undefined
  /**
   * Opens for the transmission phase; throws a UkaiError (UKAI_ERR_NOT_FOUND
   * when absent). `peer` is the client's verified certificate identity on a
   * TLS listener, undefined on a plain-text one.
   */
  open: (name: string, who: string, peer?: PeerIdentity) => Promise<OpenExport>
}

/**
 * The node's images as exports, named as the images are. Each connection
 * opens the image's shared Volume (the one the FUSE mount uses), so every
 * I/O takes the same path: replication, failover, dirty log, single writer.
 *
 * Single writer: a connection opens the image for writing; when it
 * already has a writer (the FUSE mount, another connection, another node
 * that writes it), the connection is served read-only (NBD_FLAG_READ_ONLY)
 * instead of being refused, so a second client can still read.
 */
export class VolumeExports implements ExportProvider {
  private readonly node: UkaiNode
  private readonly readOnly: boolean

  constructor (node: UkaiNode, readOnly: boolean) {
    this.node = node
    this.readOnly = readOnly
  }

  list (): string[] {
    return this.node.imageNames()
  }

  describe (name: string): ExportInfo | undefined {
    const meta = this.node.imageMeta(name)
    if (meta === undefined) return undefined
    return { size: meta.usedSize, readOnly: this.readOnly || this.hasWriter(name) }
  }

  async open (name: string, client: string, peer?: PeerIdentity): Promise<OpenExport> {
    if (this.node.imageMeta(name) === undefined) throw imageNotFound(name)
    const who = peer === undefined ? client : `${client}, ${peer.role} ${peer.name}`
    let opened: ImageOpen | undefined
    if (!this.readOnly) {
      try {
        opened = await this.node.openImage(name, true, who)
      } catch (err) {
        // Another writer has the image: serve it read-only.
        if (toUkaiError(err).code !== 'UKAI_ERR_BUSY') throw err
      }
    }
    opened ??= await this.node.openImage(name, false, who)
    const o = opened
    return { name, size: o.volume.usedSize, readOnly: !o.write, backend: o.volume, close: o.close }
  }

  private hasWriter (name: string): boolean {
    return this.node.openVolumes().some((v) => v.name === name && v.hasWriter)
  }
}

