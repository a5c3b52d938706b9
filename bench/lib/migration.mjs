/**
 * Live migration's added pause: the test guest (dist/test/helpers/guest.js:
 * a Debian kernel and a busybox initramfs under QEMU TCG, writing and
 * verifying 4 KiB records with O_DIRECT) migrates while it writes, and the
 * figures are what the guest saw and what QEMU and UKAI report.
 *
 * - UKAI: two nodes on an etcd started for the phase, the image (64 MiB,
 *   1 MiB blocks) on both, both its hypervisors; each QEMU on its own
 *   node's NBD export; the guest goes A -> B -> A ... (`rounds`
 *   migrations). Every migration makes the destination's first write take
 *   the writer lease over (fencing the source).
 * - The peer: the same guest and migrations with both QEMUs on one
 *   `qemu-nbd --shared=2` export of a raw file (what users run for shared
 *   storage without UKAI, in its best configuration here: one local file,
 *   no lease, no fencing).
 *
 * The two alternate (`pairs` times: a UKAI guest migrated twice, then a
 * qemu-nbd guest migrated twice), so drift on a shared machine hits both.
 * Per migration: the guest-visible stall (the longest gap between two
 * consecutive rounds of the guest around the handover, from the arrival
 * times of its console lines), QEMU's downtime and total time, and UKAI's
 * takeover (from the destination node's log line). Reported as medians,
 * and the stall as a ratio to the peer's.
 */
