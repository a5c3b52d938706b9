/**
 * No stale data (issue 10): a replica's block files belong to one
 * incarnation of its image. An image destroyed while one of its nodes was
 * down leaves that node's files behind; a new image of the same name must
 * never read them as its own, through either node, whether the node is
 * back before the new image is made or only after.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { INCARNATION_FILE } from '../src/blockstore/block-store.js'
import { NbdClient } from '../src/peer/nbd-client.js'
import { Cluster } from './helpers/cluster.js'
import type { TestNode } from './helpers/node-process.js'

const MiB = 2 ** 20
const SIZE = 4 * MiB
const ZEROS = Buffer.alloc(SIZE)

async function readAll (n: TestNode, image: string): Promise<Buffer> {
  const c = await NbdClient.connect({ path: n.nbdSocket! }, image, { timeoutMs: 30_000 })
  try {
    const got = Buffer.alloc(SIZE)
    await c.read(0, got)
    return got
  } finally { await c.close() }
}

async function writeAll (n: TestNode, image: string, data: Buffer): Promise<void> {
  const c = await NbdClient.connect({ path: n.nbdSocket! }, image, { timeoutMs: 30_000 })
  try {
    await c.write(0, data)
    await c.flush()
  } finally { await c.close() }
}

describe('an image destroyed while one of its nodes was down', { timeout: 180_000 }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode

  before(async () => {
    cluster = await Cluster.start({ nodes: 2, nbd: [0, 1], config: { io_timeout: 2, retry_after: 30 } })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
  })
  after(async () => { await cluster?.destroy() })

  /** 'vm' on A and B with data on both; B goes down; 'vm' is destroyed through A. */
  const destroyedWhileBDown = async (): Promise<Buffer> => {
    await A.cliOk('image', 'create', 'vm', '-s', '4M', '-b', '1M', '-l', A.id, '-l', B.id)
    const old = randomBytes(SIZE)
    await writeAll(A, 'vm', old)
    assert.deepEqual(await cluster.checkReplicas('vm', old), [])
    await B.stop()
    await A.cliOk('image', 'destroy', 'vm')
    // B's files of the old image are still there.
    assert.ok((await readFile(join(B.imageRoot, 'vm', '0000000000000000'))).equals(old.subarray(0, MiB)))
    return old
  }

  test('B back before the new image is made: B removes its replica of the destroyed image; the new image reads as zeros through both nodes', async () => {
    await destroyedWhileBDown()
    await B.launch()
    // The leftover goes when B comes back, before any image of the name exists again.
    await assert.rejects(readFile(join(B.imageRoot, 'vm', INCARNATION_FILE)), { code: 'ENOENT' })
    assert.match(B.output, /image 'vm' was destroyed while this node was away: its replica here .* was removed/)
    await A.cliOk('image', 'create', 'vm', '-s', '4M', '-b', '1M', '-l', A.id, '-l', B.id)
    assert.ok((await readAll(B, 'vm')).equals(ZEROS), 'B served the destroyed image\'s bytes')
    assert.ok((await readAll(A, 'vm')).equals(ZEROS))
    assert.deepEqual(await cluster.checkReplicas('vm', ZEROS), [])
    // And the new image works as any other.
    const fresh = randomBytes(SIZE)
    await writeAll(A, 'vm', fresh)
    assert.ok((await readAll(B, 'vm')).equals(fresh))
    assert.deepEqual(await cluster.checkReplicas('vm', fresh), [])
    await A.cliOk('image', 'destroy', 'vm')
  })

  test('B back only after the new image is made and written: nothing of the old image is read, and a sync makes both copies equal', async () => {
    await destroyedWhileBDown()
    await A.cliOk('image', 'create', 'vm', '-s', '4M', '-b', '1M', '-l', A.id, '-l', B.id)
    // Half of it written while B is down: those blocks are marked out of sync on B.
    const fresh = Buffer.concat([randomBytes(2 * MiB), Buffer.alloc(2 * MiB)])
    const c = await NbdClient.connect({ path: A.nbdSocket! }, 'vm', { timeoutMs: 30_000 })
    await c.write(0, fresh.subarray(0, 2 * MiB))
    await c.flush()
    await c.close()
    await B.launch()
    assert.ok((await readAll(B, 'vm')).equals(fresh), 'B served the destroyed image\'s bytes')
    assert.deepEqual(await cluster.checkReplicas('vm', fresh), [])
    await A.cliOk('sync', 'vm')
    assert.deepEqual(await cluster.checkReplicas('vm', fresh, { includeOutOfSync: true }), [])
    await A.cliOk('image', 'destroy', 'vm')
  })

  test('a replica directory that names another incarnation when its node starts is emptied before anything reads it', async () => {
    await A.cliOk('image', 'create', 'vm', '-s', '4M', '-b', '1M', '-l', A.id, '-l', B.id)
    // What a node left of an older image of the name, as if it had been made by one:
    // another incarnation's marker and a block file. B rereads it at its next start.
    await B.stop()
    const dir = join(B.imageRoot, 'vm')
    await writeFile(join(dir, INCARNATION_FILE), 'an-image-destroyed-long-ago\n')
    await writeFile(join(dir, '0000000000000001'), Buffer.alloc(MiB, 0x5a))
    await B.launch()
    assert.ok((await readAll(B, 'vm')).equals(ZEROS), 'B served another image\'s block')
    const st = await cluster.state('vm')
    assert.equal((await readFile(join(dir, INCARNATION_FILE), 'utf8')).trim(), `${st.incarnation} ${st.headerCreate}`)
    await A.cliOk('image', 'destroy', 'vm')
  })
})
