/**
 * When the block store's flush answers, what it covers is durable, and a
 * failure is reported to the flush, not lost. fdatasync is intercepted
 * (slowed, failed, counted) through node:fs itself.
 */
import { afterEach, test } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import { syncBuiltinESMExports } from 'node:module'
import { join } from 'node:path'
import { tmpDir } from '../../test/helpers/tmp.js'
import { rejectsWith } from '../../test/helpers/assertions.js'
import { BlockStore } from './block-store.js'

type Fdatasync = typeof fs.fdatasync
const real: Fdatasync = fs.fdatasync

/** Replaces fdatasync for the block store (and everything else in this process). */
function intercept (fn: (fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => void): void {
  (fs as { fdatasync: unknown }).fdatasync = fn
  syncBuiltinESMExports()
}
afterEach(() => {
  (fs as { fdatasync: unknown }).fdatasync = real
  syncBuiltinESMExports()
})

test('a flush waits for the fsync of a handle being evicted, and fails with it', async (t) => {
  const root = await tmpDir(t)
  const store = new BlockStore(root, '%016d', { maxOpen: 1 })
  t.after(async () => await store.close())
  await store.allocate('img')
  await store.flush('img')
  await store.write('img', 0, 0, Buffer.alloc(4096, 1))
  let release!: () => void
  let started!: () => void
  const evictionSync = new Promise<void>((resolve) => { started = resolve })
  const gate = new Promise<void>((resolve) => { release = resolve })
  intercept((fd, cb) => {
    started()
    void gate.then(() => cb(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' })))
  })
  // Opening block 1 evicts block 0's handle, whose fsync is held.
  const write = store.write('img', 1, 0, Buffer.alloc(4096, 2))
  await evictionSync
  let answered = false
  const flush = store.flush('img').then(() => { answered = true }, (err: unknown) => { answered = true; throw err })
  for (let i = 0; i < 20; i++) await new Promise((resolve) => setImmediate(resolve))
  assert.equal(answered, false, 'the flush answered before the evicted file was synced')
  release()
  await rejectsWith(flush, 'UKAI_ERR_IO', /an fsync of its block files on this node failed/)
  await write
  // The failure is not forgotten by a retry.
  intercept(real)
  await rejectsWith(store.flush('img'), 'UKAI_ERR_IO')
})

test('the first flush of an image in a process syncs every block file of it, and its directory', async (t) => {
  const root = await tmpDir(t)
  const first = new BlockStore(root, '%016d')
  await first.allocate('img')
  for (let b = 0; b < 5; b++) await first.write('img', b, 0, Buffer.alloc(512, b))
  // The process "dies" without syncing: its handles are just dropped.
  let synced = 0
  intercept((fd, cb) => { synced++; real(fd, cb) })
  const second = new BlockStore(join(root), '%016d')
  t.after(async () => await second.close())
  await second.flush('img')
  assert.ok(synced >= 6, `${synced} fsyncs for 5 block files and their directory`)
  synced = 0
  await second.flush('img')
  assert.equal(synced, 0, 'a second flush with nothing written syncs nothing')
})
