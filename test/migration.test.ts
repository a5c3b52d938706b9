/**
 * A real QEMU live migration between two UKAI nodes on a real etcd: the
 * test guest (TCG, test/helpers/guest.ts) writes, reads back and re-reads
 * 4 KiB records while it migrates from node A to node B, once through the
 * nodes' NBD exports and once through their FUSE files.
 *
 * The image has a replica of every block on both nodes, and both nodes
 * are its hypervisors: the destination QEMU opens the image read-write
 * on B while the source still has it open for writing on A (as QEMU's
 * shared-storage migration expects), and the destination's first write
 * takes the writer lease over, fencing A's session. Checked:
 * - the guest goes on, on B, where it was: no I/O error on either
 *   console (the source's up to the handover), the sequence continues;
 * - B holds the writer lease, at a higher generation, and logged it;
 * - the old writer is fenced: the source QEMU is resumed after the
 *   migration (`cont` reactivates its disk) and writes through its
 *   existing open on A, with qemu-io and with the guest's own workload:
 *   every such write fails, and no node's replica holds its bytes;
 * - afterwards every record on the disk is what the guest last wrote
 *   there, on both nodes, and in-sync replicas are identical.
 * The handover figures (QEMU's downtime and total time, UKAI's takeover,
 * the stall the guest saw) are reported as diagnostics, never asserted.
 *
 * Skipped, with the reason, without etcd or the guest's tools.
 */
import { after, before, describe, test, type TestContext } from 'node:test'
import assert from 'node:assert/strict'
import { open } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { Cluster } from './helpers/cluster.js'
import { etcdMissing } from './helpers/etcd.js'
import { buildGuest, checkRecords, compareDiskWithLog, guestAvailable, guestCmdline, parseGuestLog, type Guest } from './helpers/guest.js'
import { describeFigures, measureMigration } from './helpers/migration.js'
import { freePort, type TestNode } from './helpers/node-process.js'
import { Qemu, type QemuDisk } from './helpers/qemu.js'
import { assertClean, waitForRounds } from './helpers/guest-console.js'

const MB = 2 ** 20
const LEASE = { lease_ttl: 4, io_timeout: 2, retry_after: 30 }
/** MiB of the disk the guest's workload covers (blocks 0..MIB-1). */
const MIB = 8
const EVERY = 10
const BOOT_TIMEOUT = 90_000
/** Where the old writer's late write goes: outside the workload's area (block 62). */
const INJECT_AT = 62 * MB
const INJECT_LEN = 4096

const avail = guestAvailable()
const skip = etcdMissing() ?? (avail.ok ? undefined : avail.reason)

interface InfoDoc {
  hypervisors: string[]
  open: Array<{ node: string, readers: number, writers: number }>
  writer: { node: string, generation: number, purpose: string, since: string } | null
}

async function cliOk (node: TestNode, ...args: string[]): Promise<string> {
  const r = await node.cli(...args)
  assert.equal(r.code, 0, `ukai ${args.join(' ')}: ${r.stderr}`)
  return r.stdout
}

async function info (node: TestNode, image: string): Promise<InfoDoc> {
  return JSON.parse(await cliOk(node, 'image', 'info', image, '--json')) as InfoDoc
}

type Kind = 'nbd' | 'fuse'

function diskOf (node: TestNode, kind: Kind, image: string): QemuDisk {
  return kind === 'nbd' ? { nbd: { socket: node.nbdSocket!, export: image } } : { file: join(node.mountpoint!, image) }
}

/** Polls until no node has the image open and nobody holds its writer lease (a FUSE release reaches the node after close returns). */
async function closedEverywhere (node: TestNode, image: string): Promise<InfoDoc> {
  const deadline = Date.now() + 15_000
  for (;;) {
    const doc = await info(node, image)
    if (doc.open.length === 0 && doc.writer === null) return doc
    assert.ok(Date.now() < deadline, `image '${image}' still open or written: ${JSON.stringify({ open: doc.open, writer: doc.writer })}`)
    await sleep(100)
  }
}

describe('a live migration between two nodes (QEMU TCG, nodes on etcd)', { skip, timeout: 300_000 }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode
  let guest: Guest

  before(async () => {
    guest = buildGuest()
    cluster = await Cluster.start({ nodes: 2, nbd: [0, 1], mount: [0, 1], etcd: true, config: LEASE })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
  })
  after(async () => { await cluster?.destroy() })

  for (const kind of ['nbd', 'fuse'] as const) {
    const where = kind === 'nbd' ? 'the NBD exports' : 'the FUSE files'

    test(`A -> B through ${where} while the guest writes: no guest I/O error, and the old writer is fenced`, { timeout: 150_000 }, async (t) => {
      await migrateAndFence(t, kind, A, B, cluster, guest)
    })
  }
})

