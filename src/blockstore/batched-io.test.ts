import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { constants, tmpdir } from 'node:os'
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { readAt, writeAt } from './batched-io.js'
import { load } from './sparse.js'

test('many reads and writes of one turn: each lands where it was asked, reads stop at the end of the file', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ukai-batch-'))
  try {
    const files = [0, 1, 2].map((i) => join(dir, `f${i}`))
    const model = files.map(() => randomBytes(1024 * 1024))
    files.forEach((f, i) => writeFileSync(f, model[i]!))
    const fds = files.map((f) => openSync(f, 'r+'))
    // 300 writes in one turn (several jobs), then reads of every one of them, also in one turn.
    const writes: Array<{ file: number, pos: number, data: Buffer }> = []
    for (let i = 0; i < 300; i++) {
      const file = i % 3
      const data = randomBytes(1 + (i * 977) % 8192)
      const pos = ((i * 7919) % 250) * 4096
      writes.push({ file, pos, data })
    }
    // Overlaps within one turn have no order; keep the model to the ones that do not overlap.
    const kept = writes.filter((w, i) => !writes.some((o, j) => j !== i && o.file === w.file && o.pos < w.pos + w.data.length && w.pos < o.pos + o.data.length))
    await Promise.all(kept.map(async (w) => await writeAt(fds[w.file]!, w.data, w.pos)))
    for (const w of kept) w.data.copy(model[w.file]!, w.pos)
    files.forEach((f, i) => assert.ok(readFileSync(f).equals(model[i]!), `file ${i} differs from the model`))
    const got = await Promise.all(kept.map(async (w) => {
      const b = Buffer.alloc(w.data.length)
      return { n: await readAt(fds[w.file]!, b, w.pos), b, w }
    }))
    for (const { n, b, w } of got) {
      assert.equal(n, w.data.length)
      assert.ok(b.equals(w.data))
    }
    // A large read (its own job), and one past the end of the file.
    const big = Buffer.alloc(1024 * 1024)
    const tail = Buffer.alloc(8192)
    const [nBig, nTail] = await Promise.all([readAt(fds[0]!, big, 0), readAt(fds[1]!, tail, 1024 * 1024 - 100)])
    assert.equal(nBig, big.length)
    assert.ok(big.equals(model[0]!))
    assert.equal(nTail, 100)
    assert.ok(tail.subarray(0, 100).equals(model[1]!.subarray(1024 * 1024 - 100)))
    fds.forEach((fd) => closeSync(fd))
    // A failed entry fails only its own request, with the errno's code.
    const ro = openSync(files[2]!, 'r')
    const results = await Promise.allSettled([writeAt(ro, Buffer.from('x'), 0), readAt(ro, Buffer.alloc(10), 0)])
    assert.equal(results[0].status, 'rejected')
    assert.equal(((results[0] as PromiseRejectedResult).reason as NodeJS.ErrnoException).code, 'EBADF')
    assert.deepEqual(results[1], { status: 'fulfilled', value: 10 })
    closeSync(ro)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('a small read the page cache holds is answered at once; one it does not hold goes to the thread pool, and both read the right bytes', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ukai-now-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  const model = randomBytes(32 * 2 ** 20)
  const src = join(dir, 'model')
  const file = join(dir, 'uncached')
  writeFileSync(src, model)
  // Written with O_DIRECT, the file's pages are not in the page cache.
  const dd = spawnSync('dd', [`if=${src}`, `of=${file}`, 'bs=1M', 'oflag=direct', 'status=none'])
  if (dd.status !== 0) return t.skip(`O_DIRECT writes are not possible here: ${dd.stderr.toString().trim()}`)
  const fd = openSync(file, 'r')
  t.after(() => closeSync(fd))
  // The kernel's answer for regions nobody read yet: it would have to wait for the disk.
  const probes = [0, 1, 2, 3].map((i) => load().readNow(fd, Buffer.alloc(4096), i * 8 * 2 ** 20))
  assert.ok(probes.includes(-constants.errno.EAGAIN), `readNow of uncached pages answered ${probes.join(', ')}, never -EAGAIN`)
  // Other uncached regions, through readAt: the pool reads them.
  for (let i = 0; i < 4; i++) {
    const pos = i * 8 * 2 ** 20 + 4 * 2 ** 20
    const b = Buffer.alloc(4096)
    assert.equal(await readAt(fd, b, pos), 4096)
    assert.ok(b.equals(model.subarray(pos, pos + 4096)), `uncached read at ${pos} differs`)
  }
  // A cached region (just read): answered at once, the same bytes.
  const b = Buffer.alloc(4096)
  const pos = 4 * 2 ** 20
  assert.equal(load().readNow(fd, b, pos), 4096)
  assert.ok(b.equals(model.subarray(pos, pos + 4096)))
  assert.equal(await readAt(fd, Buffer.alloc(100), model.length - 40), 40, 'stops at the end of the file')
})
