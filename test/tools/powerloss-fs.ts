/**
 * powerloss-fs: a FUSE file system for power-loss tests. It serves a
 * backing directory and keeps every change that is not durable yet in
 * memory, as a page cache does; a "power cut" throws that memory away.
 * LazyFS is the model. Run it as a process of its own:
 *
 *   node dist/test/tools/powerloss-fs.js BACKING MOUNTPOINT CONTROL_SOCKET
 *
 * It prints "powerloss-fs: ready" once the mount answers. The process
 * that serves a mount must never touch it synchronously; this one never
 * touches it at all (only BACKING).
 *
 * ## The model
 *
 * The tree is loaded from BACKING at mount time. Every inode has a
 * volatile state (what every reader of the mount sees: data, size, and
 * for a directory its entries) and a durable state (what survives a power
 * cut). BACKING always holds exactly the durable state: it is changed
 * only when something becomes durable, and then synchronously, so a cut
 * can never come in the middle of it.
 *
 * - Writes, truncates (and O_TRUNC), chmod change only the volatile state.
 * - fsync(2) and fdatasync(2) of a file make that file's data, size and
 *   mode durable (both are treated alike). They do not make its name
 *   durable: a file created, written and fsynced in a directory that is
 *   never fsynced is gone after a cut (as ext4 without a journal, or
 *   POSIX, allows).
 * - fsync(2) of a directory makes its entries durable, all at once:
 *   every create, mkdir, unlink, rmdir and rename in it since its last
 *   fsync. An entry that becomes durable shows the durable state of its
 *   inode (a file's last fsynced data; a directory's last fsynced
 *   entries), not the volatile one.
 * - A directory's own existence is an entry of its parent: what is
 *   inside a new directory survives only once the parent is fsynced too.
 * - A file opened with O_SYNC or O_DSYNC is fsynced after every write
 *   (the kernel also sends an fsync of its own for those).
 * - O_DIRECT means nothing here: a write with O_DIRECT is as volatile as
 *   any other until an fsync (a disk's own cache loses it too).
 * - Renames: a rename within one directory is atomic across a cut: the
 *   durable directory has the old entries or, after its fsync, the new
 *   ones (the target replaced, the source gone). A rename between two
 *   directories is two entry changes, each made durable by the fsync of
 *   its own directory: after a cut that followed the fsync of only the
 *   destination, the inode is in both places (after the source's fsync
 *   alone, in neither). A journaling file system would show one; the
 *   model is the POSIX worst case. Durable entries that would form a cycle
 *   (possible only with such crossed renames of directories) are not
 *   written out. RENAME_EXCHANGE and RENAME_WHITEOUT are refused (EINVAL),
 *   RENAME_NOREPLACE is honoured.
 * - Unlinked files stay readable and writable through the handles that
 *   have them open (an fsync of one changes nothing durable any more once
 *   its last durable name is gone; until the unlink is durable it still
 *   updates that name's data).
 * - link, symlink and mknod of anything but a regular file are refused
 *   with EPERM; symlinks and special files in BACKING are not served.
 * - Times and ownership are not made durable (a remount shows the times
 *   the backing files got). Extended attributes, locks, fallocate and
 *   lseek(SEEK_DATA) are not supported (ENOSYS to the kernel).
 * - Reads always see the volatile state, also through the kernel's page
 *   cache (no writeback caching is negotiated: every write reaches this
 *   process before write(2) returns). The kernel may cache names and
 *   attributes: every change goes through this one mount, so they never
 *   go stale, and they go with the mount at a cut.
 * - Everything is held in memory (files in 64 KiB pages, copy on write
 *   between the volatile and the durable state), and inode numbers are
 *   never reused or forgotten: for test-sized trees.
 *
 * ## Why not libfuse
 *
 * This speaks the kernel's FUSE protocol on /dev/fuse itself (mounted
 * with mount(8) and fd=N), by inode number. libfuse 2's high-level API,
 * which fuse-native wraps, works by path: once a rename replaces a name,
 * the node the kernel looked up a moment before has no path any more and
 * libfuse fails its open with ENOENT before the file system sees it (a
 * reader racing an atomic replace saw that on 2.5% of its opens), so a
 * reader of a file replaced by rename could see it missing, which no
 * real file system allows, and the embedded metadata store reading a
 * shard that another node replaces would take the image for deleted.
 * Requests are taken from the device by a few reads at once and served
 * one at a time (the kernel orders what must be ordered, as for any
 * multithreaded FUSE server).
 *
 * ## The control socket
 *
 * One JSON object per line, one JSON line back ({"ok": true, ...} or
 * {"ok": false, "error": "..."}):
 *
 * - {"cmd":"ping"}
 * - {"cmd":"status"}: counters and what is not durable now ("volatile").
 * - {"cmd":"sync"}: makes everything durable (sync(2)), for setting up a
 *   state the test starts from.
 * - {"cmd":"cut"}: the power goes. From this moment every operation on
 *   the mount fails with EIO and nothing more becomes durable; the reply
 *   lists what was thrown away ("discarded"), then the mount is unmounted
 *   (lazily) and the process exits. A new process over the same BACKING
 *   shows only what was durable.
 * - {"cmd":"unmount"}: a clean unmount: everything made durable, then as
 *   after a cut.
 *
 * SIGTERM and SIGINT act as a cut, and so does the end of the process
 * that started this one (checked every second).
 */
