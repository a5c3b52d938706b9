/**
 * `ukai image move` (issue 11): a running image's blocks relocated to the
 * node that now runs it, while a writer writes random data through NBD;
 * afterwards the data equals the model, reads of the range are served by
 * the new node, and the old node holds no file of the image. A move
 * interrupted by a restart of its node resumes when the node is back; one
 * that cannot copy stops before the old copy goes.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { readFile, readdir } from 'node:fs/promises'
import { createSecureContext } from 'node:tls'
import { join } from 'node:path'
import { Cluster } from './helpers/cluster.js'
import { issueNodeCert, type TestNode } from './helpers/node-process.js'
import { expectNode } from '../src/tls/identity.js'
import { NbdClient } from '../src/peer/nbd-client.js'
import { prng, waitUntil } from './helpers/assertions.js'

const MiB = 2 ** 20

interface MoveLine { progress?: { done: number, blocks: number, bytes: number }, result?: { done: number, blocks: number, bytes: number, failed: unknown[] }, error?: { code: string, message: string } }

/** Block files of `image` on node `n` (none when its directory is gone). */
async function blockFiles (n: TestNode, image: string): Promise<string[]> {
  try {
    return (await readdir(join(n.imageRoot, image))).filter((f) => !f.startsWith('.'))
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return []
    throw err
  }
}

