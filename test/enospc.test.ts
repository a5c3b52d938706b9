/**
 * A full file system under image_root loses nothing (issue 9): a write
 * that finds no space fails with ENOSPC over NBD and over FUSE, no block
 * changes state, what was acknowledged before reads back (also after a
 * restart), and other reads go on. The file system is a small tmpfs the
 * test mounts (and unmounts) itself.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdir, mkdtemp, open, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { TestNode, run } from './helpers/node-process.js'
import { NbdClient } from '../src/peer/nbd-client.js'

const MiB = 2 ** 20

describe('ENOSPC under image_root', { timeout: 120_000 }, () => {
  let dir: string
  let fs: string
  let node: TestNode
  let skip: string | undefined

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ukai-enospc-'))
    fs = join(dir, 'small')
    await mkdir(fs)
    const m = await run('mount', ['-t', 'tmpfs', '-o', 'size=12m', 'tmpfs', fs])
    if (m.code !== 0) { skip = `cannot mount a tmpfs: ${m.stderr.trim()}`; return }
    const nodeDir = join(dir, 'node')
    await mkdir(nodeDir)
    node = await TestNode.start({ dir: nodeDir, mount: true, nbd: true, config: { image_root: join(fs, 'images'), metadata_root: join(dir, 'metadata') } })
  })
  after(async () => {
    await node?.destroy()
    await run('umount', ['-l', fs])
    await rm(dir, { recursive: true, force: true })
  })

  test('writes that find the disk full fail with ENOSPC; nothing acknowledged is lost, nothing changes state', async (t) => {
    if (skip !== undefined) { t.skip(skip); return }
    const c = await node.cli('image', 'create', 'vm', '-s', '32M', '-b', '1M')
    assert.equal(c.code, 0, c.stderr)
    const acked = randomBytes(4 * MiB)
    const nbd = await NbdClient.connect({ path: node.nbdSocket! }, 'vm', { timeoutMs: 30_000 })
    try {
      await nbd.write(0, acked)
      await nbd.flush()
      // Fill the file system with something else.
      const filler = join(fs, 'filler')
      await writeFile(filler, Buffer.alloc(0))
      const fh = await open(filler, 'w')
      try {
        for (;;) await fh.write(Buffer.alloc(MiB, 1))
      } catch (err) {
        assert.equal((err as NodeJS.ErrnoException).code, 'ENOSPC')
      } finally { await fh.close() }
      // NBD: NBD_ENOSPC, which the client reports as UKAI_ERR_NO_SPACE.
      await assert.rejects(nbd.write(8 * MiB, randomBytes(2 * MiB)), (err: { code?: string, message?: string }) => {
        assert.equal(err.code, 'UKAI_ERR_NO_SPACE', err.message)
        return true
      })
      // What was acknowledged reads back, at once (no error state keeps reads away).
      const back = Buffer.alloc(4 * MiB)
      await nbd.read(0, back)
      assert.ok(back.equals(acked))
      // FUSE: ENOSPC as ENOSPC (a second writer here is read-only: close NBD first).
      await nbd.close()
      await new Promise((resolve) => setTimeout(resolve, 200))
      const f = await open(join(node.mountpoint!, 'vm'), 'r+')
      try {
        await assert.rejects(f.write(randomBytes(2 * MiB), 0, 2 * MiB, 12 * MiB), /ENOSPC/)
      } finally { await f.close() }
      const doc = JSON.parse((await node.cli('image', 'info', 'vm', '--json')).stdout) as { locations: Record<string, { out_of_sync: unknown[] }> }
      assert.deepEqual(doc.locations[node.id]!.out_of_sync, [], 'a write that found no space marked the only copy out of sync')
      await rm(filler)
    } finally {
      await nbd.close()
    }
    // Space again, and after a restart: everything acknowledged reads back.
    await node.stop()
    await node.launch()
    const again = await NbdClient.connect({ path: node.nbdSocket! }, 'vm', { timeoutMs: 30_000 })
    try {
      const back = Buffer.alloc(4 * MiB)
      await again.read(0, back)
      assert.ok(back.equals(acked))
      await again.write(8 * MiB, Buffer.alloc(MiB, 7))
      await again.flush()
    } finally { await again.close() }
  })
})