import { spawn } from 'node:child_process'
import * as fs from 'node:fs'
import { createServer, type Socket } from 'node:net'
import { join } from 'node:path'

const EPERM = 1
const ENOENT = 2
const EIO = 5
const EEXIST = 17
const ENOTDIR = 20
const EISDIR = 21
const EINVAL = 22
const ENOSYS = 38
const ENOTEMPTY = 39
const ENAMETOOLONG = 36

const S_IFMT = 0o170000
const S_IFDIR = 0o040000
const S_IFREG = 0o100000
const PAGE = 64 * 1024

/** File contents: pages of PAGE bytes (absent: zeros) and a size. Bytes of a page past the size are always zero. */
class Content {
  pages = new Map<number, Buffer>()
  size = 0
}

interface Link { dir: Inode, name: string }

let nextIno = 1

class Inode {
  /** Also the FUSE node id: the first inode made (the root) is 1, FUSE_ROOT_ID. */
  readonly ino = nextIno++
  readonly kind: 'file' | 'dir'
  mode: number
  durMode: number
  uid = 0
  gid = 0
  /** Names in the volatile tree (files; a directory has one, its parent's entry). */
  nlink = 0
  /** A directory's volatile parent. */
  parent: Inode | undefined
  atime = Date.now()
  mtime = Date.now()
  ctime = Date.now()
  // Files.
  data = new Content()
  dur = new Content()
  /** Pages changed since the last fsync. */
  dirty = new Set<number>()
  // Directories.
  entries = new Map<string, Inode>()
  durEntries = new Map<string, Inode>()
  /** The durable entries that name this inode. */
  readonly durLinks = new Map<string, Link>()

  constructor (kind: 'file' | 'dir', mode: number) {
    this.kind = kind
    this.mode = (kind === 'dir' ? S_IFDIR : S_IFREG) | (mode & 0o7777)
    this.durMode = this.mode
  }
}

const linkKey = (dir: Inode, name: string): string => `${dir.ino}/${name}`

// ---- the tree -------------------------------------------------------------------

class PowerLossTree {
  readonly backing: string
  readonly root: Inode
  /** Every inode by node id (never forgotten). */
  readonly nodes = new Map<number, Inode>()
  readonly stats = { writes: 0, bytesWritten: 0, fsyncs: 0, fsyncdirs: 0, syncs: 0 }

  constructor (backing: string) {
    this.backing = backing
    this.root = this.add(new Inode('dir', fs.statSync(backing).mode))
    this.root.nlink = 1
    this.loadDir(backing, this.root)
  }

  add (n: Inode): Inode {
    this.nodes.set(n.ino, n)
    return n
  }

  private loadDir (abs: string, dir: Inode): void {
    for (const ent of fs.readdirSync(abs, { withFileTypes: true })) {
      const path = join(abs, ent.name)
      let child: Inode
      if (ent.isDirectory()) {
        child = this.add(new Inode('dir', fs.statSync(path).mode))
        child.parent = dir
        this.loadDir(path, child)
      } else if (ent.isFile()) {
        child = this.add(new Inode('file', fs.statSync(path).mode))
        const buf = fs.readFileSync(path)
        for (let off = 0; off < buf.length; off += PAGE) {
          const page = Buffer.alloc(PAGE)
          buf.copy(page, 0, off, Math.min(buf.length, off + PAGE))
          if (page.some((b) => b !== 0)) child.data.pages.set(off / PAGE, page)
        }
        child.data.size = buf.length
        // Volatile and durable share the pages until one is written.
        child.dur.pages = new Map(child.data.pages)
        child.dur.size = child.data.size
      } else {
        process.stderr.write(`powerloss-fs: ${path} is neither a file nor a directory; not served\n`)
        continue
      }
      child.nlink = 1
      dir.entries.set(ent.name, child)
      dir.durEntries.set(ent.name, child)
      child.durLinks.set(linkKey(dir, ent.name), { dir, name: ent.name })
    }
  }

  // ---- volatile changes ----

  read (n: Inode, pos: number, len: number): Buffer {
    const c = n.data
    if (pos >= c.size) return Buffer.alloc(0)
    const total = Math.min(len, c.size - pos)
    const buf = Buffer.alloc(total)
    for (let done = 0; done < total;) {
      const at = pos + done
      const p = Math.floor(at / PAGE)
      const off = at % PAGE
      const k = Math.min(PAGE - off, total - done)
      c.pages.get(p)?.copy(buf, done, off, off + k)
      done += k
    }
    n.atime = Date.now()
    return buf
  }

