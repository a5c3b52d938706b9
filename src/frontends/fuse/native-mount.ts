/**
 * The FUSE mount on the native plane (fuse_engine "native", the default
 * when the addon is built): libfuse 3's multi-threaded loop runs on the
 * addon's own threads (native/ukai-fuse.c). A read of blocks that are
 * local and in sync (exactly those chooseReader would read from this
 * node's replica: read-plane.ts) is served there, with pread on the
 * block files; every other request comes here, on the JS thread, and is
 * answered by FuseImages (ops.ts), as on the fuse-native engine.
 *
 * A request handed here holds a libfuse thread until it is answered: all
 * work is asynchronous, and nothing in this process touches the mount
 * synchronously (the FUSE thread would wait for the JS thread that waits
 * for it).
 */
import { execFile } from 'node:child_process'
import { mkdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { blockNameParts } from '../../blockstore/block-name.js'
import type { UkaiNode } from '../../node/node.js'
import type { Volume } from '../../volume/volume.js'
import { OP, type FuseAddon } from './native-addon.js'
import { EINVAL, FuseImages, type FileStat } from './ops.js'
import { ImageReadPlane } from './read-plane.js'
import type { FuseMountOptions } from './mount.js'

const EIO = -5
/** Requests of up to 1 MiB (libfuse 3 negotiates max_pages for them). */
const MAX_IO = 1024 * 1024

interface Plane { plane: ImageReadPlane, files: number }

export class NativeFuseMount {
  readonly node: UkaiNode
  readonly mountpoint: string
  readonly engine = 'native'
  private readonly addon: FuseAddon
  private readonly images: FuseImages
  /** The fast-path registration of each image with files open here. */
  private readonly planes = new Map<Volume, Plane>()
  private readonly closing = new Set<Promise<void>>()
  private mounted = false
  private heartbeat: NodeJS.Timeout | undefined

  constructor (node: UkaiNode, mountpoint: string, addon: FuseAddon) {
    this.node = node
    this.mountpoint = mountpoint
    this.addon = addon
    this.images = new FuseImages(node, mountpoint)
  }

  async mount (options: FuseMountOptions = {}): Promise<void> {
    // A stale mount left by a killed node is unmounted first.
    const probe = await stat(join(this.mountpoint, 'test')).then(() => undefined, (err: NodeJS.ErrnoException) => err.code)
    if (probe === 'ENOTCONN' || probe === 'ENXIO') await lazyUnmount(this.mountpoint)
    await mkdir(this.mountpoint, { recursive: true })
    const opts = ['fsname=ukai', 'subtype=ukai', `max_read=${MAX_IO}`]
    if (options.allowOther === true) opts.push('allow_other')
    if (options.debug === true) opts.push('debug')
    // The fast path serves only while this thread is known to run (and so
    // to apply revocations): a stall longer than this sends reads here,
    // where they wait, well before a writer elsewhere gives up waiting for
    // this node to apply a change (io_timeout).
    const fresh = Math.min(2000, this.node.config.io_timeout * 500)
    this.addon.heartbeat(fresh)
    this.heartbeat = setInterval(() => this.addon.heartbeat(fresh), Math.max(50, fresh / 4))
    this.heartbeat.unref()
    try {
      this.addon.mount(this.mountpoint, opts.join(','), (op, id, path, fd, a, b, data) => {
        try {
          this.handle(op, id, path, fd, a, b, data)
        } catch {
          this.addon.reply(id, EIO)
        }
      })
    } catch (err) {
      clearInterval(this.heartbeat)
      throw err
    }
    this.mounted = true
  }

  async unmount (): Promise<void> {
    if (!this.mounted) return
    this.mounted = false
    clearInterval(this.heartbeat)
    // Returns once every request handed to JS was answered and the loop ended.
    await this.addon.unmount()
    await Promise.all([...this.closing])
    for (const p of this.planes.values()) await p.plane.close()
    this.planes.clear()
    await this.images.closeAll()
  }

  private handle (op: number, id: number, path: string, fd: number, a: number, b: number, data: Buffer | undefined): void {
    const im = this.images
    const reply = (r: number): void => { this.addon.reply(id, r) }
    switch (op) {
      case OP.GETATTR: {
        const r = im.getattr(path)
        if (typeof r === 'number') reply(r)
        else this.addon.reply(id, 0, statArray(r))
        return
      }
      case OP.READDIR: {
        const names = im.readdir(path)
        if (typeof names === 'number') reply(names)
        else this.addon.reply(id, 0, names)
        return
      }
      case OP.OPEN:
        void im.open(path, a).then((n) => {
          if (n < 0) return reply(n)
          let slot = 0
          try { slot = this.attach(n) } catch (err) {
            // No fast path for this file (its reads all come here): still correct.
            this.node.emit('warning', `FUSE: the native read path is off for ${path}: ${(err as Error).message}`)
          }
          this.addon.reply(id, n, slot)
        })
        return
      case OP.RELEASE:
        void this.detach(fd).then(async () => await im.release(fd)).then(reply)
        return
      case OP.READ: {
        if (!Number.isSafeInteger(a) || a < 0 || a > MAX_IO) return reply(EINVAL)
        const buf = Buffer.allocUnsafe(a)
        void im.read(fd, buf, b).then((n) => n < 0 ? reply(n) : this.addon.reply(id, n, buf))
        return
      }
      case OP.WRITE:
        if (data === undefined) return reply(EINVAL)
        void im.write(fd, data, b).then(reply)
        return
      case OP.FLUSH:
        void im.flush(fd).then(reply)
        return
      case OP.FSYNC:
        void im.fsync(fd).then(reply)
        return
      case OP.TRUNCATE:
        void (fd >= 0 ? im.ftruncate(fd, a) : im.truncate(path, a)).then(reply)
        return
      case OP.STATFS:
        void im.statfs().then((r) => typeof r === 'number'
          ? reply(r)
          : this.addon.reply(id, 0, Float64Array.of(r.bsize, r.frsize, r.blocks, r.bfree, r.bavail, r.files, r.ffree, r.favail, r.namemax)))
        return
      default:
        reply(-38) // ENOSYS
    }
  }

  /** The fast-path slot of an open file's image (registered with its first file). */
  private attach (fd: number): number {
    const f = this.images.files.get(fd)!
    let p = this.planes.get(f.volume)
    if (p === undefined) {
      const parts = blockNameParts(this.node.config.blockname_format)
      const plane = new ImageReadPlane(this.addon, f.volume, { dir: this.node.blocks.imageDir(f.image), ...parts })
      p = { plane, files: 0 }
      this.planes.set(f.volume, p)
    }
    p.files++
    return p.plane.slot
  }

  /** Before an image's last file here ends: its fast path ends, and no native read of it is under way. */
  private async detach (fd: number): Promise<void> {
    const f = this.images.files.get(fd)
    if (f === undefined) return
    const p = this.planes.get(f.volume)
    if (p === undefined || --p.files > 0) return
    this.planes.delete(f.volume)
    const closing = p.plane.close()
    this.closing.add(closing)
    try { await closing } finally { this.closing.delete(closing) }
  }
}

function statArray (s: FileStat): Float64Array {
  return Float64Array.of(s.mode, s.size, s.nlink, s.uid, s.gid, s.blksize, s.blocks, s.mtime.getTime(), s.atime.getTime(), s.ctime.getTime())
}

/** fusermount3 -uz (fusermount on a host with libfuse 2's only), by its own process: never from the mount's threads. */
async function lazyUnmount (mountpoint: string): Promise<void> {
  for (const cmd of ['fusermount3', 'fusermount']) {
    const ok = await new Promise<boolean>((resolve) => execFile(cmd, ['-uz', mountpoint], (err) => resolve(err === null)))
    if (ok) return
  }
}
