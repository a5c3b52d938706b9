/**
 * This node's block files: `<image_root>/<image>/<blockname_format % i>`.
 *
 * - Files are sparse and created on the first write; inside an image's
 *   directory, a missing file or the part past a file's end reads as
 *   zeros. The image directory itself is made when the image is
 *   allocated here; if it is missing, the replica is lost and reads fail
 *   (we never invent zeros for data we should have).
 * - File handles stay open in an LRU (never open/close per I/O) and all
 *   I/O is positional.
 * - flush() fsyncs every file of the image written since the last flush,
 *   including files whose handle was evicted meanwhile (their fsync is
 *   awaited, and its error reported, by the flush). The first flush of an
 *   image in a process fsyncs every file of it: an earlier process may
 *   have written and acknowledged what it never synced.
 * - An fsync that failed is never forgotten: the kernel may have dropped
 *   the dirty pages, so a retried fsync would succeed on lost data. Every
 *   later flush of the image fails until the image is destroyed here.
 * - An image's directory is bound to one incarnation of the image (the id
 *   the metadata store gives each image it creates, and the store
 *   revision it was created at, which only grows from one image of a name
 *   to the next): `.incarnation` in the directory names both (`bind`).
 *   Block files of an older incarnation (an image of the same name
 *   destroyed while this node was away) are removed before the directory
 *   serves the new one: they are never read as its data. A caller whose
 *   view of the image is older than the directory's is refused, never
 *   let to remove the newer image's files.
 */
import * as fs from 'node:fs'
import { join } from 'node:path'
import { UkaiError } from '../errors.js'
import { validateImageName } from '../metadata/names.js'
import { blockNameParser, parseBlockNameFormat, type BlockNamer } from './block-name.js'
import { mkdirDurable, replaceFileDurable, rmDurable } from '../util/durable-fs.js'
import type { Range } from '../metadata/range-set.js'
import { dataExtents, punchHole } from './sparse.js'
import { readAt, writeAt } from './batched-io.js'

/** The file in an image's directory that names the incarnation its block files belong to. */
export const INCARNATION_FILE = '.incarnation'

/**
 * What `bind` found: the directory was made, already of this incarnation,
 * adopted (it had no marker: made before markers, or the original's
 * layout), or held an older incarnation's files, which were removed.
 */
export type BindResult = 'made' | 'kept' | 'adopted' | 'wiped'

/** One incarnation of an image: its id, and the metadata store revision it was created at. */
export interface Incarnation { id: string, created: number }

interface Handle {
  key: string
  image: string
  /** -1 while the block file does not exist. */
  fd: number
  /** I/O in flight; an entry in use is never closed. */
  users: number
  dirty: boolean
}

const pWrite = (fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> =>
  new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (e, n) => e ? reject(e) : resolve(n)))
const pFsync = (fd: number): Promise<void> =>
  new Promise((resolve, reject) => fs.fdatasync(fd, (e) => e ? reject(e) : resolve()))
const pClose = (fd: number): Promise<void> =>
  new Promise((resolve, reject) => fs.close(fd, (e) => e ? reject(e) : resolve()))
const pOpen = (path: string, flags: number): Promise<number> =>
  new Promise((resolve, reject) => fs.open(path, flags, 0o644, (e, fd) => e ? reject(e) : resolve(fd)))
const pFstat = (fd: number): Promise<fs.Stats> =>
  new Promise((resolve, reject) => fs.fstat(fd, (e, st) => e ? reject(e) : resolve(st)))

export type DiscardMode = 'trim' | 'zero' | 'zero-allocated'

export interface BlockStoreOptions {
  /** Most block files kept open at once. */
  maxOpen?: number
}