import { existsSync, readFileSync } from 'node:fs'
import { mkdir, truncate, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { Daemon } from './proc.mjs'
import { median } from './stats.mjs'
import { freePort } from './ukai.mjs'

const MIB = 2 ** 20

/**
 * @param {{ dist: string, tmp: string, rawDir: string, a: import('./ukai.mjs').UkaiNode, b: import('./ukai.mjs').UkaiNode, pairs: number, log: (s: string) => void }} o
 * `a` and `b` run on etcd already.
 */
export async function migrationPause (o) {
  const imp = async (f) => await import(pathToFileURL(join(o.dist, 'test', 'helpers', f)).href)
  const { buildGuest, guestAvailable, guestCmdline } = await imp('guest.js')
  const { Qemu } = await imp('qemu.js')
  const { measureMigration } = await imp('migration.js')
  const { waitForRounds } = await imp('guest-console.js')
  const avail = guestAvailable()
  if (!avail.ok) return { error: `no guest: ${avail.reason}` }
  const guest = buildGuest()

  /**
   * Boots the guest on `disks[0]`, then migrates it to `disks[1]`,
   * `disks[0]`, ... `rounds` times. `nodeLog(i)` is the output of the node
   * behind disks[i] (for its takeover line).
   */
  const run = async (label, disks, nodeLog, rounds = 2) => {
    const figures = []
    const { append } = guestCmdline({ mib: 8, every: 10 })
    let src = await Qemu.start({ kernel: guest.kernel, initrd: guest.initrd, append, disk: disks[0], name: `${label} 0` })
    try {
      await src.waitForSerial(/UKAI-GUEST ready/, 120_000)
      await waitForRounds(src, 20, 60_000)
      for (let i = 1; i <= rounds; i++) {
        const to = i % 2
        const dest = await Qemu.start({ kernel: guest.kernel, initrd: guest.initrd, append, disk: disks[to], name: `${label} ${i}`, incoming: { port: await freePort() } })
        try {
          const f = await measureMigration(src, dest, { destinationNodeOutput: nodeLog === undefined ? undefined : () => nodeLog(to), image: 'mig', roundsAfter: 10 })
          figures.push({
            stallMs: f.stallMs,
            switchoverGapMs: f.switchoverGapMs,
            typicalGapMs: f.typicalGapMs,
            downtimeMs: f.downtimeMs,
            totalTimeMs: f.totalTimeMs,
            takeoverMs: f.takeover?.ms,
            reconciled: f.takeover?.reconciled
          })
          o.log(`  ${label} migration ${i}: guest stall ${f.stallMs?.toFixed(0)} ms (a round ${f.typicalGapMs?.toFixed(0)} ms), QEMU downtime ${f.downtimeMs} ms, total ${f.totalTimeMs} ms` +
            (f.takeover !== undefined ? `, UKAI takeover ${f.takeover.ms.toFixed(1)} ms` : ''))
        } catch (err) {
          await dest.stop()
          throw err
        }
        await src.quit().catch(async () => await src.stop())
        src = dest
        // Some rounds on the new source before it migrates again.
        await waitForRounds(src, (figures.length + 2) * 20, 60_000)
      }
    } finally {
      await src.quit().catch(async () => await src.stop())
    }
    return figures
  }

  // UKAI: the image on both nodes, both its hypervisors. The peer: one
  // qemu-nbd, shared by both QEMUs.
  await o.a.api('POST', '/v1/images', { name: 'mig', size: 64 * MIB, block_size: MIB, locations: [o.a.id, o.b.id], hypervisors: [o.a.id, o.b.id] })
  const nodes = [o.a, o.b]
  const logOf = (i) => readFileSync(nodes[i].daemon.opts.log, 'utf8')
  const dir = join(o.tmp, 'migration-peer')
  await mkdir(dir, { recursive: true })
  const file = join(dir, 'mig.raw')
  await writeFile(file, '')
  await truncate(file, 64 * MIB)
  const sock = join(dir, 'qemu-nbd.sock')
  const qnbd = new Daemon('qemu-nbd (migration peer)', 'qemu-nbd', ['-k', sock, '--shared=2', '-x', 'mig', '-f', 'raw', '--cache=writeback', '--persistent', file], {
    log: join(o.rawDir, 'migration-qemu-nbd.log')
  })
  const ukai = []
  const peer = []
  try {
    await qnbd.start()
    for (let i = 0; i < 200 && !existsSync(sock); i++) await new Promise((resolve) => setTimeout(resolve, 50))
    for (let p = 0; p < o.pairs; p++) {
      ukai.push(...await run('UKAI', nodes.map((n) => ({ nbd: { socket: n.nbdSocket, export: 'mig' } })), logOf))
      peer.push(...await run('qemu-nbd', [{ nbd: { socket: sock, export: 'mig' } }, { nbd: { socket: sock, export: 'mig' } }]))
    }
  } finally {
    await qnbd.stop()
    // The last QEMU's connection closes after it quits: the image is destroyed once nobody has it open.
    for (let i = 0; ; i++) {
      try {
        await o.a.api('DELETE', '/v1/images/mig')
        break
      } catch (err) {
        if (!/UKAI_ERR_BUSY/.test(err.message) || i >= 100) { o.log(`  destroying mig: ${err.message}`); break }
        await new Promise((resolve) => setTimeout(resolve, 100))
      }
    }
  }

  const summary = (fs) => ({
    stallMs: median(fs.map((f) => f.stallMs).filter((x) => x !== undefined)),
    switchoverGapMs: median(fs.map((f) => f.switchoverGapMs).filter((x) => x !== undefined)),
    typicalGapMs: median(fs.map((f) => f.typicalGapMs).filter((x) => x !== undefined)),
    downtimeMs: median(fs.map((f) => f.downtimeMs)),
    totalTimeMs: median(fs.map((f) => f.totalTimeMs)),
    takeoverMs: median(fs.map((f) => f.takeoverMs).filter((x) => x !== undefined))
  })
  const r = { ukai, peer, ukaiSummary: summary(ukai), peerSummary: summary(peer) }
  o.log(`  migration: guest stall median ${r.ukaiSummary.stallMs?.toFixed(0)} ms on UKAI vs ${r.peerSummary.stallMs?.toFixed(0)} ms on qemu-nbd; UKAI takeover median ${r.ukaiSummary.takeoverMs?.toFixed(1)} ms`)
  return r
}
