/**
 * The native FUSE plane's addon (native/ukai-fuse.c, built by `npm ci`
 * through binding.gyp when libfuse 3's headers are installed): libfuse 3's
 * loop on threads of its own, which reads granted blocks of open images
 * from their block files itself and hands every other request to a JS
 * handler (read-plane.ts, native-mount.ts).
 */
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'
import { dirname, join } from 'node:path'

/** Requests handed to JS; the numbers are the addon's `enum op`. */
export const OP = {
  GETATTR: 1,
  READDIR: 2,
  OPEN: 3,
  RELEASE: 4,
  READ: 5,
  WRITE: 6,
  FLUSH: 7,
  FSYNC: 8,
  TRUNCATE: 9,
  STATFS: 10
} as const

/**
 * The JS side of a request: `fd` is the file number open answered (-1
 * without one); `a` and `b` are the operation's arguments (open: flags;
 * read/write: length, offset; fsync: datasync; truncate: size); `data` a
 * write's bytes (a copy). Answered with reply(id, ...), exactly once.
 */
export type RequestHandler = (op: number, id: number, path: string, fd: number, a: number, b: number, data: Buffer | undefined) => void

export interface FuseAddon {
  /** Mounts (a stale mount must be gone first); `options` is libfuse's -o list. Throws on failure. */
  mount: (mountpoint: string, options: string, handler: RequestHandler) => void
  /** Ends the loop (once every request handed to JS is answered) and unmounts. */
  unmount: () => Promise<void>
  /**
   * Answers request `id` with `result` (>= 0 or -errno) and its payload:
   * getattr a Float64Array [mode, size, nlink, uid, gid, blksize, blocks,
   * mtimeMs, atimeMs, ctimeMs]; statfs [bsize, frsize, blocks, bfree,
   * bavail, files, ffree, favail, namemax]; readdir the names; open the
   * image slot (0: none); read the Buffer with the bytes. False when the
   * request was not waiting.
   */
  reply: (id: number, result: number, payload?: Float64Array | string[] | number | Buffer) => boolean
  /** Makes an image known to the fast path; its block files are `dir/prefix + index padded to width + suffix`. */
  registerImage: (dir: string, prefix: string, width: number, suffix: string, blockSize: number, blockCount: number, usedSize: number) => number
  /** No read of the slot from now on; resolves once none is under way and its files are closed, with the counters left (as takeCounters). */
  unregisterImage: (slot: number) => Promise<Float64Array>
  /** Blocks (ranges [s0, e0, ...]) the fast path may read. */
  grant: (slot: number, ranges: Float64Array) => void
  /** Blocks it may no longer read; no read of them starts once this returns. */
  revoke: (slot: number, ranges: Float64Array) => void
  /** Resolves once no read of those blocks is under way. */
  drain: (slot: number, ranges: Float64Array) => Promise<void>
  setUsedSize: (slot: number, usedSize: number) => void
  /** [reads, bytes, block pieces, seconds] served since the last call. */
  takeCounters: (slot: number) => Float64Array
  /**
   * The JS thread runs: the fast path serves for `ms` more (0: with no
   * deadline). A stalled JS thread cannot apply a revocation, so the fast
   * path stops with it.
   */
  heartbeat: (ms: number) => void
  /** The granted blocks as ranges. */
  fastBlocks: (slot: number) => Float64Array
  /** The fast path alone on the JS thread (tests): the bytes read, or -1 where a request would go to JS. */
  readFast: (slot: number, offset: number, buf: Buffer) => number
  /** readFast on a thread of libuv's pool, as a FUSE thread runs it (tests). */
  readFastAsync: (slot: number, offset: number, buf: Buffer) => Promise<number>
  /** Tests: every native read of the slot waits this long with its blocks taken. */
  setReadDelay: (slot: number, microseconds: number) => void
}

let loaded: { addon?: FuseAddon, error?: string } | undefined

/** The addon from build/Release under the package root, or why it cannot be loaded. */
export function loadFuseAddon (): { addon?: FuseAddon, error?: string } {
  if (loaded !== undefined) return loaded
  const here = dirname(fileURLToPath(import.meta.url))
  // dist/src/frontends/fuse is four levels below the package root; src/frontends/fuse three.
  const candidates = [join(here, '../../../../build/Release/ukai_fuse.node'), join(here, '../../../build/Release/ukai_fuse.node')]
  const require = createRequire(import.meta.url)
  let error = 'build/Release/ukai_fuse.node not found (libfuse3-dev was missing when the package was installed: install it and run scripts/setup.sh)'
  for (const path of candidates) {
    try {
      loaded = { addon: require(path) as FuseAddon }
      return loaded
    } catch (err) {
      const e = err as NodeJS.ErrnoException
      if (e.code !== 'MODULE_NOT_FOUND') error = (e.message ?? String(err)).split('\n')[0]!
    }
  }
  loaded = { error }
  return loaded
}