export class BlockStore {
  readonly root: string
  private readonly name: BlockNamer
  private readonly maxOpen: number
  // Insertion order is recency order: a use re-inserts the entry.
  private readonly handles = new Map<string, Handle>()
  private readonly opening = new Map<string, Promise<Handle>>()
  /** fsyncs of evicted handles still running, per image: a flush waits for them. */
  private readonly evicting = new Map<string, Set<Promise<void>>>()
  /** Images whose every file was synced by this process (see flush). */
  private readonly syncedAll = new Set<string>()
  /** Per image, the first fsync that failed (see the module comment). */
  private readonly failed = new Map<string, Error>()
  /** Images with block files created since their last flush: the directory's entries need an fsync too. */
  private readonly newFiles = new Set<string>()
  /** The block a file name in an image directory is of (undefined: not a block file). */
  private readonly blockOf: (name: string) => number | undefined
  /** Block files being removed (image/block): no I/O may open them meanwhile. */
  private readonly removing = new Set<string>()
  /** Per image, the incarnation (id) its directory was bound to by this process. */
  private readonly bound = new Map<string, string>()
  /** False once the file system refused to punch a hole (EOPNOTSUPP): zeroing writes zeros. */
  private punches = true
  /** Binds in progress, per image (one at a time). */
  private readonly binding = new Map<string, Promise<BindResult>>()

  constructor (root: string, blocknameFormat: string, options: BlockStoreOptions = {}) {
    this.root = root
    this.name = parseBlockNameFormat(blocknameFormat)
    this.blockOf = blockNameParser(blocknameFormat)
    this.maxOpen = options.maxOpen ?? 1024
  }

  imageDir (image: string): string {
    return join(this.root, validateImageName(image))
  }

  blockPath (image: string, block: number): string {
    return join(this.imageDir(image), this.name(block))
  }

  /**
   * Makes the image's directory, durably, bound to no incarnation
   * (`bind` allocates a node's replicas). Existing block files are kept.
   */
  async allocate (image: string): Promise<void> {
    await mkdirDurable(this.imageDir(image))
  }

  /**
   * The incarnation the image's block files belong to: null when the
   * directory is missing, undefined when it names none.
   */
  async incarnationOf (image: string): Promise<Incarnation | null | undefined> {
    let text: string
    try {
      text = await fs.promises.readFile(join(this.imageDir(image), INCARNATION_FILE), 'utf8')
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
      return await this.has(image) ? undefined : null
    }
    const [id, created] = text.trim().split(/\s+/)
    const n = Number(created)
    return id === undefined || id === '' ? undefined : { id, created: Number.isSafeInteger(n) ? n : 0 }
  }

  /**
   * Binds the image's directory to `incarnation`, durably: made when
   * missing; a directory that names no incarnation is adopted with its
   * files; one of an older incarnation has its files removed first,
   * unless `adopt` (an import of metadata for block files already there).
   * One of a newer incarnation is refused (UKAI_ERR_UNAVAILABLE): the
   * caller's view of the image is out of date.
   */
  async bind (image: string, incarnation: Incarnation, options: { adopt?: boolean } = {}): Promise<BindResult> {
    if (this.bound.get(image) === incarnation.id) return 'kept'
    const busy = this.binding.get(image)
    if (busy !== undefined) {
      await busy.catch(() => {})
      return await this.bind(image, incarnation, options)
    }
    const run = this.bindOnce(image, incarnation, options.adopt === true).finally(() => this.binding.delete(image))
    this.binding.set(image, run)
    return await run
  }

