/**
 * The FUSE mount, through a real `ukai server` process: the test process
 * only ever touches the mount from outside the server.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { open, readdir, readFile, stat, statfs, mkdir, rename, symlink, unlink, truncate, writeFile, link } from 'node:fs/promises'
import { join } from 'node:path'
import { TestNode, run } from './helpers/node-process.js'
import { prng } from './helpers/assertions.js'

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex')


describe('FUSE mount', () => {
  let node: TestNode
  const img = (name: string): string => join(node.mountpoint!, name)

  before(async () => {
    node = await TestNode.start({ mount: true })
  })
  after(async () => { await node?.destroy() })

  test('random writes across block boundaries read back equal to the model, through the mount and in the block files', async () => {
    // 1,000,000-byte blocks: block edges fall off page boundaries on purpose.
    const size = 20_000_000
    const blockSize = 1_000_000
    // Created blocks are powers of two; an imported image keeps the original's sizes.
    const r = await node.api('POST', '/v1/images/import', {
      format: 1, name: 'rand', size, block_size: blockSize, used_size: size, hypervisors: [],
      locations: { [node.id]: { blocks: [[0, size / blockSize]], out_of_sync: [] } }
    })
    assert.equal(r.status, 201, JSON.stringify(r.body))
    const model = Buffer.alloc(size)
    const rnd = prng(20261123)
    const fh = await open(img('rand'), 'r+')
    try {
      for (let i = 0; i < 150; i++) {
        const len = 1 + Math.floor(rnd() * 3 * blockSize / 2)
        const off = Math.floor(rnd() * (size - len))
        const data = randomBytes(len)
        const { bytesWritten } = await fh.write(data, 0, len, off)
        assert.equal(bytesWritten, len)
        data.copy(model, off)
      }
      await fh.sync()
      for (let i = 0; i < 40; i++) {
        const len = 1 + Math.floor(rnd() * 2 * blockSize)
        const off = Math.floor(rnd() * (size - len))
        const buf = Buffer.alloc(len)
        const { bytesRead } = await fh.read(buf, 0, len, off)
        assert.equal(bytesRead, len)
        assert.ok(buf.equals(model.subarray(off, off + len)), `read of ${len} at ${off} differs from the model`)
      }
    } finally { await fh.close() }
    assert.equal(sha(await readFile(img('rand'))), sha(model))
    // The bytes are in the block files, not only in the kernel's cache.
    const dir = join(node.imageRoot, 'rand')
    for (let b = 0; b < size / blockSize; b++) {
      let onDisk: Buffer
      try { onDisk = await readFile(join(dir, String(b).padStart(16, '0'))) } catch { onDisk = Buffer.alloc(0) }
      const want = model.subarray(b * blockSize, (b + 1) * blockSize)
      const got = Buffer.concat([onDisk, Buffer.alloc(blockSize - onDisk.length)])
      assert.equal(sha(got), sha(want), `block file ${b} differs from the model`)
    }
  })

  test('qemu-img info and qemu-io patterns work on the mounted file', async () => {
    assert.equal((await node.cli('image', 'create', 'q', '-s', '64M', '-b', '4M')).code, 0)
    const info = await run('qemu-img', ['info', '--output=json', img('q')])
    assert.equal(info.code, 0, info.stderr)
    const doc = JSON.parse(info.stdout)
    assert.equal(doc.format, 'raw')
    assert.equal(doc['virtual-size'], 64 * 2 ** 20)
    const io = await run('qemu-io', ['-f', 'raw',
      '-c', 'write -P 0xab 0 1M', '-c', 'read -P 0xab 0 1M',
      '-c', 'write -P 0x5a 4190208 1M', '-c', 'read -P 0x5a 4190208 1M', '-c', 'flush', img('q')])
    assert.equal(io.code, 0, io.stderr)
    assert.doesNotMatch(io.stdout + io.stderr, /Pattern verification failed|error/i)
  })

  test('create, mkdir, unlink, rename, symlink and link are refused with EPERM', async () => {
    await assert.rejects(writeFile(img('new-file'), 'x'), { code: 'EPERM' })
    await assert.rejects(mkdir(img('dir')), { code: 'EPERM' })
    await assert.rejects(unlink(img('q')), { code: 'EPERM' })
    await assert.rejects(rename(img('q'), img('q2')), { code: 'EPERM' })
    await assert.rejects(symlink('q', img('sym')), { code: 'EPERM' })
    await assert.rejects(link(img('q'), img('hard')), { code: 'EPERM' })
    assert.deepEqual((await readdir(node.mountpoint!)).sort(), ['q', 'rand'])
  })

  test('a second open for writing is EBUSY; read-only opens are unlimited', async () => {
    const w = await open(img('q'), 'r+')
    try {
      await assert.rejects(open(img('q'), 'r+'), { code: 'EBUSY' })
      await assert.rejects(open(img('q'), 'w'), { code: 'EBUSY' })
      const readers = await Promise.all([open(img('q'), 'r'), open(img('q'), 'r'), open(img('q'), 'r')])
      for (const r of readers) await r.close()
    } finally { await w.close() }
    const again = await open(img('q'), 'r+')
    await again.close()
  })

  test('writes are not split into 4 KiB pieces (big_writes)', async () => {
    const before = (await node.api<{ writes: number }>('GET', '/v1/images/q/stats')).body.writes
    const fh = await open(img('q'), 'r+')
    try {
      await fh.write(Buffer.alloc(1024 * 1024, 7), 0, 1024 * 1024, 8 * 1024 * 1024)
    } finally { await fh.close() }
    const after = (await node.api<{ writes: number }>('GET', '/v1/images/q/stats')).body.writes
    // 1 MiB arrives as 128 KiB writes (8); without big_writes it would be 256.
    assert.ok(after - before <= 16, `1 MiB reached the volume as ${after - before} writes`)
    assert.ok(after - before >= 1)
  })

  test('truncate only shrinks used_size, and the cut bytes read as zeros later', async () => {
    assert.equal((await node.cli('image', 'create', 't', '-s', '8M', '-b', '1M')).code, 0)
    const fh = await open(img('t'), 'r+')
    await fh.write(Buffer.alloc(3 * 2 ** 20, 0xee), 0, 3 * 2 ** 20, 2 ** 20)
    await fh.close()
    await truncate(img('t'), 2.5 * 2 ** 20)
    assert.equal((await stat(img('t'))).size, 2.5 * 2 ** 20)
    await assert.rejects(truncate(img('t'), 6 * 2 ** 20), { code: 'EPERM' })
    const info = JSON.parse((await node.cli('image', 'info', 't', '--json')).stdout)
    assert.equal(info.used_size, 2.5 * 2 ** 20)
    // Writing past used_size grows it again; the old bytes in between are gone.
    const fh2 = await open(img('t'), 'r+')
    await fh2.write(Buffer.from('end'), 0, 3, 5 * 2 ** 20)
    const mid = Buffer.alloc(2 ** 20)
    await fh2.read(mid, 0, mid.length, 3 * 2 ** 20)
    await fh2.close()
    assert.ok(mid.equals(Buffer.alloc(2 ** 20)), 'bytes past a shrink must read as zeros after growth')
    assert.equal((await stat(img('t'))).size, 5 * 2 ** 20 + 3)
  })

  test('reads at or past used_size return nothing; writes past size fail with ENOSPC', async () => {
    const fh = await open(img('t'), 'r+')
    try {
      const st = await fh.stat()
      const { bytesRead } = await fh.read(Buffer.alloc(100), 0, 100, st.size)
      assert.equal(bytesRead, 0)
      // A write across the end is short (the kernel splits it at the page
      // edge) or refused; a write wholly past the end is refused.
      const across = await fh.write(Buffer.alloc(10, 1), 0, 10, 8 * 2 ** 20 - 5).then((r) => r.bytesWritten, (err: NodeJS.ErrnoException) => err.code)
      assert.ok(across === 5 || across === 'ENOSPC', `write across the end gave ${String(across)}`)
      await assert.rejects(fh.write(Buffer.alloc(10), 0, 10, 8 * 2 ** 20), { code: 'ENOSPC' })
    } finally { await fh.close() }
  })

  test('an image created or imported while mounted appears, and a destroyed one goes', async () => {
    assert.equal((await node.cli('image', 'create', 'late', '-s', '10M', '-b', '1M')).code, 0)
    assert.ok((await readdir(node.mountpoint!)).includes('late'))
    assert.equal((await stat(img('late'))).size, 10 * 2 ** 20)
    const seed = { name: 'seeded', size: 4_000_000, block_size: 1_000_000, blocks: Array.from({ length: 4 }, () => ({ [node.id]: { synced: true } })) }
    const file = join(node.dir, 'seeded.json')
    await writeFile(file, JSON.stringify(seed))
    const r = await node.cli('image', 'import-metadata', file)
    assert.equal(r.code, 0, r.stderr)
    assert.equal((await stat(img('seeded'))).size, 4_000_000)
    assert.equal((await node.cli('image', 'destroy', 'late')).code, 0)
    assert.ok(!(await readdir(node.mountpoint!)).includes('late'))
    await assert.rejects(stat(img('late')), { code: 'ENOENT' })
  })

  test('destroying an open image is refused', async () => {
    const fh = await open(img('seeded'), 'r')
    try {
      const r = await node.cli('image', 'destroy', 'seeded')
      assert.equal(r.code, 5, r.stderr)
      assert.match(r.stderr, /is open/)
    } finally { await fh.close() }
  })

  test('statfs reports the capacity of image_root', async () => {
    const m = await statfs(node.mountpoint!)
    const root = await statfs(node.imageRoot)
    assert.equal(m.blocks * m.bsize, root.blocks * root.bsize)
  })

  test('SIGTERM unmounts cleanly', async () => {
    assert.ok(await node.isMounted())
    const code = await node.stop('SIGTERM')
    assert.equal(code, 0, node.output)
    assert.equal(await node.isMounted(), false)
    // And the data is still there after a restart.
    await node.launch()
    assert.ok(await node.isMounted())
    assert.ok((await readdir(node.mountpoint!)).includes('rand'))
  })
})
