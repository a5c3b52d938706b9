/**
 * What a sparse block store needs and Node's fs module lacks: a file's
 * data extents (lseek SEEK_DATA / SEEK_HOLE) and punching a hole
 * (fallocate PUNCH_HOLE | KEEP_SIZE). A small N-API addon
 * (native/ukai-fs.c, built by `npm ci` through binding.gyp) runs both on
 * libuv's thread pool.
 */
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'
import { dirname, join } from 'node:path'
import { UkaiError } from '../errors.js'
import type { Range } from '../metadata/range-set.js'

interface Addon {
  dataExtents: (fd: number, start: number, end: number) => Promise<number[]>
  punchHole: (fd: number, offset: number, length: number) => Promise<void>
  readMany: (fds: Int32Array, positions: Float64Array, buffers: Buffer[]) => Promise<Int32Array>
  readNow: (fd: number, buffer: Buffer, position: number) => number
  writeMany: (fds: Int32Array, positions: Float64Array, buffers: Buffer[]) => Promise<Int32Array>
}

let addon: Addon | undefined

/** The addon, from build/Release under the package root (dist/src/blockstore is three levels down). */
export function load (): Addon {
  if (addon !== undefined) return addon
  const here = dirname(fileURLToPath(import.meta.url))
  const candidates = [join(here, '../../../build/Release/ukai_fs.node'), join(here, '../../build/Release/ukai_fs.node')]
  const require = createRequire(import.meta.url)
  for (const path of candidates) {
    try {
      addon = require(path) as Addon
      return addon
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'MODULE_NOT_FOUND') throw err
    }
  }
  throw new UkaiError('UKAI_ERR_IO', 'the native file addon (build/Release/ukai_fs.node) is missing: run scripts/setup.sh (or npm ci) to build it')
}

/** The data ranges of file `fd` within [start, end); the rest reads as zeros. */
export async function dataExtents (fd: number, start: number, end: number): Promise<Range[]> {
  if (end <= start) return []
  const flat = await load().dataExtents(fd, start, end)
  const out: Range[] = []
  for (let i = 0; i < flat.length; i += 2) out.push([flat[i]!, flat[i + 1]!])
  return out
}

/** Frees [offset, offset + length) of file `fd`: it reads as zeros, the file keeps its size. */
export async function punchHole (fd: number, offset: number, length: number): Promise<void> {
  if (length <= 0) return
  await load().punchHole(fd, offset, length)
}
