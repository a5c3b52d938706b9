/**
 * What the FUSE mount answers, whichever engine carries the requests
 * (the native plane, native-mount.ts, or fuse-native, mount.ts): the
 * root directory lists the images; each image is a regular file of
 * used_size bytes that a hypervisor uses as a raw disk. Only what a
 * hypervisor needs is served (getattr, readdir, open, read, write,
 * truncate, flush, fsync, release, statfs); everything that would make
 * the mount a general file system (create, mkdir, unlink, rename,
 * symlink, link, mknod, chmod, chown) is refused with EPERM by the
 * engines themselves.
 *
 * Every method answers a number: >= 0 on success, -errno on failure, or
 * a value. None throws and none touches the mount: they run on the JS
 * thread while a FUSE thread waits, so the mount must never be touched
 * synchronously from this process.
 */
import { statfs } from 'node:fs/promises'
import { constants as fsConstants } from 'node:fs'
import { fuseErrno } from '../../errors.js'
import type { UkaiNode } from '../../node/node.js'
import type { Volume } from '../../volume/volume.js'

export const EPERM = -1
export const ENOENT = -2
export const EBADF = -9
export const EISDIR = -21
export const EINVAL = -22
const O_ACCMODE = 3

export interface FileStat {
  mode: number
  size: number
  nlink: number
  uid: number
  gid: number
  blksize: number
  blocks: number
  mtime: Date
  atime: Date
  ctime: Date
}

export interface FsStat {
  bsize: number
  frsize: number
  blocks: number
  bfree: number
  bavail: number
  files: number
  ffree: number
  favail: number
  fsid: number
  flag: number
  namemax: number
}

export interface OpenFile { image: string, volume: Volume, close: () => Promise<void>, write: boolean }

export class FuseImages {
  readonly node: UkaiNode
  readonly mountpoint: string
  readonly files = new Map<number, OpenFile>()
  private nextFd = 1

  constructor (node: UkaiNode, mountpoint: string) {
    this.node = node
    this.mountpoint = mountpoint
  }

  /** "/name" -> "name" for a path directly under the root; undefined otherwise. */
  imageOf (path: string): string | undefined {
    if (!path.startsWith('/') || path.indexOf('/', 1) !== -1 || path.length < 2) return undefined
    const name = path.slice(1)
    return this.node.imageMeta(name) === undefined ? undefined : name
  }

  stat (name: string): FileStat {
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

  private dirStat (): FileStat {
    const t = new Date(0)
    return { mode: fsConstants.S_IFDIR | 0o755, size: 4096, nlink: 2, uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, blksize: 4096, blocks: 8, mtime: t, atime: t, ctime: t }
  }

  getattr (path: string): FileStat | number {
    if (path === '/') return this.dirStat()
    const name = this.imageOf(path)
    return name === undefined ? ENOENT : this.stat(name)
  }

  readdir (path: string): string[] | number {
    return path === '/' ? this.node.imageNames() : ENOENT
  }

  /** Opens an image; the file number, or -errno. A second writer (here or on another node) gets EBUSY. */
  async open (path: string, flags: number): Promise<number> {
    const name = this.imageOf(path)
    if (name === undefined) return path === '/' ? EISDIR : ENOENT
    const write = (flags & O_ACCMODE) !== fsConstants.O_RDONLY
    const fd = this.nextFd++
    try {
      const o = await this.node.openImage(name, write, `the FUSE mount (${this.mountpoint})`)
      this.files.set(fd, { image: name, volume: o.volume, close: o.close, write })
      return fd
    } catch (err) {
      return fuseErrno(err)
    }
  }

  async release (fd: number): Promise<number> {
    const f = this.files.get(fd)
    if (f === undefined) return 0
    this.files.delete(fd)
    return await f.close().then(() => 0, fuseErrno)
  }

  /** Reads into `buf` at `pos`; the bytes read (short at used_size), or -errno. */
  async read (fd: number, buf: Buffer, pos: number): Promise<number> {
    const f = this.files.get(fd)
    if (f === undefined) return EBADF
    return await f.volume.read(pos, buf).catch(fuseErrno)
  }

  /** Writes `buf` at `pos`: answered once the volume has it on every replica (or durably marked). */
  async write (fd: number, buf: Buffer, pos: number): Promise<number> {
    const f = this.files.get(fd)
    if (f === undefined) return EBADF
    return await f.volume.write(pos, buf).then(() => buf.length, fuseErrno)
  }

  async flush (fd: number): Promise<number> {
    const f = this.files.get(fd)
    if (f === undefined || !f.write) return 0
    return await f.volume.flush().then(() => 0, fuseErrno)
  }

  async fsync (fd: number): Promise<number> {
    const f = this.files.get(fd)
    if (f === undefined) return 0
    return await f.volume.flush().then(() => 0, fuseErrno)
  }

  async truncate (path: string, size: number): Promise<number> {
    const name = this.imageOf(path)
    if (name === undefined) return ENOENT
    if (!Number.isSafeInteger(size) || size < 0) return EINVAL
    try {
      const volume = await this.node.acquireVolume(name)
      try { await volume.truncate(size) } finally { await this.node.releaseVolume(volume) }
      return 0
    } catch (err) {
      return fuseErrno(err)
    }
  }

  async ftruncate (fd: number, size: number): Promise<number> {
    const f = this.files.get(fd)
    if (f === undefined) return EBADF
    return await f.volume.truncate(size).then(() => 0, fuseErrno)
  }

  async statfs (): Promise<FsStat | number> {
    try {
      const st = await statfs(this.node.config.image_root)
      return { bsize: st.bsize, frsize: st.bsize, blocks: st.blocks, bfree: st.bfree, bavail: st.bavail, files: st.files, ffree: st.ffree, favail: st.ffree, fsid: 0, flag: 0, namemax: 128 }
    } catch (err) {
      return fuseErrno(err)
    }
  }

  /** After the unmount: every open ends. */
  async closeAll (): Promise<void> {
    for (const f of this.files.values()) await f.close().catch(() => {})
    this.files.clear()
  }
}
