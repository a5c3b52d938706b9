import { test, describe } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import { syncBuiltinESMExports } from 'node:module'
import { readdir, readFile, readlink, rm, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { UkaiError } from '../errors.js'
import { tmpDir } from '../../test/helpers/tmp.js'
import { BlockStore, INCARNATION_FILE } from './block-store.js'

const IMG = 'vm1'

async function newStore (t: Parameters<typeof tmpDir>[0], maxOpen?: number, format = '%016d'): Promise<BlockStore> {
  const root = await tmpDir(t, 'ukai-blocks-')
  const store = new BlockStore(root, format, maxOpen === undefined ? {} : { maxOpen })
  t.after(async () => await store.close())
  await store.allocate(IMG)
  return store
}

async function read (store: BlockStore, block: number, offset: number, length: number, image = IMG): Promise<Buffer> {
  const buf = Buffer.alloc(length, 0xee) // not zeros: a read must overwrite every byte
  await store.read(image, block, offset, buf)
  return buf
}

/** Distinct bytes for (block, seed), so a read from the wrong file or offset shows. */
function pattern (length: number, block: number, seed = 0): Buffer {
  const b = Buffer.alloc(length)
  for (let i = 0; i < length; i++) b[i] = (block * 31 + seed * 7 + i * 13 + 1) & 0xff
  return b
}

async function rejectsIo (p: Promise<unknown>): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof UkaiError, `expected a UkaiError, got ${String(err)}`)
    assert.equal(err.code, 'UKAI_ERR_IO')
    assert.match(err.message, /no data for image 'vm1' on this node: .* is missing/)
    return true
  })
}

/** Open file descriptors of this process that point into `dir` (Linux /proc; undefined elsewhere). */
async function fdsUnder (dir: string): Promise<number | undefined> {
  let fds: string[]
  try { fds = await readdir('/proc/self/fd') } catch { return undefined }
  let n = 0
  for (const fd of fds) {
    const target = await readlink(join('/proc/self/fd', fd)).catch(() => '')
    if (target.startsWith(dir + '/')) n++
  }
  return n
}

