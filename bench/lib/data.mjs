/**
 * The bytes under test. One reference file of random (incompressible)
 * data is written once; UKAI images get the same bytes as block files
 * (`<image_root>/<image>/<%016d>`, what `ukai image import-metadata` of the
 * original expects to find), so every target serves identical content.
 *
 * The page cache holds every data file, in the same state for every
 * target: filled by writes of PIECE bytes. How the cache was filled
 * matters: on kernels whose ext4 caches files in large folios (6.18
 * here), a file written in 16 MiB writes or read back into the cache
 * (readahead) is held in large folios, and a 4 KiB write into one costs
 * ~40 µs of kernel time (ext4_block_write_begin walks the folio's buffer
 * heads) under the file's inode lock: 23-27k random-write IOPS on the
 * file, whatever serves it, against 160-180k for a file written in
 * 64 KiB writes. `warm` refills what the cache lost the same way (drops
 * the file's cache and writes it again from O_DIRECT reads of itself),
 * never by reading; `residency` reports with fincore(1) how much of it
 * the page cache holds, which the report prints.
 */
import { randomFillSync } from 'node:crypto'
import { open, mkdir, readdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { run } from './proc.mjs'
import { blockFileName } from './ukai.mjs'

const CHUNK = 16 * 2 ** 20
/** Bytes per write when a data file is written (see the top). */
const PIECE = 64 * 1024

/** Writes `n` bytes of `buf` at `at` of `fh`, PIECE bytes at a time. */
async function writeInPieces (fh, buf, n, at) {
  for (let o = 0; o < n; o += PIECE) await fh.write(buf, o, Math.min(PIECE, n - o), at + o)
}

/** Writes `size` bytes of random data to `path`. */
export async function makeReferenceFile (path, size) {
  const fh = await open(path, 'w')
  try {
    const buf = Buffer.allocUnsafe(CHUNK)
    for (let off = 0; off < size; off += CHUNK) {
      const n = Math.min(CHUNK, size - off)
      randomFillSync(buf, 0, n)
      await writeInPieces(fh, buf, n, off)
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
          await writeInPieces(dst, buf, bytesRead, off - b * blockSize)
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

/**
 * Puts every file wholly in the page cache, filled by writes of PIECE
 * bytes (see the top): a file the cache does not hold whole is dropped
 * from it (after sync(1), its pages are clean) and written again from
 * O_DIRECT reads of itself, the same bytes. Returns the bytes written.
 */
export async function warm (paths) {
  let bytes = 0
  let synced = false
  for (const f of await filesUnder(paths)) {
    const { resident, size } = await residency([f])
    if (resident >= size) continue
    if (!synced) { await run('sync', []); synced = true }
    await run('dd', [`if=${f}`, 'iflag=nocache', 'count=0', 'status=none'])
    await run('dd', [`if=${f}`, `of=${f}`, `bs=${PIECE}`, 'iflag=direct', 'conv=notrunc', 'status=none'])
    bytes += size
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
