/**
 * `ukai nodes storage` (issue 11, item 5) on real node processes: every
 * node reports, over its control API, what each image's block files take
 * there (allocated bytes, files) and what under its image_root nobody
 * needs (a stray directory, a file, the directory of an image the
 * metadata no longer places there); a node that cannot be reached is
 * shown as such.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { lstat, mkdir, open, readdir, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Cluster } from './helpers/cluster.js'
import type { TestNode } from './helpers/node-process.js'

const KiB = 1024
const MiB = 2 ** 20

interface Report {
  id: string
  alive: boolean
  reachable: boolean
  error?: string
  images?: Array<{ image: string, files: number, bytes: number, placed_blocks: number, missing?: boolean }>
  orphans?: Array<{ name: string, reason: string, files: number, bytes: number }>
}

async function blockBytes (n: TestNode, image: string): Promise<{ files: number, bytes: number }> {
  let files = 0
  let bytes = 0
  for (const f of await readdir(join(n.imageRoot, image))) {
    if (!/^\d{16}$/.test(f)) continue
    files++
    bytes += (await lstat(join(n.imageRoot, image, f))).blocks * 512
  }
  return { files, bytes }
}

describe('nodes storage', { timeout: 240_000 }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode, C: TestNode

  before(async () => {
    cluster = await Cluster.start({ nodes: 3, config: { io_timeout: 2 } })
    ;[A, B, C] = cluster.nodes as [TestNode, TestNode, TestNode]
  })
  after(async () => { await cluster?.destroy() })

  test("each node's usage per image, its orphans, and a node that does not answer", async () => {
    // 3 MiB of data in an 8 MiB image on A and B.
    const src = join(cluster.dir, 'disk.raw')
    const fh = await open(src, 'w')
    try {
      await fh.truncate(8 * MiB)
      await fh.write(randomBytes(2 * MiB), 0, 2 * MiB, 0)
      await fh.write(randomBytes(MiB), 0, MiB, 5 * MiB)
    } finally { await fh.close() }
    await A.cliOk('image', 'import', src, 'vm', '-b', '1M', '-l', A.id, '-l', B.id)
    // Orphans: a directory of no image on B, a plain file on A.
    await mkdir(join(B.imageRoot, 'stray'))
    await writeFile(join(B.imageRoot, 'stray', 'leftover'), randomBytes(64 * KiB))
    await writeFile(join(A.imageRoot, 'notes.txt'), 'not a block file\n')
    await C.stop('SIGKILL')

    const r = await A.cli('nodes', 'storage', '--json')
    assert.equal(r.code, 0, r.stderr)
    const reports = JSON.parse(r.stdout) as Report[]
    const of = (n: TestNode): Report => {
      const x = reports.find((p) => p.id === n.id)
      assert.ok(x !== undefined, `no report of ${n.id}: ${r.stdout}`)
      return x
    }
    for (const n of [A, B]) {
      const rep = of(n)
      assert.equal(rep.reachable, true, rep.error)
      const vm = rep.images!.find((i) => i.image === 'vm')
      assert.ok(vm !== undefined, JSON.stringify(rep))
      assert.deepEqual({ files: vm.files, bytes: vm.bytes }, await blockBytes(n, 'vm'))
      assert.equal(vm.files, 3)
      assert.ok(vm.bytes >= 3 * MiB && vm.bytes < 3 * MiB + 256 * KiB, `${n.id}: ${vm.bytes} bytes for 3 MiB of data`)
      assert.equal(vm.placed_blocks, 8)
    }
    assert.deepEqual(of(B).orphans!.map((o) => ({ name: o.name, reason: o.reason, files: o.files })), [{ name: 'stray', reason: 'no image of that name', files: 1 }])
    assert.ok(of(B).orphans![0]!.bytes >= 64 * KiB)
    assert.deepEqual(of(A).orphans!.map((o) => [o.name, o.reason]), [['notes.txt', 'not an image directory']])
    assert.equal(of(C).reachable, false)
    assert.ok(of(C).error !== undefined)

    // The text form says the same.
    const text = await B.cliOk('nodes', 'storage')
    assert.match(text, new RegExp(`node ${B.id}: .*3(\\.\\d)? MiB in 1 image\\(s\\), 64(\\.\\d)? KiB orphaned in 1 entry`))
    assert.match(text, /stray +1 +64(\.\d)? KiB +- +orphan: no image of that name/)
    assert.match(text, new RegExp(`node ${C.id}: not reachable`))
  })

  test('a replica the metadata no longer places on a node shows as an orphan until reclaimed; a missing one as lost', async () => {
    await A.cliOk('image', 'create', 'moved', '-s', '4M', '-b', '1M', '-l', A.id, '-l', B.id)
    await B.stop()
    await A.cliOk('image', 'remove-location', 'moved', B.id)
    await B.launch()
    const report = async (): Promise<Report[]> => JSON.parse(await A.cliOk('nodes', 'storage', '--json')) as Report[]
    const b = (await report()).find((p) => p.id === B.id)!
    const moved = b.orphans!.find((o) => o.name === 'moved')
    // B reclaims it RECLAIM_DELAY_MS after it started: asked at once, it is still there.
    assert.equal(moved?.reason, 'its image places no block on this node', JSON.stringify(b))
    // A replica whose directory went is lost, and said so.
    await A.cliOk('image', 'create', 'lost', '-s', '4M', '-b', '1M', '-l', A.id, '-l', B.id)
    await rm(join(A.imageRoot, 'lost'), { recursive: true })
    const a = (await report()).find((p) => p.id === A.id)!
    assert.deepEqual(a.images!.find((i) => i.image === 'lost'), { image: 'lost', files: 0, bytes: 0, placed_blocks: 4, missing: true })
  })
})
