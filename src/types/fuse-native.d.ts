// Types for the parts of fuse-native (which ships none) that UKAI uses.
declare module 'fuse-native' {
  type Cb<T = void> = T extends void ? (err: number) => void : (err: number, value?: T) => void
  export interface Stat {
    mode: number
    size: number
    uid?: number
    gid?: number
    nlink?: number
    ino?: number
    blksize?: number
    blocks?: number
    mtime: Date
    atime: Date
    ctime: Date
  }
  export interface StatFs {
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
  export interface Ops {
    init?: (cb: (err: number) => void) => void
    statfs?: (path: string, cb: (err: number, st?: StatFs) => void) => void
    getattr?: (path: string, cb: (err: number, st?: Stat) => void) => void
    fgetattr?: (path: string, fd: number, cb: (err: number, st?: Stat) => void) => void
    readdir?: (path: string, cb: (err: number, names?: string[], stats?: Stat[]) => void) => void
    open?: (path: string, flags: number, cb: (err: number, fd?: number) => void) => void
    release?: (path: string, fd: number, cb: (err: number) => void) => void
    read?: (path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (bytes: number) => void) => void
    write?: (path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (bytes: number) => void) => void
    flush?: (path: string, fd: number, cb: (err: number) => void) => void
    fsync?: (path: string, datasync: boolean, fd: number, cb: (err: number) => void) => void
    truncate?: (path: string, size: number, cb: (err: number) => void) => void
    ftruncate?: (path: string, fd: number, size: number, cb: (err: number) => void) => void
    create?: (path: string, mode: number, cb: (err: number, fd?: number) => void) => void
    unlink?: (path: string, cb: (err: number) => void) => void
    rename?: (src: string, dest: string, cb: (err: number) => void) => void
    link?: (src: string, dest: string, cb: (err: number) => void) => void
    symlink?: (src: string, dest: string, cb: (err: number) => void) => void
    mkdir?: (path: string, mode: number, cb: (err: number) => void) => void
    rmdir?: (path: string, cb: (err: number) => void) => void
    mknod?: (path: string, mode: number, dev: number, cb: (err: number) => void) => void
    chmod?: (path: string, mode: number, cb: (err: number) => void) => void
    chown?: (path: string, uid: number, gid: number, cb: (err: number) => void) => void
    utimens?: (path: string, atime: number, mtime: number, cb: (err: number) => void) => void
    access?: (path: string, mode: number, cb: (err: number) => void) => void
  }
  export interface FuseOptions {
    force?: boolean
    mkdir?: boolean
    debug?: boolean
    allowOther?: boolean
    autoUnmount?: boolean
    maxRead?: number
    fsname?: string
    subtype?: string
    timeout?: number | false
    attrTimeout?: number
    entryTimeout?: number
  }
  class Fuse {
    constructor (mnt: string, ops: Ops, opts?: FuseOptions)
    mnt: string
    mount (cb: (err: Error | null) => void): void
    unmount (cb: (err: Error | null) => void): void
    protected _fuseOptions (): string
    static unmount (mnt: string, cb: (err: Error | null) => void): void
    static EPERM: number
    static ENOENT: number
    static EIO: number
    static EBUSY: number
    static EINVAL: number
  }
  export default Fuse
}