async function migrateAndFence (t: TestContext, kind: Kind, A: TestNode, B: TestNode, cluster: Cluster, g: Guest): Promise<void> {
  const image = `vm-${kind}`
  await cliOk(A, 'image', 'create', image, '-s', '64M', '-b', '1M', '-l', A.id, '-l', B.id)
  await cliOk(A, 'image', 'add-hypervisor', image, A.id)
  await cliOk(B, 'image', 'add-hypervisor', image, B.id)
  assert.deepEqual((await info(B, image)).hypervisors.sort(), [A.id, B.id].sort())

  const vms: Qemu[] = []
  try {
    const { append, run: token } = guestCmdline({ mib: MIB, every: EVERY })
    const src = await Qemu.start({ kernel: g.kernel, initrd: g.initrd, append, disk: diskOf(A, kind, image), name: 'source' })
    vms.push(src)
    await src.waitForSerial(/UKAI-GUEST ready/, BOOT_TIMEOUT)
    t.diagnostic(`source boot to ready: ${Date.now() - src.startedAt} ms`)
    // The destination opens the image read-write on B while A writes it: B is a hypervisor.
    const dest = await Qemu.start({ kernel: g.kernel, initrd: g.initrd, append, disk: diskOf(B, kind, image), name: 'destination', incoming: { port: await freePort() } })
    vms.push(dest)
    await waitForRounds(src, 40, 60_000)

    const before = await info(A, image)
    assert.equal(before.writer?.node, A.id, 'A writes the image before the migration')
    assert.equal(before.writer?.purpose, 'write')
    const writers = before.open.filter((o) => o.writers > 0).map((o) => o.node).sort()
    assert.deepEqual(writers, [A.id, B.id].sort(), 'both nodes have the image open for writing (source and destination QEMU)')
    const g0 = before.writer!.generation

    // ---- the migration, while the guest writes
    const f = await measureMigration(src, dest, { destinationNodeOutput: () => B.output, image, roundsAfter: 5 })
    t.diagnostic(`${kind}: ${describeFigures(f)}`)
    assert.equal(f.qemu.status, 'completed')
    assert.equal((await src.status()).status, 'postmigrate')
    assert.equal((await dest.status()).running, true)
    const srcLog = parseGuestLog(src.serial.slice(0, f.sourceSerialEnd))
    assertClean(srcLog, 'source console up to the handover')
    assert.ok(srcLog.lastWrote >= 40)

    // The guest goes on on B where it was: no second boot, the sequence continues.
    await waitForRounds(dest, srcLog.lastWrote + 2 * EVERY, 30_000)
    let destLog = parseGuestLog(dest.serial)
    assertClean(destLog, 'destination console')
    assert.equal(destLog.ready, false, 'the guest did not boot again on the destination')
    const firstOnDest = Math.min(...destLog.wrote.values())
    assert.ok(firstOnDest > srcLog.lastWrote && firstOnDest <= srcLog.lastWrote + 3,
      `the first round on the destination (${firstOnDest}) follows the last on the source (${srcLog.lastWrote})`)

    // B took the writer lease over from A, at a higher generation.
    assert.ok(f.takeover !== undefined, `B logged no takeover of '${image}':\n${B.output.slice(-3000)}`)
    assert.equal(f.takeover.from, A.id)
    assert.equal(f.takeover.generationBefore, g0)
    assert.ok(f.takeover.generationAfter > g0)
    const mid = await info(A, image)
    assert.equal(mid.writer?.node, B.id, 'B holds the writer lease after the migration')
    assert.equal(mid.writer?.generation, f.takeover.generationAfter)
    assert.equal(mid.writer?.purpose, 'write')

    // ---- the old writer writes through its existing open on A
    const mark = src.serial.length
    // `cont` after a completed migration reactivates the source's block devices.
    await src.resume()
    assert.equal((await src.status()).status, 'running', 'the source runs again after cont')
    // qemu-io (HMP) prints its result on QEMU's stdout, which is the serial console here.
    const ioMark = src.serial.length
    await src.hmp(`qemu-io d0 "write -P 0xaa ${INJECT_AT} ${INJECT_LEN}"`)
    const io = (await src.waitForSerial(/write failed: [^\r\n]*|wrote \d+\/\d+ bytes at offset \d+/, 10_000, ioMark))[0]
    t.diagnostic(`${kind}: the old writer's qemu-io write through A: ${JSON.stringify(io)}`)
    assert.match(io, /^write failed: (Operation not permitted|Read-only file system)$/, 'the old writer\'s write must be refused')
    // Through the same open as before (QEMU did not open the image again on A): A has one writer, no reader.
    assert.deepEqual((await info(A, image)).open.filter((o) => o.node === A.id).map((o) => [o.readers, o.writers]), [[0, 1]])
    // The source guest's own workload tries too, and gets errors.
    await src.waitForSerial(/UKAI-GUEST error write [^\n]*/, 30_000, mark)
    await src.pause()
    await sleep(200)
    // (qemu-io's line may have landed in the middle of a guest line: it is taken out.)
    const lateLog = parseGuestLog(src.serial.slice(mark).replace(`${io}\n`, ''))
    // The round in progress at the switchover may have written (through A,
    // still the writer then) before it; the source prints its line after cont.
    // Any later round that logs `wrote` wrote after the handover.
    const late = [...lateLog.wrote.values()].filter((seq) => seq > srcLog.lastWrote + 1)
    assert.deepEqual(late, [], 'rounds of the old writer written after the handover')
    t.diagnostic(`${kind}: the source guest after cont: ${lateLog.errors.length} error line(s), e.g. ${JSON.stringify(lateLog.errors[0])}; ` +
      `${lateLog.ioErrors.length} kernel I/O error line(s), e.g. ${JSON.stringify(lateLog.ioErrors[0])}; ` +
      `rounds logged as written: ${[...lateLog.wrote.values()].join(', ') || 'none'} (the last on the source before the switchover: ${srcLog.lastWrote})`)

    // The destination is not disturbed by any of it.
    await waitForRounds(dest, destLog.lastWrote + EVERY, 30_000)
    assert.equal((await info(B, image)).writer?.node, B.id, 'B still writes the image')

    // ---- both QEMUs go; the disk against what the guest said it wrote
    await dest.pause()
    await sleep(300) // the console pipe catches up
    destLog = parseGuestLog(dest.serial)
    assertClean(destLog, 'destination console')
    await src.quit()
    await dest.quit()
    const end = await closedEverywhere(B, image)
    assert.equal(end.writer, null)

    const log = parseGuestLog(src.serial.slice(0, f.sourceSerialEnd) + dest.serial)
    for (const n of [A, B]) {
      const blocks: Buffer[] = []
      for (let b = 0; b < MIB; b++) blocks.push(await cluster.blockOnDisk(n, image, b, MB))
      const disk = checkRecords(Buffer.concat(blocks), token)
      assert.deepEqual(compareDiskWithLog(disk, log).slice(0, 20), [], `the replica on ${n.id} against what the guest wrote`)
      assert.ok(disk.maxSeq > srcLog.lastWrote, `${n.id} has rounds written on the destination`)
      const injected = await cluster.blockOnDisk(n, image, INJECT_AT / MB, MB)
      assert.ok(injected.equals(Buffer.alloc(MB)), `block ${INJECT_AT / MB} on ${n.id} holds bytes of the old writer's late write`)
      t.diagnostic(`${kind}: replica on ${n.id}: ${disk.records.size} records (highest seq ${disk.maxSeq}), ${disk.empty} empty slots, consistent with the console`)
    }
    // And through B: the late write's region reads as zeros.
    const fh = await open(join(B.mountpoint!, image), 'r')
    try {
      const buf = Buffer.alloc(INJECT_LEN, 0xff)
      await fh.read(buf, 0, INJECT_LEN, INJECT_AT)
      assert.ok(buf.equals(Buffer.alloc(INJECT_LEN)), 'B reads the old writer\'s bytes')
    } finally { await fh.close() }
    assert.deepEqual(await cluster.checkReplicas(image), [], 'in-sync replicas differ')
  } catch (err) {
    for (const [what, out] of [['A', A.output], ['B', B.output], ...vms.map((vm) => [`${vm.name} QEMU stderr`, vm.stderr])]) {
      t.diagnostic(`${what}:\n${out!.slice(-4000)}`)
    }
    throw err
  } finally {
    for (const vm of vms.reverse()) await vm.stop()
  }
}
