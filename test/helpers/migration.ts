/**
 * Live migration of the test guest (guest.ts) between two QEMUs (qemu.ts),
 * measured: what QEMU reports (total time, downtime), how long UKAI's
 * takeover of the writer lease took on the destination's node (its log
 * line), and what the guest saw: the longest gap between consecutive
 * `UKAI-GUEST wrote` lines around the handover, from the arrival times of
 * the console lines on the host (source console before the switchover,
 * destination console after it). Nothing here asserts: the tests assert
 * what must hold, the figures are for diagnostics and benchmarks.
 */
import { setTimeout as sleep } from 'node:timers/promises'
import type { MigrationResult, Qemu, SerialLine } from './qemu.js'

/** The node's notice of a takeover (src/volume/volume.ts). */
export const TAKEOVER_RE = /image '([^']+)': took the writer lease over from node (\S+) \(generation (\d+) -> (\d+)\) in ([\d.]+) ms, (\d+) block\(s\) reconciled/

export interface Takeover {
  image: string
  /** The node the lease was taken from. */
  from: string
  generationBefore: number
  generationAfter: number
  /** From the lease request to the session ready to write (fencing and reconciliation included), ms. */
  ms: number
  reconciled: number
  line: string
}

/** The first takeover line for `image` in `text` (a node's output). */
export function parseTakeover (text: string, image?: string): Takeover | undefined {
  const g = new RegExp(TAKEOVER_RE.source, 'g')
  for (let m = g.exec(text); m !== null; m = g.exec(text)) {
    if (image !== undefined && m[1] !== image) continue
    return { image: m[1]!, from: m[2]!, generationBefore: Number(m[3]), generationAfter: Number(m[4]), ms: Number(m[5]), reconciled: Number(m[6]), line: m[0] }
  }
  return undefined
}

/** A `UKAI-GUEST wrote` line: the round, its sector, when it arrived, and on which QEMU. */
export interface WroteLine { seq: number, sector: number, at: number, on: 'source' | 'destination' }

function wroteLines (lines: SerialLine[], on: WroteLine['on']): WroteLine[] {
  const out: WroteLine[] = []
  for (const { at, line } of lines) {
    const m = /UKAI-GUEST wrote (\d+) (\d+)$/.exec(line)
    if (m !== null) out.push({ seq: Number(m[2]), sector: Number(m[1]), at, on })
  }
  return out
}

function median (xs: number[]): number | undefined {
  if (xs.length === 0) return undefined
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]
}

export interface MigrationFigures {
  /** QEMU's answer (status, total-time, downtime, setup-time, RAM sent). */
  qemu: MigrationResult
  /** QEMU's total-time, ms. */
  totalTimeMs: number
  /** QEMU's downtime (guest stopped), ms. */
  downtimeMs: number
  /** The destination node's takeover line; undefined when none was logged (in `takeoverWaitMs`). */
  takeover: Takeover | undefined
  /**
   * The guest-visible stall: the longest gap between consecutive `wrote`
   * lines (source lines before the switchover, destination lines after
   * it) from `windowBeforeMs` before the migrate command to the
   * `roundsAfter`-th round on the destination, ms.
   */
  stallMs: number | undefined
  /** The two lines that bound that gap. */
  stallBetween: [WroteLine, WroteLine] | undefined
  /** The gap across the switchover itself: the source's last `wrote` line to the destination's first, ms. */
  switchoverGapMs: number | undefined
  /** From the source's last `wrote` line to QEMU's completed (as polled on the host, every 20 ms), ms. */
  lastSourceToCompletedMs: number | undefined
  /** From QEMU's completed (as polled) to the destination's first `wrote` line, ms. */
  completedToFirstDestinationMs: number | undefined
  /** The median gap between `wrote` lines on the source before the migrate command (a normal round), ms. */
  typicalGapMs: number | undefined
  /** The source's last round and the destination's first. */
  lastSourceSeq: number | undefined
  firstDestinationSeq: number | undefined
  /** Date.now() at the migrate command, and when QEMU reported completed. */
  startedAt: number
  completedAt: number
  /** Length of the source's serial output once the migration completed (its console up to the handover). */
  sourceSerialEnd: number
  /** Length of the destination's serial output at the migrate command. */
  destinationSerialStart: number
}

export interface MeasureOptions {
  /** The output of the destination's node so far (TestNode.output): its takeover line is looked for there. */
  destinationNodeOutput?: () => string
  /** The image, to pick its takeover line. */
  image?: string
  /** Rounds the destination must log before the figures are taken (default 5). */
  roundsAfter?: number
  /** How far back before the migrate command the stall window reaches (default 2000 ms). */
  windowBeforeMs?: number
  /** For the migration, and for the destination's rounds after it (default 60 s). */
  timeoutMs?: number
  downtimeLimitMs?: number
  /** How long to wait for the takeover line once the destination writes (default 5 s). */
  takeoverWaitMs?: number
}

/**
 * Live-migrates `src` to `dest` (started with -incoming) while the guest
 * runs its workload, waits for `roundsAfter` rounds on the destination,
 * and returns the figures. Rejects when the migration fails or the
 * destination does not go on writing in time.
 */