describe('image move', { timeout: 600_000 }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode

  before(async () => {
    cluster = await Cluster.start({ nodes: 2, nbd: [0, 1], config: { io_timeout: 3, retry_after: 1 } })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
  })
  after(async () => { await cluster?.destroy() })

  async function move (n: TestNode, image: string, body: Record<string, unknown>, onLine?: (l: MoveLine) => void): Promise<MoveLine> {
    const r = await n.api<MoveLine[]>('POST', `/v1/images/${image}/move`, body, { ...(onLine !== undefined ? { onLine: onLine as (l: unknown) => void } : {}) })
    return r.body[r.body.length - 1]!
  }

  /** A new image on A of `mib` MiB in 4 MiB blocks, filled with random data through A's NBD export: the data. */
  async function filled (image: string, mib: number): Promise<Buffer> {
    await A.cliOk('image', 'create', image, '-s', `${mib}M`, '-b', '4M', '-l', A.id)
    const c = await NbdClient.connect({ path: A.nbdSocket! }, image, { timeoutMs: 30_000 })
    const model = randomBytes(mib * MiB)
    for (let off = 0; off < model.length; off += 4 * MiB) await c.write(off, model.subarray(off, off + 4 * MiB))
    await c.flush()
    await c.close()
    return model
  }

  test('a move while the image is written through NBD: data equal to the model, reads served by the new node, no file left on the old one', async () => {
    const SIZE = 256 * MiB
    await A.cliOk('image', 'create', 'mv', '-s', '256M', '-b', '16M', '-l', A.id)
    const model = Buffer.alloc(SIZE)
    // The guest runs on B now; its disk is still on A.
    const c = await NbdClient.connect({ path: B.nbdSocket! }, 'mv', { timeoutMs: 30_000 })
    const random = prng(5)
    for (let i = 0; i < 64; i++) {
      const off = Math.floor(random() * (SIZE / MiB)) * MiB
      const data = randomBytes(MiB)
      await c.write(off, data)
      data.copy(model, off)
    }
    await c.flush()
    let writing = true
    let writes = 0
    let worst = 0
    const writer = (async () => {
      while (writing) {
        const len = (1 + Math.floor(random() * 16)) * 4096
        const off = Math.floor(random() * ((SIZE - len) / 4096)) * 4096
        const data = randomBytes(len)
        const t0 = performance.now()
        await c.write(off, data)
        worst = Math.max(worst, performance.now() - t0)
        data.copy(model, off)
        if (++writes % 50 === 0) await c.flush()
      }
      await c.flush()
    })()
    const lines: MoveLine[] = []
    const last = await move(A, 'mv', { to: B.id, from: A.id }, (l) => lines.push(l))
    writing = false
    await writer
    assert.equal(last.error, undefined, last.error?.message)
    assert.deepEqual(last.result!.failed, [])
    assert.equal(last.result!.done, 16)
    assert.ok(lines.some((l) => l.progress !== undefined && l.progress.done > 0 && l.progress.done < 16) || lines.length > 2, 'no progress was reported')
    assert.ok(writes > 0, 'the writer wrote nothing during the move')
    process.stdout.write(`# move: ${writes} writes during it, slowest ${worst.toFixed(1)} ms; ${last.result!.bytes} bytes copied\n`)
    const doc = await cluster.image('mv')
    assert.deepEqual(Object.keys(doc.locations), [B.id])
    assert.deepEqual(await cluster.checkReplicas('mv', model), [])
    // The sparse copy: B allocates what A held (64 MiB written first, and what the writer wrote), not the image's size.
    // Reads of the range come from B itself.
    const before = (await B.api<{ readsFrom: Record<string, number> }>('GET', '/v1/images/mv/stats')).body.readsFrom
    const got = Buffer.alloc(SIZE)
    for (let off = 0; off < SIZE; off += 16 * MiB) await c.read(off, got.subarray(off, off + 16 * MiB))
    await c.close()
    assert.ok(got.equals(model), 'B reads something else than the model')
    const after = (await B.api<{ readsFrom: Record<string, number> }>('GET', '/v1/images/mv/stats')).body.readsFrom
    assert.ok((after[B.id] ?? 0) - (before[B.id] ?? 0) >= 16, `reads served by B: ${JSON.stringify(before)} -> ${JSON.stringify(after)}`)
    assert.equal(after[A.id] ?? 0, before[A.id] ?? 0, 'reads after the move went to the old node')
    // The old node reclaims its files once it has seen the change.
    await waitUntil('A has no block file of the image', async () => (await blockFiles(A, 'mv')).length === 0)
  })

  test('a move away from the node that runs the guest, while it writes: its reads go to the new copy, and its files go when it closes the image', async () => {
    const SIZE = 64 * MiB
    await A.cliOk('image', 'create', 'away', '-s', '64M', '-b', '4M', '-l', A.id)
    const c = await NbdClient.connect({ path: A.nbdSocket! }, 'away', { timeoutMs: 30_000 })
    const model = randomBytes(SIZE)
    for (let off = 0; off < SIZE; off += 4 * MiB) await c.write(off, model.subarray(off, off + 4 * MiB))
    await c.flush()
    let writing = true
    const random = prng(11)
    const writer = (async () => {
      while (writing) {
        const off = Math.floor(random() * (SIZE / 4096 - 4)) * 4096
        const data = randomBytes(4 * 4096)
        await c.write(off, data)
        data.copy(model, off)
      }
      await c.flush()
    })()
    const last = await move(A, 'away', { to: B.id, from: A.id })
    writing = false
    await writer
    assert.equal(last.error, undefined, last.error?.message)
    assert.deepEqual(last.result!.failed, [])
    assert.deepEqual(Object.keys((await cluster.image('away')).locations), [B.id])
    // The guest on A reads what it wrote, from B now.
    const before = (await A.api<{ readsFrom: Record<string, number> }>('GET', '/v1/images/away/stats')).body.readsFrom
    const got = Buffer.alloc(SIZE)
    for (let off = 0; off < SIZE; off += 4 * MiB) await c.read(off, got.subarray(off, off + 4 * MiB))
    assert.ok(got.equals(model), 'A reads something else than the model')
    const after = (await A.api<{ readsFrom: Record<string, number> }>('GET', '/v1/images/away/stats')).body.readsFrom
    assert.equal(after[A.id] ?? 0, before[A.id] ?? 0, 'reads after the move went to the old copy')
    assert.deepEqual(await cluster.checkReplicas('away', model), [])
    await c.close()
    await waitUntil('A has no block file of the image once it closed it', async () => (await blockFiles(A, 'away')).length === 0)
  })

  test('a move away from a node that has the image open as a reader: that node leaves its copy itself, and never reads it stale', async () => {
    const SIZE = 32 * MiB
    await A.cliOk('image', 'create', 'reader', '-s', '32M', '-b', '4M', '-l', A.id)
    // The writer runs on B; a reader on A reads A's own copy.
    const w = await NbdClient.connect({ path: B.nbdSocket! }, 'reader', { timeoutMs: 30_000 })
    const model = randomBytes(SIZE)
    for (let off = 0; off < SIZE; off += 4 * MiB) await w.write(off, model.subarray(off, off + 4 * MiB))
    await w.flush()
    const r = await NbdClient.connect({ path: A.nbdSocket! }, 'reader', { timeoutMs: 30_000 })
    try {
      assert.equal(r.readOnly, true, 'A exports the image read-only while B writes it')
      const first = Buffer.alloc(4096)
      await r.read(0, first)
      assert.ok(first.equals(model.subarray(0, 4096)))
      const readsOf = async (n: TestNode): Promise<Record<string, number>> =>
        (await n.api<{ readsFrom: Record<string, number> }>('GET', '/v1/images/reader/stats')).body.readsFrom
      assert.ok(((await readsOf(A))[A.id] ?? 0) > 0, 'the reader on A read its own copy')
      // Asked of A (the move runs on the writer, B), while B writes and A reads.
      let going = true
      const random = prng(23)
      let stale = ''
      const busy = (async () => {
        while (going) {
          const off = Math.floor(random() * (SIZE / 4096 - 4)) * 4096
          const data = randomBytes(4 * 4096)
          await w.write(off, data)
          data.copy(model, off)
          // What B acknowledged, A reads: from its copy before it leaves it, from B after.
          const got = Buffer.alloc(data.length)
          await r.read(off, got)
          if (!got.equals(data) && stale === '') stale = `A read stale data at ${off}`
        }
      })()
      const last = await move(A, 'reader', { to: B.id, from: A.id })
      going = false
      await busy
      assert.equal(last.error, undefined, last.error?.message)
      assert.deepEqual(last.result!.failed, [])
      assert.equal(stale, '')
      assert.deepEqual(Object.keys((await cluster.image('reader')).locations), [B.id])
      // B writes on, and A reads what B wrote, from B.
      const fresh = randomBytes(SIZE)
      for (let off = 0; off < SIZE; off += 4 * MiB) await w.write(off, fresh.subarray(off, off + 4 * MiB))
      await w.flush()
      const before = await readsOf(A)
      const got = Buffer.alloc(SIZE)
      for (let off = 0; off < SIZE; off += 4 * MiB) await r.read(off, got.subarray(off, off + 4 * MiB))
      assert.ok(got.equals(fresh), 'the reader on A reads something else than what B wrote')
      const after = await readsOf(A)
      assert.equal(after[A.id] ?? 0, before[A.id] ?? 0, 'reads after the move went to the old copy')
      assert.ok((after[B.id] ?? 0) > (before[B.id] ?? 0), 'the reader on A did not read from B')
      assert.deepEqual(await cluster.checkReplicas('reader', fresh), [])
    } finally {
      await r.close()
      await w.close()
    }
    await waitUntil('A has no block file of the image once the move is through', async () => (await blockFiles(A, 'reader')).length === 0)
  })

  test('a node that reads a replica over the network never reads it stale while that replica is removed', async () => {
    const SIZE = 32 * MiB
    await A.cliOk('image', 'create', 'far', '-s', '32M', '-b', '4M', '-l', A.id, '-l', B.id)
    // The writer runs on B; a third node (only its certificate: the reads
    // are made here) reads A's replica through A's peer port, as a node
    // with no copy of its own reads its nearest one.
    const w = await NbdClient.connect({ path: B.nbdSocket! }, 'far', { timeoutMs: 30_000 })
    const model = randomBytes(SIZE)
    for (let off = 0; off < SIZE; off += 4 * MiB) await w.write(off, model.subarray(off, off + 4 * MiB))
    await w.flush()
    const third = join(cluster.dir, 'third-node')
    await issueNodeCert(cluster.tlsCa!, '127.0.0.1:9', third)
    const tls = {
      context: createSecureContext({
        ca: await readFile(join(third, 'ca-cert.pem')),
        cert: await readFile(join(third, 'node-cert.pem')),
        key: await readFile(join(third, 'node-key.pem'))
      }),
      checkServerIdentity: expectNode(A.id, A.config.proxy_port as number)
    }
    const r = await NbdClient.connect({ host: '127.0.0.1', port: A.config.proxy_port as number }, 'replica/far', { timeoutMs: 30_000, tls, blockStatus: true })
    try {
      let going = true
      const random = prng(29)
      let stale = ''
      let served = 0
      let refused = 0
      const busy = (async () => {
        while (going) {
          const off = Math.floor(random() * (SIZE / 4096 - 4)) * 4096
          const data = randomBytes(4 * 4096)
          await w.write(off, data)
          // What B acknowledged, A's replica gives, or refuses (the reader goes elsewhere).
          const got = Buffer.alloc(data.length)
          try {
            await r.read(off, got)
            served++
            if (!got.equals(data) && stale === '') stale = `A's replica served stale data at ${off}`
          } catch (err) {
            assert.match((err as Error).message, /being removed from this node|not placed on this node/)
            refused++
          }
        }
      })()
      await waitUntil('the third node read A\'s replica', async () => served >= 20)
      // Asked of B, the writer: A removes its location itself.
      await B.cliOk('image', 'remove-location', 'far', A.id)
      const at = refused
      await waitUntil('A refuses the reads of its removed replica', async () => refused >= at + 20)
      going = false
      await busy
      assert.equal(stale, '')
      assert.deepEqual(Object.keys((await cluster.image('far')).locations), [B.id])
    } finally {
      await r.close()
      await w.close()
    }
    await waitUntil('A has no block file of the image once it is removed', async () => (await blockFiles(A, 'far')).length === 0)
  })

  for (const where of ['the old node', 'the new node'] as const) {
    test(`a sparse image moves allocating what it holds, not its size (the move run on ${where})`, async () => {
      const image = where === 'the old node' ? 'sp' : 'sp2'
      await A.cliOk('image', 'create', image, '-s', '1G', '-b', '64M', '-l', A.id)
      const c = await NbdClient.connect({ path: A.nbdSocket! }, image, { timeoutMs: 30_000 })
      const random = prng(9)
      const model = Buffer.alloc(1024 * MiB)
      for (let i = 0; i < 40; i++) {
        const off = Math.floor(random() * 4000) * 256 * 1024
        const data = randomBytes(256 * 1024)
        await c.write(off, data)
        data.copy(model, off)
      }
      await c.flush()
      await c.close()
      const served = async (): Promise<{ peer_read_bytes: number, peer_status_requests: number }> => (await A.api<{ peer_read_bytes: number, peer_status_requests: number }>('GET', `/v1/images/${image}/stats`)).body
      // The move runs on the node that writes the image: A, until it has let it go.
      await waitUntil('A has closed the image', async () => !(await A.api<{ open_images: string[] }>('GET', '/v1/node')).body.open_images.includes(image))
      const before = await served()
      // Run on B, the copy reads A's blocks over the peer protocol: their block status says where the data is.
      const last = await move(where === 'the old node' ? A : B, image, { to: B.id })
      assert.equal(last.error, undefined, last.error?.message)
      assert.ok(last.result!.bytes <= 11 * MiB, `${last.result!.bytes} bytes copied for 10 MiB of data`)
      if (where === 'the new node') {
        const after = await served()
        assert.ok(after.peer_read_bytes - before.peer_read_bytes <= 11 * MiB, `B read ${after.peer_read_bytes - before.peer_read_bytes} bytes from A for 10 MiB of data`)
        assert.ok(after.peer_status_requests > before.peer_status_requests, `B asked A for block status (${before.peer_status_requests} then ${after.peer_status_requests}; ${JSON.stringify(after)})`)
      }
      let allocated = 0
      const { stat } = await import('node:fs/promises')
      for (const f of await blockFiles(B, image)) allocated += (await stat(join(B.imageRoot, image, f))).blocks * 512
      assert.ok(allocated <= 11 * MiB, `B allocates ${allocated} bytes for 10 MiB of data`)
      assert.deepEqual(await cluster.checkReplicas(image, model), [])
    })
  }

  test('a move interrupted by a restart of the node that runs it resumes by itself when the node is back', async () => {
    const model = await filled('rs', 128)
    // Slowly (8 MiB/s), so that the restart comes in the middle.
    let seen = 0
    const first = move(A, 'rs', { to: B.id, rate: 8 * MiB }, (l) => { if (l.progress !== undefined) seen = l.progress.bytes }).catch((err: Error) => ({ error: { code: 'gone', message: err.message } }))
    await waitUntil('the move copied 24 MiB', async () => seen >= 24 * MiB, 60_000)
    await A.stop('SIGKILL')
    await first
    assert.ok(Object.keys((await cluster.image('rs')).locations).includes(A.id), 'the move was over before the restart')
    await A.launch()
    // Nobody runs the move again: A resumes it (at its 8 MiB/s) and finishes it.
    await waitUntil('A resumed the move and finished it', async () => Object.keys((await cluster.image('rs')).locations).join() === B.id, 120_000)
    // Run again (here: after it ended), the move has nothing left to do.
    const again = await move(A, 'rs', { to: B.id, from: A.id })
    assert.equal(again.error, undefined, again.error?.message)
    assert.deepEqual(again.result!.failed, [])
    assert.deepEqual(await cluster.checkReplicas('rs', model), [])
    await waitUntil('A has no block file of the image', async () => (await blockFiles(A, 'rs')).length === 0)
  })

  test('the same move asked for while it runs follows it; another move of the image is refused', async () => {
    const model = await filled('tw', 32)
    let started = false
    const first = move(A, 'tw', { to: B.id, rate: 8 * MiB }, (l) => { if (l.progress !== undefined && l.progress.bytes > 0) started = true })
    await waitUntil('the move copies', async () => started)
    const other = await move(A, 'tw', { to: B.id, start: 0, end: 2 })
    assert.equal(other.error?.code, 'UKAI_ERR_BUSY', JSON.stringify(other))
    const lines: MoveLine[] = []
    const follower = await move(A, 'tw', { to: B.id, from: A.id }, (l) => lines.push(l))
    const leader = await first
    assert.equal(follower.error, undefined, follower.error?.message)
    assert.deepEqual(follower.result, leader.result, 'the follower saw another result')
    assert.ok(lines.some((l) => l.progress !== undefined), 'the follower saw no progress')
    assert.deepEqual(Object.keys((await cluster.image('tw')).locations), [B.id])
    assert.deepEqual(await cluster.checkReplicas('tw', model), [])
  })

  test('a move cancelled (from the other node\'s CLI) stops between chunks, consistent, drops its record, and resumes when run again', async () => {
    const model = await filled('cx', 64)
    let seen = 0
    const first = move(A, 'cx', { to: B.id, rate: 4 * MiB }, (l) => { if (l.progress !== undefined) seen = l.progress.bytes })
    await waitUntil('the move copied 8 MiB', async () => seen >= 8 * MiB, 60_000)
    // B does not run the move: its CLI's cancel reaches A, where it runs.
    const said = await B.cliOk('image', 'move', 'cx', '--cancel')
    assert.match(said, new RegExp(`cancelled the move of 'cx' on ${A.id.replace(/[.]/g, '\\.')} after \\d+ of 16 block\\(s\\)`))
    const stopped = await first
    assert.equal(stopped.error, undefined, stopped.error?.message)
    assert.equal((stopped.result as { cancelled?: boolean }).cancelled, true)
    assert.ok(stopped.result!.done < 16, 'the move was through before the cancel')
    // Consistent: every block still has an in-sync copy holding the model's data; nothing will resume it.
    assert.deepEqual(await cluster.checkReplicas('cx', model), [])
    assert.ok(Object.keys((await cluster.image('cx')).locations).includes(A.id), 'A gave up blocks it still had to give')
    const none = await B.cli('image', 'move', 'cx', '--cancel')
    assert.notEqual(none.code, 0)
    assert.match(none.stderr, /no move of image 'cx' runs/)
    const bad = await B.cli('image', 'move', 'cx', '--cancel', '--to', A.id)
    assert.notEqual(bad.code, 0)
    assert.match(bad.stderr, /--cancel takes no other option/)
    // Run again, the move resumes and ends.
    const again = await move(A, 'cx', { to: B.id })
    assert.equal(again.error, undefined, again.error?.message)
    assert.deepEqual(again.result!.failed, [])
    assert.deepEqual(Object.keys((await cluster.image('cx')).locations), [B.id])
    assert.deepEqual(await cluster.checkReplicas('cx', model), [])
  })

  test('a move whose copy cannot be made stops before the old copy goes: nothing is lost', async () => {
    const model = await filled('st', 32)
    await B.stop('SIGKILL')
    const last = await move(A, 'st', { to: B.id, from: A.id })
    await B.launch()
    const failed = last.error !== undefined || (last.result?.failed.length ?? 0) > 0
    assert.ok(failed, `the move reported success: ${JSON.stringify(last)}`)
    const doc = await cluster.image('st')
    assert.deepEqual(doc.locations[A.id]!.out_of_sync, [], 'the old copy lost its in-sync state')
    assert.deepEqual(await cluster.checkReplicas('st', model), [])
    // Refused outright: a range whose only copy is not in sync anywhere cannot be moved; bad requests change nothing.
    const bad = await move(A, 'st', { to: B.id, from: B.id })
    assert.equal(bad.error?.code, 'UKAI_ERR_INVALID_ARGUMENT')
    const range = await move(A, 'st', { to: B.id, start: 5, end: 100 })
    assert.equal(range.error?.code, 'UKAI_ERR_OUT_OF_RANGE')
    // With B back, the same move completes.
    const done = await move(A, 'st', { to: B.id, from: A.id })
    assert.equal(done.error, undefined, done.error?.message)
    assert.deepEqual(await cluster.checkReplicas('st', model), [])
  })
})
