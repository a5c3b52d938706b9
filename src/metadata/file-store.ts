/**
 * The embedded metadata store: one file per image under metadata_root,
 * `<name>.json`, in the stored format. Every write is an atomic replace:
 * write a temp file, fsync it, rename it over the old one, fsync the
 * directory. A crash at any moment leaves the old or the new file, never
 * a torn one; a leftover temp file is ignored and removed at open.
 */
import { promises as fsp, watch, type FSWatcher } from 'node:fs'
import { join } from 'node:path'
import { UkaiError } from '../errors.js'
import { decodeStored, encodeStored } from './codec.js'
import type { ImageMeta } from './image.js'
import { RangeSet } from './range-set.js'
import { MetadataStore, type NodeRecord, type WatchListener } from './store.js'

const FILE = /^([A-Za-z0-9][A-Za-z0-9._-]{0,127})\.json$/
const TEMP = /^\..*\.tmp$/

let tempCounter = 0

const LOCK_TIMEOUT_MS = 10_000

function isRunning (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

export async function atomicWriteFile (dir: string, file: string, data: string | Buffer): Promise<void> {
  const tmp = join(dir, `.${file}.${process.pid}.${++tempCounter}.tmp`)
  const fh = await fsp.open(tmp, 'w', 0o644)
  try {
    await fh.writeFile(data)
    await fh.sync()
  } finally {
    await fh.close()
  }
  try {
    await fsp.rename(tmp, join(dir, file))
  } catch (err) {
    await fsp.rm(tmp, { force: true })
    throw err
  }
  await fsyncDir(dir)
}

export async function fsyncDir (dir: string): Promise<void> {
  const dh = await fsp.open(dir, 'r')
  try { await dh.sync() } finally { await dh.close() }
}

export class FileMetadataStore extends MetadataStore {
  readonly kind = 'file'
  readonly root: string
  private watcher: FSWatcher | undefined
  private readonly listeners = new Set<WatchListener>()

  private constructor (root: string, defaultPort: number) {
    super(defaultPort)
    this.root = root
  }

  static async open (root: string, defaultPort: number): Promise<FileMetadataStore> {
    await fsp.mkdir(root, { recursive: true })
    for (const dir of [root, join(root, 'dirty'), join(root, 'nodes')]) {
      for (const f of await fsp.readdir(dir).catch(() => [] as string[])) {
        // Temp files of writers that died before their rename.
        if (TEMP.test(f)) await fsp.rm(join(dir, f), { force: true }).catch(() => {})
      }
    }
    return new FileMetadataStore(root, defaultPort)
  }

  private file (name: string): string { return join(this.root, `${name}.json`) }

  /** Dirty-block logs live in a subdirectory, `dirty/<name>.json`. */
  private get dirtyDir (): string { return join(this.root, 'dirty') }

  /**
   * A lock file per image, `.<name>.lock`, holding the owner's pid, made
   * with O_EXCL. A lock whose owner no longer runs (killed mid-update) is
   * taken over. The file store is local to one machine, so pids suffice.
   */
  protected override async _exclusive<T> (name: string, fn: () => Promise<T>): Promise<T> {
    const lock = join(this.root, `.${name}.lock`)
    const deadline = Date.now() + LOCK_TIMEOUT_MS
    for (let wait = 1; ; wait = Math.min(wait * 2, 50)) {
      try {
        // The lock appears with its pid already in it (written to a temp
        // file, then linked): an owner killed between creating the lock and
        // writing its pid would otherwise leave an empty lock no one could
        // ever take over.
        const tmp = join(this.root, `.${name}.lock.${process.pid}.${++tempCounter}.tmp`)
        await fsp.writeFile(tmp, String(process.pid), { mode: 0o644 })
        try {
          await fsp.link(tmp, lock)
        } finally {
          await fsp.rm(tmp, { force: true })
        }
        break
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
      }
      const owner = Number(await fsp.readFile(lock, 'utf8').catch(() => ''))
      if (Number.isInteger(owner) && owner > 0 && !isRunning(owner)) {
        // Take the dead owner's lock aside with an atomic rename: of two
        // waiters only one moves it. If what was moved is a live lock (a
        // third process took over in between), it is linked back.
        const aside = join(this.root, `.${name}.lock.${process.pid}.${++tempCounter}.stale.tmp`)
        try {
          await fsp.rename(lock, aside)
        } catch { continue }
        const moved = Number(await fsp.readFile(aside, 'utf8').catch(() => ''))
        if (Number.isInteger(moved) && moved > 0 && isRunning(moved)) await fsp.link(aside, lock).catch(() => {})
        await fsp.rm(aside, { force: true })
        continue
      }
      if (Date.now() > deadline) {
        throw new UkaiError('UKAI_ERR_BUSY', `metadata of image '${name}' stayed locked by process ${owner} for ${LOCK_TIMEOUT_MS / 1000} s (${lock})`)
      }
      await new Promise((resolve) => setTimeout(resolve, wait))
    }
    try {
      return await fn()
    } finally {
      await fsp.rm(lock, { force: true })
    }
  }

  protected async _getDirty (name: string): Promise<RangeSet> {
    let text: string
    try {
      text = await fsp.readFile(join(this.dirtyDir, `${name}.json`), 'utf8')
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return new RangeSet()
      throw err
    }
    let doc: unknown
    try { doc = JSON.parse(text) } catch (err) {
      throw new UkaiError('UKAI_ERR_INVALID_METADATA', `dirty-block log of image '${name}' is not valid JSON: ${(err as Error).message}`)
    }
    const ranges = (doc as { dirty?: unknown }).dirty
    if (!Array.isArray(ranges) || !ranges.every((r) => Array.isArray(r) && r.length === 2 && r.every((x) => Number.isSafeInteger(x) && x >= 0) && r[0] < r[1])) {
      throw new UkaiError('UKAI_ERR_INVALID_METADATA', `dirty-block log of image '${name}' is malformed`)
    }
    return new RangeSet(ranges as Array<[number, number]>)
  }

  /** Node registrations live in `nodes/<id>.json` (':' is fine in a file name). */
  private get nodesDir (): string { return join(this.root, 'nodes') }

  protected async _putNode (node: NodeRecord): Promise<void> {
    await fsp.mkdir(this.nodesDir, { recursive: true })
    await atomicWriteFile(this.nodesDir, `${node.id.replace(/\//g, '_')}.json`, JSON.stringify(node) + '\n')
  }

  protected async _listNodes (): Promise<NodeRecord[]> {
    const out: NodeRecord[] = []
    for (const f of await fsp.readdir(this.nodesDir).catch(() => [] as string[])) {
      if (!f.endsWith('.json') || f.startsWith('.')) continue
      try {
        out.push(JSON.parse(await fsp.readFile(join(this.nodesDir, f), 'utf8')) as NodeRecord)
      } catch {}
    }
    return out
  }

  protected async _putDirty (name: string, blocks: RangeSet): Promise<void> {
    await fsp.mkdir(this.dirtyDir, { recursive: true })
    await atomicWriteFile(this.dirtyDir, `${name}.json`, JSON.stringify({ dirty: blocks.toJSON() }) + '\n')
  }

  protected async _list (): Promise<string[]> {
    const out: string[] = []
    for (const f of await fsp.readdir(this.root)) {
      const m = FILE.exec(f)
      if (m !== null) out.push(m[1]!)
    }
    return out
  }

  protected async _get (name: string): Promise<ImageMeta | undefined> {
    let text: string
    try {
      text = await fsp.readFile(this.file(name), 'utf8')
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
      throw err
    }
    let doc: unknown
    try {
      doc = JSON.parse(text)
    } catch (err) {
      throw new UkaiError('UKAI_ERR_INVALID_METADATA', `metadata file ${this.file(name)} is not valid JSON: ${(err as Error).message}`)
    }
    const meta = decodeStored(doc, this.defaultPort)
    if (meta.name !== name) {
      throw new UkaiError('UKAI_ERR_INVALID_METADATA', `metadata file ${this.file(name)} names image '${meta.name}'`)
    }
    return meta
  }

  protected async _write (meta: ImageMeta, create: boolean): Promise<void> {
    if (create) {
      // Claim the name first: of two creators, exactly one wins the link.
      const claim = join(this.root, `.${meta.name}.json.${process.pid}.${++tempCounter}.tmp`)
      const fh = await fsp.open(claim, 'w', 0o644)
      try {
        await fh.writeFile(JSON.stringify(encodeStored(meta)) + '\n')
        await fh.sync()
      } finally { await fh.close() }
      try {
        await fsp.link(claim, this.file(meta.name))
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
          throw new UkaiError('UKAI_ERR_EXISTS', `image '${meta.name}' already exists`, { image: meta.name })
        }
        throw err
      } finally {
        await fsp.rm(claim, { force: true })
      }
      await fsyncDir(this.root)
      return
    }
    await atomicWriteFile(this.root, `${meta.name}.json`, JSON.stringify(encodeStored(meta)) + '\n')
  }

  protected async _delete (name: string): Promise<boolean> {
    await fsp.rm(join(this.dirtyDir, `${name}.json`), { force: true })
    try {
      await fsp.unlink(this.file(name))
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false
      throw err
    }
    await fsyncDir(this.root)
    return true
  }

  protected _watch (listener: WatchListener): () => void {
    this.listeners.add(listener)
    if (this.watcher === undefined) {
      // inotify on the directory: a rename or unlink of <name>.json by any
      // process (another node sharing metadata_root, the offline CLI).
      this.watcher = watch(this.root, { persistent: false }, (_event, filename) => {
        const m = filename === null ? null : FILE.exec(String(filename))
        if (m === null) return
        for (const l of this.listeners) l(m[1]!)
      })
      this.watcher.on('error', () => {})
    }
    return () => {
      this.listeners.delete(listener)
      if (this.listeners.size === 0 && this.watcher !== undefined) {
        this.watcher.close()
        this.watcher = undefined
      }
    }
  }

  async close (): Promise<void> {
    this.listeners.clear()
    this.watcher?.close()
    this.watcher = undefined
  }
}
