/**
 * The FUSE mount on fuse-native over libfuse 2 (fuse_engine
 * "fuse-native"): the fallback engine on a host without the native one
 * (native-mount.ts). What is answered is FuseImages' (ops.ts); this file
 * only carries requests between fuse-native and it.
 *
 * Every callback runs on the JS thread; all work is asynchronous. Nothing
 * in this process may touch the mount synchronously.
 */
import Fuse, { type Ops } from 'fuse-native'
import type { UkaiNode } from '../../node/node.js'
import { EPERM, FuseImages } from './ops.js'

/** libfuse 2 max_write/max_read ceiling (32 pages of 4 KiB) without max_pages. */
const MAX_IO = 128 * 1024

/**
 * fuse-native builds its -o list from a fixed set of options; these are
 * not among them, so they are added here:
 * - big_writes: without it libfuse 2 hands us every write in 4 KiB pieces;
 * - entry_timeout=0: the kernel must not keep a name that was destroyed
 *   (or miss one just created) for a second; a lookup costs little.
 */
class BigWritesFuse extends Fuse {
  protected override _fuseOptions (): string {
    const base = super._fuseOptions()
    const extra = `big_writes,max_write=${MAX_IO},entry_timeout=0,negative_timeout=0`
    return base === '' ? `-o${extra}` : `${base},${extra}`
  }
}

export interface FuseMountOptions {
  debug?: boolean
  allowOther?: boolean
}

export class FuseMount {
  readonly node: UkaiNode
  readonly mountpoint: string
  readonly engine = 'fuse-native'
  private fuse: Fuse | undefined
  private readonly images: FuseImages

  constructor (node: UkaiNode, mountpoint: string) {
    this.node = node
    this.mountpoint = mountpoint
    this.images = new FuseImages(node, mountpoint)
  }

  async mount (options: FuseMountOptions = {}): Promise<void> {
    const fuse = new BigWritesFuse(this.mountpoint, this.ops(), {
      force: true, // a stale mount left by a killed node is unmounted first
      mkdir: true,
      debug: options.debug ?? false,
      allowOther: options.allowOther ?? false,
      maxRead: MAX_IO,
      fsname: 'ukai',
      subtype: 'ukai',
      // Our own timeouts (io_timeout per peer) bound every operation; the
      // binding's fixed 15 s timer would fail slow but healthy writes.
      timeout: false
    })
    await new Promise<void>((resolve, reject) => fuse.mount((err) => err ? reject(err) : resolve()))
    this.fuse = fuse
  }

  async unmount (): Promise<void> {
    const fuse = this.fuse
    if (fuse === undefined) return
    this.fuse = undefined
    await new Promise<void>((resolve, reject) => fuse.unmount((err) => err ? reject(err) : resolve()))
    await this.images.closeAll()
  }

  private ops (): Ops {
    const refuse = (...args: unknown[]): void => { (args[args.length - 1] as (e: number) => void)(EPERM) }
    const im = this.images
    return {
      init: (cb) => cb(0),
      statfs: (_path, cb) => { void im.statfs().then((r) => typeof r === 'number' ? cb(r) : cb(0, r)) },
      getattr: (path, cb) => {
        const r = im.getattr(path)
        if (typeof r === 'number') cb(r)
        else cb(0, r)
      },
      readdir: (path, cb) => {
        const names = im.readdir(path)
        if (typeof names === 'number') return cb(names)
        cb(0, names, names.map((n) => im.stat(n)))
      },
      open: (path, flags, cb) => { void im.open(path, flags).then((fd) => fd < 0 ? cb(fd) : cb(0, fd)) },
      release: (_path, fd, cb) => { void im.release(fd).then(cb) },
      read: (_path, fd, buf, len, pos, cb) => { void im.read(fd, buf.subarray(0, len), pos).then(cb) },
      // The buffer is the kernel's and valid until cb: the volume has the
      // data on every replica (or durably marked) before we answer.
      write: (_path, fd, buf, len, pos, cb) => { void im.write(fd, buf.subarray(0, len), pos).then(cb) },
      flush: (_path, fd, cb) => { void im.flush(fd).then(cb) },
      fsync: (_path, _datasync, fd, cb) => { void im.fsync(fd).then(cb) },
      truncate: (path, size, cb) => { void im.truncate(path, size).then(cb) },
      ftruncate: (_path, fd, size, cb) => { void im.ftruncate(fd, size).then(cb) },
      utimens: (_path, _a, _m, cb) => cb(0),
      create: refuse,
      mkdir: refuse,
      unlink: refuse,
      rmdir: refuse,
      rename: refuse,
      symlink: refuse,
      link: refuse,
      mknod: refuse,
      chmod: refuse,
      chown: refuse
    }
  }
}
