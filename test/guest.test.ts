/**
 * A real Linux guest (QEMU, TCG) whose disk is a UKAI image served by a
 * real `ukai server` node: the guest's own workload (test/helpers/guest.ts)
 * writes, reads back and re-reads 4 KiB records with O_DIRECT, and the
 * test checks its console for errors and the disk for every record.
 *
 * Live migration on one node: the destination starts paused (-S) on a
 * placeholder disk, the source quits after the migration, and the
 * destination attaches the image (blockdev-add + blockdev-reopen) before
 * it resumes. (One node serves one writer per image, so two QEMUs cannot
 * both have the image open on one node; a migration with both attached
 * at once runs between two nodes, in migration.test.ts.)
 *
 * Skipped, with the reason, when qemu-system-x86_64, a static busybox or
 * a readable kernel with its modules is missing (guestAvailable()).
 */
import { describe, test, type TestContext } from 'node:test'
import assert from 'node:assert/strict'
import { open } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { TestNode, freePort, run } from './helpers/node-process.js'
import { makeTmpDir } from './helpers/tmp.js'
import {
  IO_ERROR_RE, buildGuest, checkRecords, compareDiskWithLog, expectedRecord, guestAvailable, guestCmdline, parseGuestLog, type Guest
} from './helpers/guest.js'
import { Qemu, type MigrationResult, type QemuDisk } from './helpers/qemu.js'
import { assertClean, waitForRounds } from './helpers/guest-console.js'

const IMAGE = 'vm'
const IMAGE_SIZE = 64 * 2 ** 20
/** MiB of the disk the workload covers. */
const MIB = 8
const EVERY = 10
const BOOT_TIMEOUT = 90_000

const avail = guestAvailable()
let guest: Guest | undefined

/** The guest, built once; undefined (and the test skipped) when the host cannot run it. */
function needGuest (t: TestContext): Guest | undefined {
  if (!avail.ok) { t.skip(avail.reason); return undefined }
  guest ??= buildGuest()
  return guest
}

type Kind = 'nbd' | 'fuse'

async function startNode (kind: Kind): Promise<TestNode> {
  // Our own directory, so that it goes even when the node fails to start.
  const dir = await makeTmpDir('ukai-test-')
  let node: TestNode
  try {
    node = await TestNode.start(kind === 'nbd' ? { nbd: true, dir: dir.path } : { mount: true, dir: dir.path })
  } catch (err) {
    if (kind === 'fuse') await run('fusermount', ['-uz', join(dir.path, 'mnt')])
    await dir.cleanup().catch(() => {})
    throw err
  }
  const r = await node.cli('image', 'create', IMAGE, '-s', '64M', '-b', '1M')
  if (r.code !== 0) {
    await node.destroy()
    throw new Error(`image create: ${r.code} ${r.stderr}`)
  }
  return node
}

function diskOf (node: TestNode, kind: Kind): QemuDisk {
  return kind === 'nbd' ? { nbd: { socket: node.nbdSocket!, export: IMAGE } } : { file: join(node.mountpoint!, IMAGE) }
}

/** The workload's part of the disk, read beside the guest: a second NBD connection (served read-only) or a read-only open of the FUSE file. */
async function readDisk (node: TestNode, kind: Kind): Promise<Buffer> {
  const want = MIB * 2 ** 20
  let path: string
  if (kind === 'nbd') {
    path = join(node.dir, `copy-${Date.now()}.raw`)
    const r = await run('nbdcopy', [`nbd+unix:///${IMAGE}?socket=${node.nbdSocket!}`, path])
    assert.equal(r.code, 0, `nbdcopy: ${r.stderr}`)
  } else path = join(node.mountpoint!, IMAGE)
  const fh = await open(path, 'r')
  try {
    const buf = Buffer.alloc(want)
    const { bytesRead } = await fh.read(buf, 0, want, 0)
    assert.equal(bytesRead, want)
    return buf
  } finally { await fh.close() }
}

