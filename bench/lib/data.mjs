/**
 * The bytes under test. One reference file of random (incompressible)
 * data is written once; UKAI images get the same bytes as block files
 * (`<image_root>/<image>/<%016d>`, what `ukai image import-metadata` of the
 * original expects to find), so every target serves identical content.
 *
 * Warm cache: every data file is read once end to end before the
 * workloads (`warm`), and `residency` reports with fincore(1) how much of
 * it the page cache holds, which the report prints.
 */
import { randomFillSync } from 'node:crypto'
import { open, mkdir, readdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { run } from './proc.mjs'
import { blockFileName } from './ukai.mjs'

const CHUNK = 16 * 2 ** 20

/** Writes `size` bytes of random data to `path`. */
export async function makeReferenceFile (path, size) {
  const fh = await open(path, 'w')
  try {
    const buf = Buffer.allocUnsafe(CHUNK)
    for (let off = 0; off < size; off += CHUNK) {
      const n = Math.min(CHUNK, size - off)
      randomFillSync(buf, 0, n)
      await fh.write(buf, 0, n, off)
    }
  } finally { await fh.close() }
}

/**
 * Copies the reference file into an image's block files on a node:
 * `<imageRoot>/<image>/<block>`, `blockSize` bytes each.
 */
export async function populateBlocks (reference, imageRoot, image, blockSize) {
  const dir = join(imageRoot, image)
  await mkdir(dir, { recursive: true })
  const size = (await stat(reference)).size
  const src = await open(reference, 'r')
  const buf = Buffer.allocUnsafe(CHUNK)
  try {
    for (let b = 0; b * blockSize < size; b++) {
      const dst = await open(join(dir, blockFileName(b)), 'w')
      try {
        const end = Math.min(size, (b + 1) * blockSize)
        for (let off = b * blockSize; off < end; off += CHUNK) {
          const n = Math.min(CHUNK, end - off)
          const { bytesRead } = await src.read(buf, 0, n, off)
          await dst.write(buf, 0, bytesRead, off - b * blockSize)
        }
      } finally { await dst.close() }
    }
  } finally { await src.close() }
}

/** Every regular file under the given paths (files or directories). */
export async function filesUnder (paths) {
  const out = []
  for (const p of paths) {
    const st = await stat(p).catch(() => undefined)
    if (st === undefined) continue
    if (st.isFile()) out.push(p)
    else if (st.isDirectory()) {
      for (const e of await readdir(p, { withFileTypes: true })) {
        if (e.isFile()) out.push(join(p, e.name))
        else if (e.isDirectory()) out.push(...await filesUnder([join(p, e.name)]))
      }
    }
  }
  return out
}

/** Reads every file once, end to end, so its pages are in the page cache. */
export async function warm (paths) {
  const buf = Buffer.allocUnsafe(CHUNK)
  let bytes = 0
  for (const f of await filesUnder(paths)) {
    const fh = await open(f, 'r')
    try {
      for (;;) {
        const { bytesRead } = await fh.read(buf, 0, CHUNK, null)
        if (bytesRead === 0) break
        bytes += bytesRead
      }
    } finally { await fh.close() }
  }
  return bytes
}

/**
 * Bytes of the files that are resident in the page cache, and their total
 * size (fincore(1), util-linux).
 * @returns {Promise<{ resident: number, size: number }>}
 */
export async function residency (paths) {
  const files = await filesUnder(paths)
  let resident = 0
  let size = 0
  // fincore takes many files at once; batches keep the command line short.
  for (let i = 0; i < files.length; i += 200) {
    const r = await run('fincore', ['--bytes', '--noheadings', '--raw', '--output', 'RES,SIZE', ...files.slice(i, i + 200)])
    for (const line of r.stdout.trim().split('\n')) {
      const [res, sz] = line.trim().split(/\s+/).map(Number)
      if (Number.isFinite(res)) resident += res
      if (Number.isFinite(sz)) size += sz
    }
  }
  return { resident, size }
}