describe('BlockStore', () => {
  test('write and read at offsets; block files named by blockname_format', async (t) => {
    const s = await newStore(t)
    await s.write(IMG, 3, 0, Buffer.from('hello'))
    await s.write(IMG, 3, 100, Buffer.from('world'))
    await s.write(IMG, 3, 2, Buffer.from('LL'))
    assert.equal((await read(s, 3, 0, 5)).toString(), 'heLLo')
    assert.equal((await read(s, 3, 100, 5)).toString(), 'world')
    assert.equal((await read(s, 3, 101, 3)).toString(), 'orl')
    assert.equal(s.blockPath(IMG, 3), join(s.root, IMG, '0000000000000003'))
    assert.deepEqual(await readdir(join(s.root, IMG)), ['0000000000000003'])
    assert.equal((await readFile(s.blockPath(IMG, 3))).length, 105)
  })

  test('a prefix/suffix block name format', async (t) => {
    const s = await newStore(t, undefined, 'blk-%08d.raw')
    await s.write(IMG, 12, 0, Buffer.from('x'))
    assert.deepEqual(await readdir(join(s.root, IMG)), ['blk-00000012.raw'])
    assert.equal((await read(s, 12, 0, 1)).toString(), 'x')
  })

  test('holes and the part past the end of a file read as zeros', async (t) => {
    const s = await newStore(t)
    await s.write(IMG, 0, 1000, Buffer.from('data'))
    assert.deepEqual(await read(s, 0, 0, 1000), Buffer.alloc(1000))
    const across = await read(s, 0, 998, 10)
    assert.deepEqual(across, Buffer.concat([Buffer.alloc(2), Buffer.from('data'), Buffer.alloc(4)]))
    assert.deepEqual(await read(s, 0, 5000, 100), Buffer.alloc(100))
  })

  test('a missing block file in an existing image directory reads as zeros', async (t) => {
    const s = await newStore(t)
    assert.deepEqual(await read(s, 7, 0, 4096), Buffer.alloc(4096))
    assert.deepEqual(await read(s, 7, 123, 10), Buffer.alloc(10))
    assert.equal(await s.allocatedLength(IMG, 7), 0)
    // Reading does not create the file.
    assert.deepEqual(await readdir(join(s.root, IMG)), [])
    // A block first read (absent), then written, then read.
    await s.write(IMG, 7, 1, Buffer.from('z'))
    assert.equal((await read(s, 7, 0, 2)).toString('hex'), '007a')
  })

  test('a missing image directory is UKAI_ERR_IO, never zeros', async (t) => {
    const s = await newStore(t)
    await assert.rejects(s.read('never', 0, 0, Buffer.alloc(10)), (err: unknown) => {
      assert.ok(err instanceof UkaiError)
      assert.equal(err.code, 'UKAI_ERR_IO')
      assert.match(err.message, /no data for image 'never' on this node/)
      return true
    })
    const fresh = new BlockStore(join(s.root, 'elsewhere'), '%016d')
    t.after(async () => await fresh.close())
    await rejectsIo(fresh.read(IMG, 0, 0, Buffer.alloc(10)))
    await rejectsIo(fresh.write(IMG, 0, 0, Buffer.from('x')))
    await rejectsIo(fresh.allocatedLength(IMG, 0))
    await rejectsIo(fresh.discard(IMG, 0, 0, 10, 'zero-allocated'))
    assert.equal(await fresh.has(IMG), false)
  })

  test('an image directory removed behind the store\'s back is UKAI_ERR_IO for blocks not yet open', async (t) => {
    const s = await newStore(t)
    await s.write(IMG, 0, 0, Buffer.from('x'))
    await s.closeImage(IMG)
    await rm(join(s.root, IMG), { recursive: true })
    await rejectsIo(s.read(IMG, 0, 0, Buffer.alloc(1)))
    await rejectsIo(s.read(IMG, 5, 0, Buffer.alloc(1)))
    await rejectsIo(s.write(IMG, 6, 0, Buffer.from('y')))
    assert.equal(await s.has(IMG), false)
  })

  test('allocate keeps existing blocks; has() tells whether the image is here', async (t) => {
    const s = await newStore(t)
    assert.equal(await s.has(IMG), true)
    assert.equal(await s.has('other'), false)
    await s.write(IMG, 0, 0, Buffer.from('keep'))
    await s.allocate(IMG)
    assert.equal((await read(s, 0, 0, 4)).toString(), 'keep')
  })

  test('bind: a directory is made for an incarnation, kept for it, adopted without a marker, emptied for a newer one, never for an older one', async (t) => {
    const s = await newStore(t)
    const inc = (id: string, created: number): { id: string, created: number } => ({ id, created })
    // Made before markers (newStore allocates without one): adopted with its files.
    await s.write(IMG, 0, 0, Buffer.from('old'))
    assert.equal(await s.incarnationOf(IMG), undefined)
    assert.equal(await s.bind(IMG, inc('inc-1', 10)), 'adopted')
    assert.deepEqual(await s.incarnationOf(IMG), inc('inc-1', 10))
    assert.equal((await read(s, 0, 0, 3)).toString(), 'old')
    assert.equal(await s.bind(IMG, inc('inc-1', 10)), 'kept')
    // Another process (a restart) finds the marker: kept.
    const again = new BlockStore(s.root, '%016d')
    t.after(async () => await again.close())
    assert.equal(await again.bind(IMG, inc('inc-1', 10)), 'kept')
    // A newer incarnation: the files of the first are gone before it reads anything.
    assert.equal(await again.bind(IMG, inc('inc-2', 20)), 'wiped')
    assert.deepEqual(await read(again, 0, 0, 3), Buffer.alloc(3))
    assert.deepEqual((await readdir(join(s.root, IMG))).sort(), [INCARNATION_FILE])
    await again.write(IMG, 2, 0, Buffer.from('newer'))
    // A caller with an out-of-date view (the first image) is refused, and removes nothing.
    await assert.rejects(again.bind(IMG, inc('inc-1', 10)), (err: UkaiError) => err.code === 'UKAI_ERR_UNAVAILABLE' && /newer image of that name/.test(err.message))
    assert.equal((await read(again, 2, 0, 5)).toString(), 'newer')
    // An import adopts what is there, whichever incarnation it was.
    await again.write(IMG, 1, 0, Buffer.from('imported'))
    assert.equal(await again.bind(IMG, inc('inc-3', 5), { adopt: true }), 'adopted')
    assert.equal((await read(again, 1, 0, 8)).toString(), 'imported')
    // A missing directory is made; concurrent binds agree.
    assert.equal(await again.incarnationOf('fresh'), null)
    const both = await Promise.all([again.bind('fresh', inc('inc-9', 1)), again.bind('fresh', inc('inc-9', 1))])
    assert.deepEqual(both.sort(), ['kept', 'made'])
    await again.destroy('fresh')
    assert.equal(await again.incarnationOf('fresh'), null)
  })

  test('removeBlocks: files of the blocks turned down go, open handles too; others and other files stay', async (t) => {
    const store = await newStore(t, undefined, 'blk-%04d.raw')
    for (const b of [0, 1, 2, 7]) await store.write(IMG, b, 0, pattern(4096, b))
    await store.flush(IMG)
    // A stranger in the directory is never taken for a block ("blk-1.raw" is not %04d's block 1).
    fs.writeFileSync(join(store.imageDir(IMG), 'blk-1.raw'), 'x')
    // A read in flight on block 1 finishes before its file goes.
    const inFlight = read(store, 1, 0, 4096)
    assert.equal(await store.removeBlocks(IMG, (b) => b === 0 || b === 7), 2)
    assert.ok((await inFlight).equals(pattern(4096, 1)))
    const left = (await readdir(store.imageDir(IMG))).filter((f) => f !== INCARNATION_FILE).sort()
    assert.deepEqual(left, ['blk-0000.raw', 'blk-0007.raw', 'blk-1.raw'])
    // The cached handles went with the files: a new write makes a new file, and reads see it alone.
    assert.ok((await read(store, 1, 0, 4096)).equals(Buffer.alloc(4096)))
    await store.write(IMG, 2, 100, Buffer.from('new'))
    const b2 = await read(store, 2, 0, 4096)
    assert.equal(b2.subarray(100, 103).toString(), 'new')
    assert.ok(b2.subarray(0, 100).equals(Buffer.alloc(100)), 'the removed file\'s bytes came back')
    assert.equal(await store.removeBlocks('nothing-here', () => false), 0)
  })

  test('allocatedLength follows writes', async (t) => {
    const s = await newStore(t)
    assert.equal(await s.allocatedLength(IMG, 0), 0)
    await s.write(IMG, 0, 4095, Buffer.from('x'))
    assert.equal(await s.allocatedLength(IMG, 0), 4096)
    await s.write(IMG, 0, 0, Buffer.from('abc'))
    assert.equal(await s.allocatedLength(IMG, 0), 4096)
    await s.write(IMG, 0, 10_000, Buffer.from('y'))
    assert.equal(await s.allocatedLength(IMG, 0), 10_001)
  })

  describe('discard', () => {
    /** A block file of 1000 pattern bytes. */
    async function filled (t: Parameters<typeof tmpDir>[0]): Promise<{ s: BlockStore, data: Buffer }> {
      const s = await newStore(t)
      const data = pattern(1000, 0)
      await s.write(IMG, 0, 0, data)
      return { s, data }
    }

    test("'trim' to the end of the file frees it; bytes before stay", async (t) => {
      const s = await newStore(t)
      const data = pattern(3 * 4096, 0)
      await s.write(IMG, 0, 0, data)
      await s.discard(IMG, 0, 4096, 2 * 4096, 'trim')
      assert.deepEqual(await s.dataExtents(IMG, 0, 0, 3 * 4096), [[0, 4096]])
      assert.deepEqual(await read(s, 0, 0, 4096), data.subarray(0, 4096))
      assert.deepEqual(await read(s, 0, 4096, 2 * 4096), Buffer.alloc(2 * 4096))
      // Past the end too.
      await s.discard(IMG, 0, 0, 50_000, 'trim')
      assert.deepEqual(await s.dataExtents(IMG, 0, 0, 50_000), [])
    })

    test("'trim' inside the file keeps its length and the bytes around the range", async (t) => {
      const { s, data } = await filled(t)
      await s.discard(IMG, 0, 100, 200, 'trim')
      assert.equal(await s.allocatedLength(IMG, 0), 1000)
      assert.deepEqual(await read(s, 0, 0, 100), data.subarray(0, 100))
      assert.deepEqual(await read(s, 0, 300, 700), data.subarray(300))
    })

    test("'zero' inside the file zeroes the range only", async (t) => {
      const { s, data } = await filled(t)
      await s.discard(IMG, 0, 100, 200, 'zero')
      assert.equal(await s.allocatedLength(IMG, 0), 1000)
      assert.deepEqual(await read(s, 0, 0, 100), data.subarray(0, 100))
      assert.deepEqual(await read(s, 0, 100, 200), Buffer.alloc(200))
      assert.deepEqual(await read(s, 0, 300, 700), data.subarray(300))
    })

    test("'zero' and 'trim' inside the file punch a hole: the space goes, the data extents say so", async (t) => {
      const s = await newStore(t)
      const MiB = 2 ** 20
      await s.write(IMG, 0, 0, Buffer.alloc(4 * MiB, 7))
      const before = (await stat(s.blockPath(IMG, 0))).blocks
      await s.discard(IMG, 0, MiB, MiB, 'zero')
      await s.discard(IMG, 0, 2 * MiB, MiB, 'trim')
      const after = (await stat(s.blockPath(IMG, 0))).blocks
      assert.equal(before - after, 2 * MiB / 512)
      assert.equal(await s.allocatedLength(IMG, 0), 4 * MiB)
      assert.deepEqual(await s.dataExtents(IMG, 0, 0, 4 * MiB), [[0, MiB], [3 * MiB, 4 * MiB]])
      assert.deepEqual(await s.dataExtents(IMG, 0, MiB / 2, 3 * MiB + 10), [[MiB / 2, MiB], [3 * MiB, 3 * MiB + 10]])
      assert.deepEqual(await read(s, 0, MiB, 2 * MiB), Buffer.alloc(2 * MiB))
      assert.deepEqual(await s.dataExtents(IMG, 9, 0, MiB), [])
    })

    test("'zero' to or past the end of the file frees the tail", async (t) => {
      const { s, data } = await filled(t)
      await s.discard(IMG, 0, 900, 100, 'zero')
      await s.discard(IMG, 0, 800, 10_000, 'zero')
      assert.deepEqual(await read(s, 0, 0, 800), data.subarray(0, 800))
      assert.deepEqual(await read(s, 0, 800, 300), Buffer.alloc(300))
      // A whole-file zero leaves a file that reads as zeros (and, whole file-system blocks, holds no data).
      await s.discard(IMG, 0, 0, 800, 'zero')
      assert.deepEqual(await read(s, 0, 0, 1000), Buffer.alloc(1000))
      await s.write(IMG, 1, 0, Buffer.alloc(8192, 3))
      await s.discard(IMG, 1, 0, 8192, 'zero')
      assert.deepEqual(await s.dataExtents(IMG, 1, 0, 8192), [])
    })

    test('a zero to the end of the file never loses a write past it that runs at the same time', async (t) => {
      const s = await newStore(t)
      const MiB = 2 ** 20
      for (let b = 0; b < 50; b++) {
        await s.write(IMG, b, 0, Buffer.alloc(MiB, 1))
        const tail = Buffer.alloc(4096, 2 + b)
        // The zero reaches the file's end; the write starts right after it.
        await Promise.all([s.discard(IMG, b, 4096, MiB - 4096, 'zero'), s.write(IMG, b, MiB, tail)])
        assert.deepEqual(await read(s, b, MiB, 4096), tail, `block ${b}`)
        assert.deepEqual(await read(s, b, 4096, 4096), Buffer.alloc(4096))
      }
    })

    test("'zero-allocated' zeroes and keeps the range allocated, even past the end", async (t) => {
      const { s, data } = await filled(t)
      await s.discard(IMG, 0, 100, 200, 'zero-allocated')
      assert.deepEqual(await read(s, 0, 100, 200), Buffer.alloc(200))
      assert.deepEqual(await read(s, 0, 300, 700), data.subarray(300))
      await s.discard(IMG, 0, 900, 600, 'zero-allocated')
      assert.equal(await s.allocatedLength(IMG, 0), 1500)
      assert.deepEqual(await read(s, 0, 0, 100), data.subarray(0, 100))
      assert.deepEqual(await read(s, 0, 900, 600), Buffer.alloc(600))
      const st = await stat(s.blockPath(IMG, 0))
      assert.equal(st.size, 1500)
    })

    test('discards of a block that has no file', async (t) => {
      const s = await newStore(t)
      await s.discard(IMG, 4, 0, 100, 'trim')
      await s.discard(IMG, 4, 0, 100, 'zero')
      assert.deepEqual(await readdir(join(s.root, IMG)), [])
      assert.deepEqual(await read(s, 4, 0, 100), Buffer.alloc(100))
      await s.discard(IMG, 4, 50, 100, 'zero-allocated')
      assert.equal(await s.allocatedLength(IMG, 4), 150)
      assert.deepEqual(await read(s, 4, 0, 150), Buffer.alloc(150))
    })
  })

  test('flush fsyncs every block file written since the last flush, once', async (t) => {
    const s = await newStore(t, 2)
    const synced: number[] = []
    const real = fs.fdatasync
    // The store calls fs.fdatasync through the ESM namespace; sync the patch into it.
    fs.fdatasync = ((fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => {
      synced.push(fd)
      real(fd, cb)
    }) as typeof fs.fdatasync
    syncBuiltinESMExports()
    t.after(() => { fs.fdatasync = real; syncBuiltinESMExports() })

    // The first flush in a process covers what earlier processes wrote:
    // here an empty image, so only its directory.
    await s.flush(IMG)
    assert.equal(synced.length, 1, 'the first flush syncs the image directory')
    synced.length = 0
    await s.flush(IMG)
    assert.equal(synced.length, 0, 'nothing written, nothing to sync')
    await s.write(IMG, 0, 0, Buffer.from('a'))
    await s.write(IMG, 1, 0, Buffer.from('b'))
    await s.write(IMG, 0, 1, Buffer.from('c'))
    await s.flush(IMG)
    // Two files made: each synced, and the directory (their names) once.
    assert.equal(synced.length, 3)
    assert.equal(new Set(synced).size, 3)
    synced.length = 0
    await s.flush(IMG)
    assert.equal(synced.length, 0, 'a second flush has nothing to sync')
    await s.read(IMG, 0, 0, Buffer.alloc(1))
    await s.flush(IMG)
    assert.equal(synced.length, 0, 'a read does not make a block dirty')
    // With maxOpen 2, writing 5 blocks evicts dirty handles: each is synced
    // before it is closed; 3 of the files are new: the directory once more.
    for (let b = 0; b < 5; b++) await s.write(IMG, b, 0, Buffer.from('d'))
    await s.flush(IMG)
    assert.equal(synced.length, 6)
    // Another image's handles are not flushed.
    await s.allocate('other')
    await s.write('other', 0, 0, Buffer.from('o'))
    synced.length = 0
    await s.flush(IMG)
    assert.equal(synced.length, 0)
    await s.flush('other')
    // Its first flush: the written file, then every file again and the directory.
    assert.equal(synced.length, 3)
  })

  test('maxOpen 2: many blocks, sequential and concurrent, stay correct and few files stay open', async (t) => {
    const s = await newStore(t, 2)
    const BLOCKS = 24
    const LEN = 3000
    const model = new Map<number, Buffer>()
    // Sequential, in a scrambled order, with reads of earlier blocks in between.
    for (let i = 0; i < BLOCKS; i++) {
      const b = (i * 7) % BLOCKS
      const data = pattern(LEN, b)
      await s.write(IMG, b, 0, data)
      model.set(b, data)
      const back = (i * 5) % BLOCKS
      assert.deepEqual(await read(s, back, 0, LEN), model.get(back) ?? Buffer.alloc(LEN))
    }
    const open = await fdsUnder(s.root)
    if (open !== undefined) assert.ok(open <= 2, `${open} block files open with maxOpen 2`)

    // Concurrent: overwrite the middle of every block while reading others.
    const ops: Array<Promise<void>> = []
    for (let round = 0; round < 3; round++) {
      for (let b = 0; b < BLOCKS; b++) {
        const data = pattern(500, b, round + 1)
        const offset = 100 * (round + 1)
        ops.push(s.write(IMG, b, offset, data))
        const expected = Buffer.from(model.get(b)!)
        data.copy(expected, offset)
        model.set(b, expected)
        ops.push(s.read(IMG, (b + 11) % BLOCKS, 0, Buffer.alloc(LEN)))
        ops.push(s.allocatedLength(IMG, (b + 3) % BLOCKS).then((n) => assert.equal(n, LEN)))
      }
      // Each round's writes overlap the previous round's, so rounds are kept in order.
      await Promise.all(ops)
    }
    for (let b = 0; b < BLOCKS; b++) assert.deepEqual(await read(s, b, 0, LEN), model.get(b), `block ${b}`)
    await s.flush(IMG)
    const fresh = new BlockStore(s.root, '%016d')
    t.after(async () => await fresh.close())
    for (let b = 0; b < BLOCKS; b++) assert.deepEqual(await read(fresh, b, 0, LEN), model.get(b), `block ${b} from a new store`)
  })

  test('concurrent first writes to one new block all land', async (t) => {
    const s = await newStore(t, 2)
    await s.read(IMG, 0, 0, Buffer.alloc(1)) // the block is known as absent first
    await Promise.all(Array.from({ length: 16 }, async (_, i) => await s.write(IMG, 0, i * 10, Buffer.from(`part-${String(i).padStart(5, '0')}`).subarray(0, 10))))
    const all = await read(s, 0, 0, 160)
    for (let i = 0; i < 16; i++) assert.equal(all.subarray(i * 10, i * 10 + 10).toString(), `part-${String(i).padStart(5, '0')}`.slice(0, 10))
  })

  test('destroy removes every block; the image can be allocated again, empty', async (t) => {
    const s = await newStore(t)
    for (let b = 0; b < 4; b++) await s.write(IMG, b, 0, pattern(100, b))
    await s.destroy(IMG)
    assert.equal(await s.has(IMG), false)
    await assert.rejects(stat(join(s.root, IMG)), /ENOENT/)
    await rejectsIo(s.read(IMG, 0, 0, Buffer.alloc(1)))
    await rejectsIo(s.write(IMG, 0, 0, Buffer.from('x')))
    await s.allocate(IMG)
    for (let b = 0; b < 4; b++) assert.deepEqual(await read(s, b, 0, 100), Buffer.alloc(100))
    await s.destroy('never-allocated')
  })

  test('image names that could leave the root are refused', async (t) => {
    const s = await newStore(t)
    for (const bad of ['..', '../x', 'a/b', '', '.x']) {
      await assert.rejects(s.read(bad, 0, 0, Buffer.alloc(1)), (err: unknown) => err instanceof UkaiError && err.code === 'UKAI_ERR_INVALID_NAME')
      await assert.rejects(s.write(bad, 0, 0, Buffer.from('x')), (err: unknown) => err instanceof UkaiError && err.code === 'UKAI_ERR_INVALID_NAME')
      await assert.rejects(s.allocate(bad), (err: unknown) => err instanceof UkaiError && err.code === 'UKAI_ERR_INVALID_NAME')
    }
    assert.throws(() => new BlockStore(s.root, '../%016d'), /blockname_format/)
  })
})