export async function measureMigration (src: Qemu, dest: Qemu, opts: MeasureOptions = {}): Promise<MigrationFigures> {
  const timeoutMs = opts.timeoutMs ?? 60_000
  const roundsAfter = opts.roundsAfter ?? 5
  const windowBeforeMs = opts.windowBeforeMs ?? 2000
  const nodeOutputStart = opts.destinationNodeOutput?.().length ?? 0
  const destLinesStart = dest.serialLines.length
  const destinationSerialStart = dest.serial.length
  const startedAt = Date.now()
  const qemu = await src.migrateTo(dest, { timeoutMs, downtimeLimitMs: opts.downtimeLimitMs })
  const completedAt = Date.now()
  // The source is stopped now (postmigrate): what it printed is in the pipe or on its way.
  await sleep(100)
  const sourceSerialEnd = src.serial.length
  const sourceLines = src.serialLines.slice()

  const deadline = Date.now() + timeoutMs
  let after: WroteLine[] = []
  for (;;) {
    after = wroteLines(dest.serialLines.slice(destLinesStart), 'destination')
    if (after.length >= roundsAfter) break
    if (!dest.running) throw new Error(`${dest.name}: QEMU exited after the migration (${String(dest.exitCode ?? dest.exitSignal)}):\n${dest.stderr}`)
    if (Date.now() > deadline) throw new Error(`${dest.name}: ${after.length} of ${roundsAfter} rounds in ${timeoutMs} ms after the migration; last output:\n${dest.serial.slice(-2000)}`)
    await sleep(50)
  }
  after = after.slice(0, roundsAfter)

  let takeover: Takeover | undefined
  if (opts.destinationNodeOutput !== undefined) {
    const until = Date.now() + (opts.takeoverWaitMs ?? 5000)
    for (;;) {
      takeover = parseTakeover(opts.destinationNodeOutput().slice(nodeOutputStart), opts.image)
      if (takeover !== undefined || Date.now() > until) break
      await sleep(50)
    }
  }

  const all = wroteLines(sourceLines, 'source')
  const beforeStart = all.filter((w) => w.at < startedAt)
  const typicalGapMs = median(beforeStart.slice(1).map((w, i) => w.at - beforeStart[i]!.at))
  const window = [...all.filter((w) => w.at >= startedAt - windowBeforeMs), ...after]
  let stallMs: number | undefined
  let stallBetween: [WroteLine, WroteLine] | undefined
  for (let i = 1; i < window.length; i++) {
    const gap = window[i]!.at - window[i - 1]!.at
    if (stallMs === undefined || gap > stallMs) { stallMs = gap; stallBetween = [window[i - 1]!, window[i]!] }
  }
  const lastSource = all[all.length - 1]
  const firstDest = after[0]
  return {
    qemu,
    totalTimeMs: qemu.totalTimeMs,
    downtimeMs: qemu.downtimeMs,
    takeover,
    stallMs,
    stallBetween,
    switchoverGapMs: lastSource !== undefined && firstDest !== undefined ? firstDest.at - lastSource.at : undefined,
    lastSourceToCompletedMs: lastSource === undefined ? undefined : completedAt - lastSource.at,
    completedToFirstDestinationMs: firstDest === undefined ? undefined : firstDest.at - completedAt,
    typicalGapMs,
    lastSourceSeq: lastSource?.seq,
    firstDestinationSeq: firstDest?.seq,
    startedAt,
    completedAt,
    sourceSerialEnd,
    destinationSerialStart
  }
}

/** One line for t.diagnostic / a benchmark report. */
export function describeFigures (f: MigrationFigures): string {
  const ms = (x: number | undefined, digits = 0): string => x === undefined || Number.isNaN(x) ? '-' : `${x.toFixed(digits)} ms`
  const t = f.takeover
  return [
    `QEMU: total ${ms(f.totalTimeMs)}, downtime ${ms(f.downtimeMs)}, setup ${ms(f.qemu.setupTimeMs)}, ${((f.qemu.ramTransferredBytes ?? 0) / 2 ** 20).toFixed(1)} MiB of RAM sent`,
    t === undefined ? 'UKAI takeover: no log line' : `UKAI takeover: ${ms(t.ms, 1)} (generation ${t.generationBefore} -> ${t.generationAfter}, ${t.reconciled} block(s) reconciled)`,
    `guest: longest gap between rounds ${ms(f.stallMs)}` +
      (f.stallBetween === undefined ? '' : ` (seq ${f.stallBetween[0].seq} on the ${f.stallBetween[0].on} -> seq ${f.stallBetween[1].seq} on the ${f.stallBetween[1].on})`) +
      `, across the switchover ${ms(f.switchoverGapMs)} (seq ${String(f.lastSourceSeq)} -> ${String(f.firstDestinationSeq)}: ` +
      `${ms(f.lastSourceToCompletedMs)} to QEMU's completed, ${ms(f.completedToFirstDestinationMs)} from it to the first round on the destination), a normal round ${ms(f.typicalGapMs)}`
  ].join('; ')
}