  /** A page of the volatile data that may be changed (copied first when the durable state shares it). */
  private writablePage (n: Inode, p: number): Buffer {
    let page = n.data.pages.get(p)
    if (page === undefined) {
      page = Buffer.alloc(PAGE)
      n.data.pages.set(p, page)
    } else if (n.dur.pages.get(p) === page) {
      page = Buffer.from(page)
      n.data.pages.set(p, page)
    }
    return page
  }

  write (n: Inode, pos: number, data: Buffer): void {
    for (let done = 0; done < data.length;) {
      const at = pos + done
      const p = Math.floor(at / PAGE)
      const off = at % PAGE
      const k = Math.min(PAGE - off, data.length - done)
      data.copy(this.writablePage(n, p), off, done, done + k)
      n.dirty.add(p)
      done += k
    }
    if (pos + data.length > n.data.size) n.data.size = pos + data.length
    n.mtime = n.ctime = Date.now()
    this.stats.writes++
    this.stats.bytesWritten += data.length
  }

  setSize (n: Inode, size: number): void {
    const c = n.data
    if (size < c.size) {
      const keep = Math.ceil(size / PAGE)
      for (const p of [...c.pages.keys()]) if (p >= keep) { c.pages.delete(p); n.dirty.add(p) }
      for (const p of n.dur.pages.keys()) if (p >= keep) n.dirty.add(p)
      if (size % PAGE !== 0) {
        const p = Math.floor(size / PAGE)
        if (c.pages.has(p)) this.writablePage(n, p).fill(0, size % PAGE)
        n.dirty.add(p)
      }
    }
    c.size = size
    n.mtime = n.ctime = Date.now()
  }

  // ---- durability ----

  /** Every path (relative to the backing directory) where the durable tree names `n`. */
  durPaths (n: Inode, visiting = new Set<Inode>()): string[] {
    if (n === this.root) return ['']
    if (visiting.has(n)) return []
    visiting.add(n)
    const out: string[] = []
    for (const { dir, name } of n.durLinks.values()) {
      for (const p of this.durPaths(dir, visiting)) out.push(`${p}/${name}`)
    }
    visiting.delete(n)
    return out
  }

  /** fsync/fdatasync of a file: its data, size and mode become durable. */
  fsync (n: Inode): void {
    this.stats.fsyncs++
    if (n.kind === 'dir') { this.fsyncDir(n); return }
    const changed = [...n.dirty]
    for (const p of changed) {
      const page = n.data.pages.get(p)
      if (page !== undefined) n.dur.pages.set(p, page)
      else n.dur.pages.delete(p)
    }
    const limit = Math.ceil(n.data.size / PAGE)
    for (const p of [...n.dur.pages.keys()]) if (p >= limit) n.dur.pages.delete(p)
    const modeChanged = n.durMode !== n.mode
    n.dur.size = n.data.size
    n.durMode = n.mode
    n.dirty.clear()
    for (const rel of this.durPaths(n)) this.applyFile(rel, n, changed, modeChanged)
  }

  /** fsync of a directory: its entries become durable. */
  fsyncDir (d: Inode): void {
    this.stats.fsyncdirs++
    const old = d.durEntries
    const now = new Map(d.entries)
    d.durEntries = now
    d.durMode = d.mode
    const gone: string[] = []
    const added: string[] = []
    for (const [name, child] of old) {
      if (now.get(name) !== child) { child.durLinks.delete(linkKey(d, name)); gone.push(name) }
    }
    for (const [name, child] of now) {
      if (old.get(name) !== child) { child.durLinks.set(linkKey(d, name), { dir: d, name }); added.push(name) }
    }
    for (const rel of this.durPaths(d)) {
      const abs = join(this.backing, rel)
      for (const name of gone) fs.rmSync(join(abs, name), { recursive: true, force: true })
      for (const name of added) {
        fs.rmSync(join(abs, name), { recursive: true, force: true })
        this.materialize(now.get(name)!, `${rel}/${name}`, new Set([d]))
      }
    }
  }

  /** Writes the durable state of `n` at `rel` in the backing directory (nothing is there). */
  private materialize (n: Inode, rel: string, stack: Set<Inode>): void {
    const abs = join(this.backing, rel)
    if (n.kind === 'file') {
      const fd = fs.openSync(abs, 'w', n.durMode & 0o7777)
      try {
        for (const [p, page] of [...n.dur.pages].sort((a, b) => a[0] - b[0])) {
          const len = Math.min(PAGE, n.dur.size - p * PAGE)
          if (len > 0) fs.writeSync(fd, page, 0, len, p * PAGE)
        }
        fs.ftruncateSync(fd, n.dur.size)
        fs.fchmodSync(fd, n.durMode & 0o7777)
      } finally { fs.closeSync(fd) }
      return
    }
    if (stack.has(n)) return
    fs.mkdirSync(abs)
    fs.chmodSync(abs, n.durMode & 0o7777)
    stack.add(n)
    for (const [name, child] of n.durEntries) this.materialize(child, `${rel}/${name}`, stack)
    stack.delete(n)
  }