/** Pauses `vm`, checks every record on the disk against the guest's whole console output (`text()`, read once paused), resumes it. */
async function checkDisk (t: TestContext, vm: Qemu, node: TestNode, kind: Kind, text: () => string, runToken: string): Promise<void> {
  await vm.pause()
  await sleep(300) // the console pipe catches up
  const log = parseGuestLog(text())
  const disk = checkRecords(await readDisk(node, kind), runToken)
  const problems = compareDiskWithLog(disk, log)
  assert.deepEqual(problems.slice(0, 20), [], 'the disk against what the guest wrote')
  assert.ok(disk.records.size > 0, 'records on the disk')
  t.diagnostic(`${vm.name}: ${disk.records.size} records on the disk (highest seq ${disk.maxSeq}), ${disk.empty} empty slots, consistent with the console`)
  await vm.resume()
}

describe('a Linux guest on a UKAI disk (QEMU TCG)', () => {
  test('the disk check flags stale, misplaced, torn and foreign records (no VM)', () => {
    const run = '0badcafe'
    const disk = Buffer.alloc(8 * 4096)
    const put = (slot: number, seq: number, sector = slot * 8, token = run): void => { expectedRecord(seq, sector, token).copy(disk, slot * 4096) }
    put(1, 5)
    put(2, 6)
    put(3, 7)
    const text = (wrote: Array<[number, number]>): string => ['UKAI-GUEST ready slots=8 run=' + run, ...wrote.map(([sl, sq]) => `UKAI-GUEST wrote ${sl * 8} ${sq}`)].join('\n')
    const good = parseGuestLog(text([[1, 5], [2, 6], [3, 7]]))
    assert.deepEqual(compareDiskWithLog(checkRecords(disk, run), good), [])
    // Round 8 was in flight (written, not yet logged): fine.
    put(4, 8)
    assert.deepEqual(compareDiskWithLog(checkRecords(disk, run), good), [])
    // The guest rewrote slot 2 in round 9; the disk still holds round 6.
    assert.match(compareDiskWithLog(checkRecords(disk, run), parseGuestLog(text([[1, 5], [2, 6], [3, 7], [4, 8], [2, 9]]))).join(), /older seq 6/)
    put(5, 3, 99 * 8)
    disk[3 * 4096 + 1000] = 0x41
    put(6, 4, 6 * 8, '12345678')
    const bad = checkRecords(disk, run).bad.join('\n')
    assert.match(bad, /sector 40: holds the record of sector 792/)
    assert.match(bad, /sector 24: record seq 7 is torn or corrupt/)
    assert.match(bad, /sector 48: record of another boot/)
  })

  test('boots from a UKAI image over NBD and runs its disk workload without errors', async (t) => {
    const g = needGuest(t)
    if (g === undefined) return
    const node = await startNode('nbd')
    let vm: Qemu | undefined
    try {
      const { append, run: token } = guestCmdline({ mib: MIB, every: EVERY })
      vm = await Qemu.start({ kernel: g.kernel, initrd: g.initrd, append, disk: diskOf(node, 'nbd'), name: 'guest' })
      await vm.waitForSerial(/UKAI-GUEST ready/, BOOT_TIMEOUT)
      const readyAt = Date.now()
      t.diagnostic(`boot to ready: ${readyAt - vm.startedAt} ms`)
      await waitForRounds(vm, 150, 60_000)
      const log = parseGuestLog(vm.serial)
      t.diagnostic(`${log.lastWrote} rounds in ${Date.now() - readyAt} ms: ${(log.lastWrote / ((Date.now() - readyAt) / 1000)).toFixed(1)} rounds/s`)
      assert.equal(log.run, token)
      await checkDisk(t, vm, node, 'nbd', () => vm!.serial, token)
      await waitForRounds(vm, log.lastWrote + 2 * EVERY, 30_000)
      assertClean(parseGuestLog(vm.serial), 'guest')
      await vm.quit()
    } finally {
      await vm?.stop()
      await node.destroy()
    }
  })

  test('the checks see disk errors: when the node stops under the guest, the kernel reports I/O errors, the workload error lines, and the VM keeps running', async (t) => {
    const g = needGuest(t)
    if (g === undefined) return
    const node = await startNode('nbd')
    let vm: Qemu | undefined
    try {
      const { append } = guestCmdline({ mib: MIB, every: EVERY })
      vm = await Qemu.start({ kernel: g.kernel, initrd: g.initrd, append, disk: diskOf(node, 'nbd'), name: 'guest' })
      await vm.waitForSerial(/UKAI-GUEST ready/, BOOT_TIMEOUT)
      await waitForRounds(vm, 20, 60_000)
      const from = vm.serial.length
      await node.stop('SIGTERM')
      await vm.waitForSerial(/UKAI-GUEST error [^\n]*/, 30_000, from)
      await vm.waitForSerial(IO_ERROR_RE, 30_000, from)
      const log = parseGuestLog(vm.serial.slice(from))
      t.diagnostic(`after the node stopped: ${log.errors.length} guest error lines, ${log.ioErrors.length} kernel I/O error lines, e.g. ${JSON.stringify(log.ioErrors[0])} / ${JSON.stringify(log.errors[0])}`)
      // werror=report, rerror=report: errors go to the guest, the VM is not paused.
      assert.deepEqual(await vm.status(), { status: 'running', singlestep: false, running: true })
      await vm.quit()
    } finally {
      await vm?.stop()
      await node.destroy()
    }
  })

  for (const kind of ['nbd', 'fuse'] as const) {
    const where = kind === 'nbd' ? 'the NBD export' : 'the FUSE mount'

    test(`live migration on one node through ${where}, the destination attaching the image after the source quits`, async (t) => {
      const g = needGuest(t)
      if (g === undefined) return
      const node = await startNode(kind)
      const vms: Qemu[] = []
      try {
        const disk = diskOf(node, kind)
        const { append, run: token } = guestCmdline({ mib: MIB, every: EVERY })
        const src = await Qemu.start({ kernel: g.kernel, initrd: g.initrd, append, disk, name: 'source' })
        vms.push(src)
        const dest = await Qemu.start({
          kernel: g.kernel, initrd: g.initrd, append, disk: { placeholder: { sizeBytes: IMAGE_SIZE } }, name: 'destination', incoming: { port: await freePort() }, startPaused: true
        })
        vms.push(dest)
        await migrateAndCheck(t, {
          src,
          dest,
          node,
          kind,
          token,
          handover: async () => {
            await src.quit()
            await dest.attachDisk(disk)
          }
        })
      } finally {
        for (const vm of vms.reverse()) await vm.stop()
        await node.destroy()
      }
    })
  }
})