  private async bindOnce (image: string, incarnation: Incarnation, adopt: boolean): Promise<BindResult> {
    const dir = this.imageDir(image)
    const had = await this.incarnationOf(image)
    let result: BindResult
    if (had !== null && had !== undefined && had.id === incarnation.id) result = 'kept'
    else if (had === null) {
      await mkdirDurable(dir)
      result = 'made'
    } else if (had === undefined || adopt) {
      result = 'adopted'
    } else if (had.created > incarnation.created) {
      throw new UkaiError('UKAI_ERR_UNAVAILABLE', `image '${image}': the block files here belong to a newer image of that name than this node knows yet; try again`, { image })
    } else {
      // An older image's data under this name: gone before anything reads it.
      await this.closeImage(image).catch(() => {})
      await rmDurable(dir)
      this.failed.delete(image)
      this.syncedAll.delete(image)
      await mkdirDurable(dir)
      result = 'wiped'
    }
    if (result !== 'kept') {
      await replaceFileDurable(join(dir, INCARNATION_FILE), join(dir, `${INCARNATION_FILE}.tmp`), `${incarnation.id} ${incarnation.created}\n`)
    }
    this.bound.set(image, incarnation.id)
    return result
  }

  async has (image: string): Promise<boolean> {
    try {
      return (await fs.promises.stat(this.imageDir(image))).isDirectory()
    } catch { return false }
  }

  /** Removes every block file of the image on this node, durably. */
  async destroy (image: string): Promise<void> {
    await this.closeImage(image).catch(() => {})
    await rmDurable(this.imageDir(image))
    this.failed.delete(image)
    this.syncedAll.delete(image)
    this.bound.delete(image)
  }

  /**
   * Removes the block files of `image` whose block `keep` turns down (the
   * node no longer holds those blocks): I/O already on such a file
   * finishes first, then its handle is dropped (its data with it: nothing
   * is synced) and the file unlinked; I/O that asks for such a block while
   * it is removed is refused. Returns how many files went.
   */
  async removeBlocks (image: string, keep: (block: number) => boolean): Promise<number> {
    let names: string[]
    try {
      names = await fs.promises.readdir(this.imageDir(image))
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0
      throw err
    }
    let removed = 0
    for (const file of names) {
      const block = this.blockOf(file)
      if (block === undefined || keep(block)) continue
      const key = `${image}/${block}`
      this.removing.add(key)
      try {
        for (;;) {
          const opening = this.opening.get(key)
          if (opening !== undefined) { await opening.catch(() => {}); continue }
          const h = this.handles.get(key)
          if (h !== undefined && h.users > 0) { await new Promise((resolve) => setTimeout(resolve, 2)); continue }
          if (h !== undefined) {
            this.handles.delete(key)
            if (h.fd >= 0) await pClose(h.fd).catch(() => {})
          }
          break
        }
        await fs.promises.unlink(join(this.imageDir(image), file)).catch((err: NodeJS.ErrnoException) => { if (err.code !== 'ENOENT') throw err })
        removed++
      } finally {
        this.removing.delete(key)
      }
    }
    if (removed > 0) this.newFiles.add(image)
    return removed
  }

  /** Reads `buf.length` bytes of block `block` at `offset`; holes and missing files read as zeros. */
  async read (image: string, block: number, offset: number, buf: Buffer): Promise<void> {
    const h = await this.acquire(image, block, false)
    try {
      const done = h.fd >= 0 ? await readAt(h.fd, buf, offset) : 0
      if (done < buf.length) buf.fill(0, done)
    } finally { this.release(h) }
  }

  async write (image: string, block: number, offset: number, data: Buffer): Promise<void> {
    const h = await this.acquire(image, block, true)
    try {
      await writeAt(h.fd, data, offset)
      h.dirty = true
    } finally { this.release(h) }
  }