  /** Brings the backing file at `rel` (holding the previous durable state of `n`) to its new durable state. */
  private applyFile (rel: string, n: Inode, changed: number[], modeChanged: boolean): void {
    const abs = join(this.backing, rel)
    let fd: number
    try {
      fd = fs.openSync(abs, 'r+')
    } catch {
      fs.rmSync(abs, { recursive: true, force: true })
      this.materialize(n, rel, new Set())
      return
    }
    try {
      for (const p of changed) {
        const len = Math.min(PAGE, n.dur.size - p * PAGE)
        if (len <= 0) continue
        fs.writeSync(fd, n.dur.pages.get(p) ?? Buffer.alloc(PAGE), 0, len, p * PAGE)
      }
      fs.ftruncateSync(fd, n.dur.size)
      if (modeChanged) fs.fchmodSync(fd, n.durMode & 0o7777)
    } finally { fs.closeSync(fd) }
  }

  /** sync(2): every file (open ones too), then every directory (top down), made durable. */
  syncAll (open: Iterable<Inode>): void {
    this.stats.syncs++
    const dirs: Inode[] = []
    const files = new Set<Inode>(open)
    const walk = (d: Inode): void => {
      dirs.push(d)
      for (const c of d.entries.values()) {
        if (c.kind === 'dir') walk(c)
        else files.add(c)
      }
    }
    walk(this.root)
    for (const f of files) if (f.kind === 'file') this.fsync(f)
    for (const d of dirs) this.fsyncDir(d)
  }

  /** What a cut would throw away now, one line each. */
  volatile (open: Iterable<Inode>): string[] {
    const out: string[] = []
    const seen = new Set<Inode>()
    const fileLine = (f: Inode, path: string): void => {
      if (seen.has(f)) return
      seen.add(f)
      if (f.dirty.size > 0 || f.data.size !== f.dur.size) {
        out.push(`data of ${path}: ${f.dirty.size} page(s) changed, size ${f.data.size} (durable ${f.dur.size})${this.durPaths(f).length === 0 ? ', name not durable' : ''}`)
      }
    }
    const walk = (d: Inode, path: string): void => {
      seen.add(d)
      const plus: string[] = []
      const minus: string[] = []
      for (const [name, c] of d.entries) if (d.durEntries.get(name) !== c) plus.push(name)
      for (const [name, c] of d.durEntries) if (d.entries.get(name) !== c) minus.push(name)
      if (plus.length + minus.length > 0) {
        out.push(`entries of ${path || '/'}: ${[...plus.map((n) => `+${n}`), ...minus.map((n) => `-${n}`)].join(' ')}`)
      }
      for (const [name, c] of d.entries) {
        if (c.kind === 'dir') walk(c, `${path}/${name}`)
        else fileLine(c, `${path}/${name}`)
      }
    }
    walk(this.root, '')
    for (const f of open) if (f.kind === 'file') fileLine(f, `(unlinked, open) inode ${f.ino}`)
    return out
  }
}

// ---- the FUSE protocol (linux/fuse.h) ---------------------------------------------------

const OP = {
  LOOKUP: 1, FORGET: 2, GETATTR: 3, SETATTR: 4, READLINK: 5, SYMLINK: 6, MKNOD: 8, MKDIR: 9, UNLINK: 10, RMDIR: 11,
  RENAME: 12, LINK: 13, OPEN: 14, READ: 15, WRITE: 16, STATFS: 17, RELEASE: 18, FSYNC: 20, FLUSH: 25, INIT: 26,
  OPENDIR: 27, READDIR: 28, RELEASEDIR: 29, FSYNCDIR: 30, ACCESS: 34, CREATE: 35, INTERRUPT: 36, DESTROY: 38,
  NOTIFY_REPLY: 41, BATCH_FORGET: 42, RENAME2: 45
} as const
const IN_HEADER = 40
const OUT_HEADER = 16
const ATTR_SIZE = 88
const FUSE_ASYNC_READ = 1 << 0
const FUSE_BIG_WRITES = 1 << 5
const FUSE_MAX_PAGES = 1 << 22
const MAX_WRITE = 1024 * 1024
const FATTR_MODE = 1
const FATTR_UID = 2
const FATTR_GID = 4
const FATTR_SIZE = 8
const FATTR_ATIME = 16
const FATTR_MTIME = 32
const FATTR_ATIME_NOW = 128
const FATTR_MTIME_NOW = 256
const RENAME_NOREPLACE = 1

class FuseError extends Error {
  readonly errno: number
  constructor (errno: number) { super(`errno ${errno}`); this.errno = errno }
}
const fail = (errno: number): never => { throw new FuseError(errno) }