interface MigrationCase {
  src: Qemu
  dest: Qemu
  node: TestNode
  kind: Kind
  token: string
  /** Runs between the end of the migration and resuming the destination (started paused). */
  handover: () => Promise<void>
}

async function migrateAndCheck (t: TestContext, c: MigrationCase): Promise<void> {
  const { src, dest } = c
  await src.waitForSerial(/UKAI-GUEST ready/, BOOT_TIMEOUT)
  t.diagnostic(`source boot to ready: ${Date.now() - src.startedAt} ms`)
  // Migrate in the middle of the workload.
  await waitForRounds(src, 40, 60_000)
  const m: MigrationResult = await src.migrateTo(dest)
  t.diagnostic(`migration: total ${m.totalTimeMs} ms, downtime ${m.downtimeMs} ms (QEMU), setup ${String(m.setupTimeMs)} ms, ${((m.ramTransferredBytes ?? 0) / 2 ** 20).toFixed(1)} MiB of RAM sent`)
  assert.equal(m.status, 'completed')
  const t0 = Date.now()
  await c.handover()
  await dest.resume()
  t.diagnostic(`handover (source quit, destination attached, resumed): ${Date.now() - t0} ms`)
  assert.equal((await dest.status()).running, true)
  await sleep(200)
  const before = parseGuestLog(src.serial)
  assertClean(before, 'source')
  // The guest goes on where it was: no second boot, new rounds with the sequence continuing.
  await waitForRounds(dest, before.lastWrote + 3 * EVERY, 30_000)
  const after = parseGuestLog(dest.serial)
  assert.equal(after.ready, false, 'the guest did not boot again on the destination')
  const firstOnDest = Math.min(...[...after.wrote.values()])
  assert.ok(firstOnDest <= before.lastWrote + 3, `the first round on the destination (${firstOnDest}) follows the last on the source (${before.lastWrote})`)
  assert.ok(after.lastWrote > before.lastWrote + 2 * EVERY)
  // Every record written on either side is on the disk, as the guest last wrote it.
  await checkDisk(t, dest, c.node, c.kind, () => src.serial + dest.serial, c.token)
  assertClean(parseGuestLog(dest.serial), 'destination')
  await dest.quit()
  if (src.running) await src.quit()
}