  /**
   * Discards or zeroes [offset, offset+length) of a block:
   * - 'trim' and 'zero': the range reads as zeros afterwards and its space
   *   is freed: it becomes a hole (fallocate PUNCH_HOLE; on a file system
   *   that cannot punch holes, zeros are written up to the file's end). The file keeps
   *   its length: cutting it short would race with a write past the range
   *   (a write that lands between the size check and the cut is lost).
   * - 'zero-allocated': the range reads as zeros and stays allocated (NBD's
   *   NO_HOLE): zeros are written everywhere.
   */
  async discard (image: string, block: number, offset: number, length: number, mode: DiscardMode): Promise<void> {
    const h = await this.acquire(image, block, mode === 'zero-allocated')
    try {
      if (h.fd < 0 || length === 0) return
      let end = offset + length
      if (mode !== 'zero-allocated') {
        if (this.punches) {
          try {
            await punchHole(h.fd, offset, length)
            h.dirty = true
            return
          } catch (err) {
            // A file system that cannot punch holes: zeros are written instead, from now on.
            if ((err as NodeJS.ErrnoException).code !== 'EOPNOTSUPP') throw err
            this.punches = false
          }
        }
        // Only what the file holds: zeros past its end would grow it.
        end = Math.min(end, (await pFstat(h.fd)).size)
        if (end <= offset) return
      }
      const chunk = Buffer.alloc(Math.min(end - offset, 1 << 20))
      for (let at = offset; at < end;) at += await pWrite(h.fd, chunk, 0, Math.min(chunk.length, end - at), at)
      h.dirty = true
    } finally { this.release(h) }
  }

  /**
   * The data ranges of a block's file within [start, end) (offsets in the
   * block); everything else reads as zeros. A missing file has none.
   */
  async dataExtents (image: string, block: number, start: number, end: number): Promise<Range[]> {
    const h = await this.acquire(image, block, false)
    try {
      return h.fd < 0 ? [] : await dataExtents(h.fd, start, end)
    } finally { this.release(h) }
  }

  /** Bytes of the block's file that exist (0 when it was never written). */
  async allocatedLength (image: string, block: number): Promise<number> {
    const h = await this.acquire(image, block, false)
    try {
      return h.fd < 0 ? 0 : (await pFstat(h.fd)).size
    } finally { this.release(h) }
  }

  /** fsyncs every block file of the image written since its last flush (see the module comment). */
  async flush (image: string): Promise<void> {
    const pending: Array<Promise<void>> = [...(this.evicting.get(image) ?? [])]
    for (const h of this.handles.values()) {
      if (h.image === image && h.dirty && h.fd >= 0) {
        h.dirty = false
        h.users++
        pending.push(this.sync(image, h.fd).finally(() => this.release(h)))
      }
    }
    if (!this.syncedAll.has(image)) pending.push(this.syncEverything(image))
    else if (this.newFiles.has(image)) {
      // A file's fsync makes its data durable, not its name.
      this.newFiles.delete(image)
      pending.push(this.syncDir(image))
    }
    await Promise.all(pending)
    const failed = this.failed.get(image)
    if (failed !== undefined) {
      throw new UkaiError('UKAI_ERR_IO', `image '${image}': an fsync of its block files on this node failed (${failed.message}); what it held may be lost`, { image })
    }
  }

  /** fdatasync of one file; a failure is remembered for the image. */
  private async sync (image: string, fd: number): Promise<void> {
    try {
      await pFsync(fd)
    } catch (err) {
      if (!this.failed.has(image)) this.failed.set(image, err as Error)
    }
  }

  /** fsyncs every block file of the image and its directory, once per process. */
  private async syncEverything (image: string): Promise<void> {
    const dir = this.imageDir(image)
    let names: string[]
    try {
      names = await fs.promises.readdir(dir)
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return
      throw err
    }
    for (const f of names) {
      let fd: number
      try { fd = await pOpen(join(dir, f), fs.constants.O_RDONLY) } catch { continue }
      try { await this.sync(image, fd) } finally { await pClose(fd).catch(() => {}) }
    }
    this.newFiles.delete(image)
    await this.syncDir(image)
    if (!this.failed.has(image)) this.syncedAll.add(image)
  }

  private async syncDir (image: string): Promise<void> {
    let dfd: number
    try {
      dfd = await pOpen(this.imageDir(image), fs.constants.O_RDONLY)
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return
      throw err
    }
    try { await this.sync(image, dfd) } finally { await pClose(dfd).catch(() => {}) }
  }