function encodeAttr (b: Buffer, at: number, n: Inode): void {
  const size = n.kind === 'dir' ? 4096 : n.data.size
  let nlink = n.nlink
  if (n.kind === 'dir') {
    nlink = 2
    for (const c of n.entries.values()) if (c.kind === 'dir') nlink++
  }
  b.writeBigUInt64LE(BigInt(n.ino), at)
  b.writeBigUInt64LE(BigInt(size), at + 8)
  b.writeBigUInt64LE(BigInt(n.kind === 'dir' ? 8 : n.data.pages.size * (PAGE / 512)), at + 16)
  b.writeBigUInt64LE(BigInt(Math.floor(n.atime / 1000)), at + 24)
  b.writeBigUInt64LE(BigInt(Math.floor(n.mtime / 1000)), at + 32)
  b.writeBigUInt64LE(BigInt(Math.floor(n.ctime / 1000)), at + 40)
  b.writeUInt32LE((n.atime % 1000) * 1e6, at + 48)
  b.writeUInt32LE((n.mtime % 1000) * 1e6, at + 52)
  b.writeUInt32LE((n.ctime % 1000) * 1e6, at + 56)
  b.writeUInt32LE(n.mode, at + 60)
  b.writeUInt32LE(nlink, at + 64)
  b.writeUInt32LE(n.uid, at + 68)
  b.writeUInt32LE(n.gid, at + 72)
  b.writeUInt32LE(0, at + 76) // rdev
  b.writeUInt32LE(4096, at + 80) // blksize
  b.writeUInt32LE(0, at + 84)
}

/**
 * How long the kernel may keep names and attributes (seconds). Every
 * change goes through this one mount, so the kernel's caches never go
 * stale (and a cut ends the mount with them).
 */
const CACHE_SECONDS = 10n

function entryOut (n: Inode): Buffer {
  const b = Buffer.alloc(40 + ATTR_SIZE)
  b.writeBigUInt64LE(BigInt(n.ino), 0)
  b.writeBigUInt64LE(CACHE_SECONDS, 16)
  b.writeBigUInt64LE(CACHE_SECONDS, 24)
  encodeAttr(b, b.length - ATTR_SIZE, n)
  return b
}

function attrOut (n: Inode): Buffer {
  const b = Buffer.alloc(16 + ATTR_SIZE)
  b.writeBigUInt64LE(CACHE_SECONDS, 0)
  encodeAttr(b, 16, n)
  return b
}

function openOut (fh: number): Buffer {
  const b = Buffer.alloc(16)
  b.writeBigUInt64LE(BigInt(fh), 0)
  return b
}

/** A NUL-terminated name at `at`; the offset after it. */
function cstring (b: Buffer, at: number): [string, number] {
  const end = b.indexOf(0, at)
  if (end === -1) fail(EINVAL)
  const name = b.toString('utf8', at, end)
  if (Buffer.byteLength(name) > 255) fail(ENAMETOOLONG)
  if (name === '' || name === '.' || name === '..' || name.includes('/')) fail(EINVAL)
  return [name, end + 1]
}

interface Handle { inode: Inode, flags: number, names?: string[] }

