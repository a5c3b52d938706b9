/**
 * The FUSE mount: the root directory lists the images; each image is a
 * regular file of used_size bytes that a hypervisor uses as a raw disk.
 * Only what a hypervisor needs is served (getattr, readdir, open, read,
 * write, truncate, flush, fsync, release, statfs); everything that would
 * make the mount a general file system (create, mkdir, unlink, rename,
 * symlink, link, mknod, chmod, chown) is refused with EPERM.
 *
 * Every callback runs on the JS thread; all work is asynchronous. Nothing
 * in this process may touch the mount synchronously.
 */
import { statfs } from 'node:fs/promises'
import { constants as fsConstants } from 'node:fs'
import Fuse, { type Ops, type Stat } from 'fuse-native'
import { fuseErrno } from '../../errors.js'
import type { UkaiNode } from '../../node/node.js'
import type { Volume } from '../../volume/volume.js'

const EPERM = -1
const ENOENT = -2
const EISDIR = -21
const EINVAL = -22
const O_ACCMODE = 3

/** libfuse 2 max_write/max_read ceiling (32 pages of 4 KiB) without max_pages. */
const MAX_IO = 128 * 1024

interface OpenFile { volume: Volume, close: () => Promise<void>, write: boolean }

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
  private fuse: Fuse | undefined
  private readonly files = new Map<number, OpenFile>()
  private nextFd = 1

  constructor (node: UkaiNode, mountpoint: string) {
    this.node = node
    this.mountpoint = mountpoint
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
    for (const f of this.files.values()) await f.close().catch(() => {})
    this.files.clear()
  }

  /** "/name" -> "name" for a path directly under the root; undefined otherwise. */
  private imageOf (path: string): string | undefined {
    if (!path.startsWith('/') || path.indexOf('/', 1) !== -1 || path.length < 2) return undefined
    const name = path.slice(1)
    return this.node.imageMeta(name) === undefined ? undefined : name
  }

  private stat (name: string): Stat {
    const meta = this.node.imageMeta(name)!
    const t = this.node.imageSeen(name) ?? new Date(0)
    return {
      mode: fsConstants.S_IFREG | 0o644,
      size: meta.usedSize,
      nlink: 1,
      uid: process.getuid?.() ?? 0,
      gid: process.getgid?.() ?? 0,
      blksize: 4096,
      blocks: Math.ceil(meta.usedSize / 512),
      mtime: t,
      atime: t,
      ctime: t
    }
  }

  private ops (): Ops {
    const refuse = (...args: unknown[]): void => { (args[args.length - 1] as (e: number) => void)(EPERM) }
    const dirStat = (): Stat => {
      const t = new Date(0)
      return { mode: fsConstants.S_IFDIR | 0o755, size: 4096, nlink: 2, uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, mtime: t, atime: t, ctime: t }
    }
    return {
      init: (cb) => cb(0),
      statfs: (_path, cb) => {
        statfs(this.node.config.image_root).then((st) => cb(0, {
          bsize: st.bsize,
          frsize: st.bsize,
          blocks: st.blocks,
          bfree: st.bfree,
          bavail: st.bavail,
          files: st.files,
          ffree: st.ffree,
          favail: st.ffree,
          fsid: 0,
          flag: 0,
          namemax: 128
        }), (err) => cb(fuseErrno(err)))
      },
      getattr: (path, cb) => {
        if (path === '/') return cb(0, dirStat())
        const name = this.imageOf(path)
        if (name === undefined) return cb(ENOENT)
        cb(0, this.stat(name))
      },
      readdir: (path, cb) => {
        if (path !== '/') return cb(ENOENT)
        const names = this.node.imageNames()
        cb(0, names, names.map((n) => this.stat(n)))
      },
      open: (path, flags, cb) => {
        const name = this.imageOf(path)
        if (name === undefined) return cb(path === '/' ? EISDIR : ENOENT)
        const write = (flags & O_ACCMODE) !== fsConstants.O_RDONLY
        const fd = this.nextFd++
        // A second writer (here or on another node) gets EBUSY.
        this.node.openImage(name, write, `the FUSE mount (${this.mountpoint})`).then((o) => {
          this.files.set(fd, { volume: o.volume, close: o.close, write })
          cb(0, fd)
        }, (err) => cb(fuseErrno(err)))
      },
      release: (_path, fd, cb) => {
        const f = this.files.get(fd)
        if (f === undefined) return cb(0)
        this.files.delete(fd)
        f.close().then(() => cb(0), (err) => cb(fuseErrno(err)))
      },
      read: (_path, fd, buf, len, pos, cb) => {
        const f = this.files.get(fd)
        if (f === undefined) return cb(-9) // EBADF
        f.volume.read(pos, buf.subarray(0, len)).then(cb, (err) => cb(fuseErrno(err)))
      },
      write: (_path, fd, buf, len, pos, cb) => {
        const f = this.files.get(fd)
        if (f === undefined) return cb(-9)
        // The buffer is the kernel's and valid until cb: the volume has the
        // data on every replica (or durably marked) before we answer.
        f.volume.write(pos, buf.subarray(0, len)).then(() => cb(len), (err) => cb(fuseErrno(err)))
      },
      flush: (_path, fd, cb) => {
        const f = this.files.get(fd)
        if (f === undefined || !f.write) return cb(0)
        f.volume.flush().then(() => cb(0), (err) => cb(fuseErrno(err)))
      },
      fsync: (_path, _datasync, fd, cb) => {
        const f = this.files.get(fd)
        if (f === undefined) return cb(0)
        f.volume.flush().then(() => cb(0), (err) => cb(fuseErrno(err)))
      },
      truncate: (path, size, cb) => {
        const name = this.imageOf(path)
        if (name === undefined) return cb(ENOENT)
        if (!Number.isSafeInteger(size) || size < 0) return cb(EINVAL)
        this.node.acquireVolume(name).then(async (volume) => {
          try { await volume.truncate(size) } finally { await this.node.releaseVolume(volume) }
        }).then(() => cb(0), (err) => cb(fuseErrno(err)))
      },
      ftruncate: (_path, fd, size, cb) => {
        const f = this.files.get(fd)
        if (f === undefined) return cb(-9)
        f.volume.truncate(size).then(() => cb(0), (err) => cb(fuseErrno(err)))
      },
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