  /** Flushes and closes every handle of the image. */
  async closeImage (image: string): Promise<void> {
    await this.flush(image)
    for (const h of [...this.handles.values()]) {
      if (h.image === image && h.users === 0) await this.evict(h)
    }
  }

  async close (): Promise<void> {
    for (const h of [...this.handles.values()]) {
      if (h.dirty && h.fd >= 0) await pFsync(h.fd).catch(() => {})
      await this.evict(h)
    }
  }

  private async acquire (image: string, block: number, create: boolean): Promise<Handle> {
    const key = `${image}/${block}`
    if (this.removing.has(key)) {
      throw new UkaiError('UKAI_ERR_PERMISSION', `block ${block} of image '${image}' is being removed from this node (no longer placed here)`, { image, block })
    }
    let h = this.handles.get(key)
    if (h === undefined || (create && h.fd < 0)) {
      let p = this.opening.get(key)
      if (p === undefined) {
        p = this.open(image, block, key, create)
        this.opening.set(key, p)
        void p.finally(() => this.opening.delete(key)).catch(() => {})
      }
      h = await p
      // While this waited, another open's LRU trim may have closed the new
      // handle; its fd must never be used (the number may already name
      // another file). Open it again.
      if (this.handles.get(key) !== h) return await this.acquire(image, block, create)
      if (create && h.fd < 0) return await this.acquire(image, block, create)
    } else {
      // Most recently used goes to the end of the map.
      this.handles.delete(key)
      this.handles.set(key, h)
    }
    h.users++
    return h
  }

  private async open (image: string, block: number, key: string, create: boolean): Promise<Handle> {
    const path = this.blockPath(image, block)
    let fd: number
    try {
      fd = await pOpen(path, fs.constants.O_RDWR)
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code
      if (code !== 'ENOENT') throw err
      if (!await this.dirExists(image)) {
        throw new UkaiError('UKAI_ERR_IO', `no data for image '${image}' on this node: ${this.imageDir(image)} is missing`, { image })
      }
      if (create) {
        fd = await pOpen(path, fs.constants.O_RDWR | fs.constants.O_CREAT)
        this.newFiles.add(image)
      } else fd = -1
    }
    const old = this.handles.get(key)
    if (old !== undefined) {
      // An entry that was absent (-1) is replaced by the newly created file.
      this.handles.delete(key)
      if (old.fd >= 0) await pClose(fd) // raced with another open: keep the old
      else {
        old.fd = fd
      }
      this.handles.set(key, old)
      return old
    }
    const h: Handle = { key, image, fd, users: 0, dirty: false }
    this.handles.set(key, h)
    await this.trim(h)
    return h
  }

  // Checked every time a block file is missing, not cached: a directory
  // removed since (a lost replica) must fail, not read as zeros.
  private async dirExists (image: string): Promise<boolean> {
    return await this.has(image)
  }

  private release (h: Handle): void {
    h.users--
  }

  /** Closes least recently used idle handles beyond maxOpen, never `opened` (its opener has not taken it yet). */
  private async trim (opened: Handle): Promise<void> {
    if (this.handles.size <= this.maxOpen) return
    for (const h of this.handles.values()) {
      if (this.handles.size <= this.maxOpen) break
      if (h.users === 0 && h !== opened) await this.evict(h)
    }
  }

  private async evict (h: Handle): Promise<void> {
    if (this.handles.get(h.key) !== h) return
    this.handles.delete(h.key)
    if (h.fd < 0) return
    // A dirty file is synced before its handle goes, and a flush that
    // starts meanwhile waits for that sync (and fails with it).
    if (h.dirty) {
      let set = this.evicting.get(h.image)
      if (set === undefined) { set = new Set(); this.evicting.set(h.image, set) }
      const p = this.sync(h.image, h.fd)
      set.add(p)
      try {
        await p
      } finally {
        set.delete(p)
        if (set.size === 0) this.evicting.delete(h.image)
      }
    }
    await pClose(h.fd)
  }
}