function main (): void {
  const [backing, mountpoint, control] = process.argv.slice(2)
  if (backing === undefined || mountpoint === undefined || control === undefined) {
    process.stderr.write('usage: powerloss-fs BACKING MOUNTPOINT CONTROL_SOCKET\n')
    process.exit(2)
  }
  const tree = new PowerLossTree(backing)
  const handles = new Map<number, Handle>()
  let nextFh = 1
  let frozen = false
  let mounted = false
  let exiting = false

  const openInodes = (): Inode[] => [...new Set([...handles.values()].map((h) => h.inode))]
  const node = (id: bigint): Inode => tree.nodes.get(Number(id)) ?? fail(ENOENT)
  const dirNode = (id: bigint): Inode => { const d = node(id); if (d.kind !== 'dir') fail(ENOTDIR); return d }
  const handle = (fh: bigint): Handle => handles.get(Number(fh)) ?? fail(EINVAL)

  /** Makes `n` an entry `name` of `dir` (nothing there yet). */
  const link = (dir: Inode, name: string, n: Inode): void => {
    dir.entries.set(name, n)
    n.nlink++
    if (n.kind === 'dir') n.parent = dir
    dir.mtime = dir.ctime = Date.now()
  }
  const unlink = (dir: Inode, name: string): void => {
    const n = dir.entries.get(name)
    if (n === undefined) return
    dir.entries.delete(name)
    n.nlink--
    if (n.kind === 'dir' && n.parent === dir) n.parent = undefined
    n.ctime = dir.mtime = dir.ctime = Date.now()
  }

  /** Serves one request; returns the reply's payload (undefined: no reply). */
  const serve = (op: number, nodeid: bigint, uid: number, gid: number, b: Buffer): Buffer | undefined => {
    switch (op) {
      case OP.INIT: {
        const kernelMinor = b.readUInt32LE(4)
        const maxReadahead = b.readUInt32LE(8)
        const kernelFlags = b.readUInt32LE(12)
        const out = Buffer.alloc(64)
        out.writeUInt32LE(7, 0)
        out.writeUInt32LE(Math.min(kernelMinor, 31), 4)
        out.writeUInt32LE(maxReadahead, 8)
        out.writeUInt32LE(kernelFlags & (FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES), 12)
        out.writeUInt16LE(16, 16) // max_background
        out.writeUInt16LE(12, 18) // congestion_threshold
        out.writeUInt32LE(MAX_WRITE, 20)
        out.writeUInt32LE(1, 24) // time_gran
        out.writeUInt16LE(MAX_WRITE / 4096, 28) // max_pages
        return out
      }
      case OP.DESTROY: return Buffer.alloc(0)
      case OP.FORGET: case OP.BATCH_FORGET: case OP.INTERRUPT: case OP.NOTIFY_REPLY: return undefined
    }
    if (frozen) fail(EIO)
    switch (op) {
      case OP.LOOKUP: {
        const [name] = cstring(b, 0)
        return entryOut(dirNode(nodeid).entries.get(name) ?? fail(ENOENT))
      }
      case OP.GETATTR: return attrOut(node(nodeid))
      case OP.SETATTR: {
        const n = node(nodeid)
        const valid = b.readUInt32LE(0)
        if ((valid & FATTR_MODE) !== 0) n.mode = (n.mode & S_IFMT) | (b.readUInt32LE(68) & 0o7777)
        if ((valid & FATTR_UID) !== 0) n.uid = b.readUInt32LE(76)
        if ((valid & FATTR_GID) !== 0) n.gid = b.readUInt32LE(80)
        if ((valid & FATTR_SIZE) !== 0) {
          if (n.kind !== 'file') fail(EISDIR)
          tree.setSize(n, Number(b.readBigUInt64LE(16)))
        }
        if ((valid & FATTR_ATIME) !== 0) n.atime = (valid & FATTR_ATIME_NOW) !== 0 ? Date.now() : Number(b.readBigUInt64LE(32)) * 1000 + Math.floor(b.readUInt32LE(56) / 1e6)
        if ((valid & FATTR_MTIME) !== 0) n.mtime = (valid & FATTR_MTIME_NOW) !== 0 ? Date.now() : Number(b.readBigUInt64LE(40)) * 1000 + Math.floor(b.readUInt32LE(60) / 1e6)
        n.ctime = Date.now()
        return attrOut(n)
      }
      case OP.MKNOD: case OP.MKDIR: case OP.CREATE: {
        const dir = dirNode(nodeid)
        const mode = b.readUInt32LE(op === OP.CREATE ? 4 : 0)
        const umask = b.readUInt32LE(op === OP.CREATE ? 8 : op === OP.MKNOD ? 8 : 4)
        const [name] = cstring(b, op === OP.MKDIR ? 8 : 16)
        if (op === OP.MKNOD && (mode & S_IFMT) !== S_IFREG) fail(EPERM)
        if (dir.entries.has(name)) fail(EEXIST)
        const n = tree.add(new Inode(op === OP.MKDIR ? 'dir' : 'file', mode & ~umask))
        n.uid = uid
        n.gid = gid
        link(dir, name, n)
        if (op !== OP.CREATE) return entryOut(n)
        const fh = nextFh++
        handles.set(fh, { inode: n, flags: b.readUInt32LE(0) })
        return Buffer.concat([entryOut(n), openOut(fh)])
      }
      case OP.UNLINK: case OP.RMDIR: {
        const dir = dirNode(nodeid)
        const [name] = cstring(b, 0)
        const n = dir.entries.get(name) ?? fail(ENOENT)
        if (op === OP.UNLINK && n.kind === 'dir') fail(EISDIR)
        if (op === OP.RMDIR && n.kind !== 'dir') fail(ENOTDIR)
        if (op === OP.RMDIR && n.entries.size > 0) fail(ENOTEMPTY)
        unlink(dir, name)
        return Buffer.alloc(0)
      }
      case OP.RENAME: case OP.RENAME2: {
        const from = dirNode(nodeid)
        const to = dirNode(b.readBigUInt64LE(0))
        const flags = op === OP.RENAME2 ? b.readUInt32LE(8) : 0
        if ((flags & ~RENAME_NOREPLACE) !== 0) fail(EINVAL)
        const [oldName, next] = cstring(b, op === OP.RENAME2 ? 16 : 8)
        const [newName] = cstring(b, next)
        const n = from.entries.get(oldName) ?? fail(ENOENT)
        const target = to.entries.get(newName)
        if (target === n) return Buffer.alloc(0)
        if (target !== undefined && (flags & RENAME_NOREPLACE) !== 0) fail(EEXIST)
        if (n.kind === 'dir') {
          for (let d: Inode | undefined = to; d !== undefined; d = d.parent) if (d === n) fail(EINVAL)
          if (target !== undefined && target.kind !== 'dir') fail(ENOTDIR)
          if (target !== undefined && target.entries.size > 0) fail(ENOTEMPTY)
        } else if (target !== undefined && target.kind === 'dir') fail(EISDIR)
        if (target !== undefined) unlink(to, newName)
        unlink(from, oldName)
        link(to, newName, n)
        return Buffer.alloc(0)
      }
      case OP.LINK: case OP.SYMLINK: fail(EPERM); break
      case OP.READLINK: fail(EINVAL); break
      case OP.OPEN: case OP.OPENDIR: {
        const n = node(nodeid)
        if (op === OP.OPEN && n.kind === 'dir') fail(EISDIR)
        if (op === OP.OPENDIR && n.kind !== 'dir') fail(ENOTDIR)
        const fh = nextFh++
        handles.set(fh, { inode: n, flags: b.readUInt32LE(0), ...(op === OP.OPENDIR ? { names: [...n.entries.keys()] } : {}) })
        return openOut(fh)
      }
      case OP.READ: {
        const h = handle(b.readBigUInt64LE(0))
        return tree.read(h.inode, Number(b.readBigUInt64LE(8)), b.readUInt32LE(16))
      }
      case OP.WRITE: {
        const h = handle(b.readBigUInt64LE(0))
        const size = b.readUInt32LE(16)
        tree.write(h.inode, Number(b.readBigUInt64LE(8)), b.subarray(40, 40 + size))
        if ((h.flags & (fs.constants.O_SYNC | fs.constants.O_DSYNC)) !== 0) tree.fsync(h.inode)
        const out = Buffer.alloc(8)
        out.writeUInt32LE(size, 0)
        return out
      }
      case OP.READDIR: {
        const h = handle(b.readBigUInt64LE(0))
        const names = h.names ?? []
        const size = b.readUInt32LE(16)
        const out: Buffer[] = []
        let used = 0
        for (let i = Number(b.readBigUInt64LE(8)); i < names.length + 2; i++) {
          const name = i === 0 ? '.' : i === 1 ? '..' : names[i - 2]!
          const target = i === 0 ? h.inode : i === 1 ? (h.inode.parent ?? h.inode) : h.inode.entries.get(name)
          if (target === undefined) continue // gone since the opendir
          const nameLen = Buffer.byteLength(name)
          const entLen = (24 + nameLen + 7) & ~7
          if (used + entLen > size) break
          const e = Buffer.alloc(entLen)
          e.writeBigUInt64LE(BigInt(target.ino), 0)
          e.writeBigUInt64LE(BigInt(i + 1), 8)
          e.writeUInt32LE(nameLen, 16)
          e.writeUInt32LE((target.mode & S_IFMT) >> 12, 20)
          e.write(name, 24)
          out.push(e)
          used += entLen
        }
        return Buffer.concat(out)
      }
      case OP.RELEASE: case OP.RELEASEDIR:
        handles.delete(Number(b.readBigUInt64LE(0)))
        return Buffer.alloc(0)
      case OP.FLUSH: return Buffer.alloc(0)
      case OP.FSYNC: case OP.FSYNCDIR: {
        const n = handles.get(Number(b.readBigUInt64LE(0)))?.inode ?? node(nodeid)
        if (n.kind === 'dir') tree.fsyncDir(n)
        else tree.fsync(n)
        return Buffer.alloc(0)
      }
      case OP.STATFS: {
        const st = fs.statfsSync(backing)
        const out = Buffer.alloc(80)
        out.writeBigUInt64LE(BigInt(st.blocks), 0)
        out.writeBigUInt64LE(BigInt(st.bfree), 8)
        out.writeBigUInt64LE(BigInt(st.bavail), 16)
        out.writeBigUInt64LE(BigInt(st.files), 24)
        out.writeBigUInt64LE(BigInt(st.ffree), 32)
        out.writeUInt32LE(st.bsize, 40)
        out.writeUInt32LE(255, 44)
        out.writeUInt32LE(st.bsize, 48)
        return out
      }
    }
    return fail(ENOSYS)
  }

  // ---- the device ----

  const dev = fs.openSync('/dev/fuse', 'r+')
  const reply = (unique: bigint, error: number, payload?: Buffer): void => {
    const out = Buffer.alloc(OUT_HEADER + (payload?.length ?? 0))
    out.writeUInt32LE(out.length, 0)
    out.writeInt32LE(-error, 4)
    out.writeBigUInt64LE(unique, 8)
    payload?.copy(out, OUT_HEADER)
    // A request the kernel gave up on (interrupted, aborted) cannot be answered: ENOENT.
    try { fs.writeSync(dev, out) } catch {}
  }
  /** Reads of the device at once (each one holds a libuv pool thread while it waits). */
  const READERS = 3
  const readNext = (buf: Buffer): void => {
    fs.read(dev, buf, 0, buf.length, null, (err, n) => {
      if (err !== null) {
        const code = (err as NodeJS.ErrnoException).code
        // ENODEV: unmounted, or the connection was aborted.
        if (code === 'ENODEV' || exiting) exit(0)
        if (code !== 'EINTR' && code !== 'EAGAIN' && code !== 'ENOENT') {
          process.stderr.write(`powerloss-fs: reading /dev/fuse: ${err.message}\n`)
          exit(1)
        }
        readNext(buf)
        return
      }
      const len = buf.readUInt32LE(0)
      const op = buf.readUInt32LE(4)
      const unique = buf.readBigUInt64LE(8)
      const nodeid = buf.readBigUInt64LE(16)
      const body = buf.subarray(IN_HEADER, Math.min(len, n))
      try {
        const out = serve(op, nodeid, buf.readUInt32LE(24), buf.readUInt32LE(28), body)
        if (out !== undefined) reply(unique, 0, out)
        if (op === OP.INIT && !mounted) {
          mounted = true
          process.stdout.write('powerloss-fs: ready\n')
        }
      } catch (e) {
        if (e instanceof FuseError) reply(unique, e.errno)
        else {
          process.stderr.write(`powerloss-fs: opcode ${op}: ${(e as Error).stack ?? String(e)}\n`)
          reply(unique, EIO)
        }
      }
      readNext(buf)
    })
  }

  /**
   * The end of this process. Not process.exit(): that waits for the libuv
   * pool threads, and those blocked reading /dev/fuse return only when the
   * connection goes, which is what the end of this process does.
   */
  const exit = (code: number): never => {
    if (code !== 0) process.stderr.write(`powerloss-fs: exiting (${code})\n`)
    process.kill(process.pid, 'SIGKILL')
    return process.exit(code)
  }

  /** Unmounts lazily (the files a dead node had open do not hold the mount) and exits. */
  const unmountAndExit = (): void => {
    if (exiting) return
    exiting = true
    setTimeout(() => exit(1), 10_000).unref()
    const u = spawn('umount', ['-l', mountpoint], { stdio: ['ignore', 'ignore', 'pipe'] })
    let err = ''
    u.stderr.on('data', (c: Buffer) => { err += c.toString() })
    u.on('close', (code) => {
      if (code !== 0) process.stderr.write(`powerloss-fs: umount -l ${mountpoint}: ${err.trim()}\n`)
      exit(code === 0 ? 0 : 1)
    })
  }

  const cut = (): string[] => {
    if (frozen) return []
    frozen = true
    return tree.volatile(openInodes())
  }

  const command = (line: string): Record<string, unknown> & { after?: () => void } => {
    let req: { cmd?: unknown }
    try { req = JSON.parse(line) } catch { return { ok: false, error: 'not JSON' } }
    if (frozen && req.cmd !== 'ping' && req.cmd !== 'status') return { ok: false, error: 'the power is cut' }
    switch (req.cmd) {
      case 'ping': return { ok: true }
      case 'status': return { ok: true, frozen, stats: tree.stats, volatile: frozen ? [] : tree.volatile(openInodes()) }
      case 'sync': tree.syncAll(openInodes()); return { ok: true }
      case 'cut': return { ok: true, discarded: cut(), after: unmountAndExit }
      case 'unmount': tree.syncAll(openInodes()); frozen = true; return { ok: true, after: unmountAndExit }
      default: return { ok: false, error: `unknown command ${JSON.stringify(req.cmd)}` }
    }
  }

  const server = createServer((sock: Socket) => {
    let buffered = ''
    sock.setEncoding('utf8')
    sock.on('error', () => {})
    sock.on('data', (chunk: string) => {
      buffered += chunk
      for (let i = buffered.indexOf('\n'); i !== -1; i = buffered.indexOf('\n')) {
        const line = buffered.slice(0, i)
        buffered = buffered.slice(i + 1)
        const { after, ...answer } = command(line)
        sock.write(JSON.stringify(answer) + '\n', () => after?.())
      }
    })
  })
  fs.rmSync(control, { force: true })
  fs.mkdirSync(mountpoint, { recursive: true })
  server.listen(control, () => {
    // The kernel's first request is INIT; /dev/fuse can be read once mount(2) is done.
    const m = spawn('mount', ['-i', '-t', 'fuse.powerloss', '-o', `fd=3,rootmode=40000,user_id=0,group_id=0,allow_other`, 'powerloss', mountpoint],
      { stdio: ['ignore', 'ignore', 'pipe', dev] })
    let err = ''
    m.stderr!.on('data', (c: Buffer) => { err += c.toString() })
    m.on('close', (code) => {
      if (code !== 0) {
        process.stderr.write(`powerloss-fs: mount failed: ${err.trim() || `exit ${code}`}\n`)
        exit(1)
      }
      for (let i = 0; i < READERS; i++) readNext(Buffer.alloc(MAX_WRITE + 64 * 1024))
    })
  })
  for (const sig of ['SIGTERM', 'SIGINT'] as const) {
    process.on(sig, () => { cut(); unmountAndExit() })
  }
  // The process that started this one went away without ending it: a cut.
  const parent = process.ppid
  setInterval(() => { if (process.ppid !== parent) { cut(); unmountAndExit() } }, 1000).unref()
}

main()
