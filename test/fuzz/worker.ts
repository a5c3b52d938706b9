/**
 * One fuzzing process, started by fuzz/run.mjs with an IPC channel: runs
 * one shard of one target (or replays one input) and reports progress and
 * findings as messages. A watchdog thread kills the process, after
 * writing down the case it was on, when the event loop stays blocked (a
 * synchronous infinite loop cannot be timed out from inside).
 */
import { writeFileSync } from 'node:fs'
import { Worker } from 'node:worker_threads'
import { replay, runShard, signatureOf, stackOf, type FindingRecord } from './harness.js'
import { targets } from './targets/index.js'

export interface ShardJob {
  kind: 'shard'
  target: string
  seed: number
  cases: number
  /** Cases already run (or given up on) by an earlier process of this shard. */
  skip: number
  /** Where the watchdog writes the case it found stuck. */
  hangFile: string
  /** Event loop blocked this long: a hang. */
  blockedMs: number
  minimizeMs: number
  /** This process leads its own process group: the watchdog ends the group (children included). */
  group?: boolean
}

export interface ReplayJob {
  kind: 'replay'
  target: string
  seed: number
  path: string
  shrink: boolean
  hangFile: string
  blockedMs: number
  group?: boolean
}

export type WorkerMessage =
  /** Cases of the shard done so far (skipped ones included): the next case to run is `done`. */
  | { type: 'progress', done: number, counts: { cases: number, crashes: number, hangs: number, violations: number } }
  | { type: 'finding', finding: FindingRecord }
  | { type: 'done', result: unknown }
  | { type: 'replayed', input: string, path: string, finding: { kind: string, signature: string, message: string, stack: string } | undefined }

const send = (m: WorkerMessage): void => { process.send?.(m) }

/**
 * The watchdog: the main thread bumps a heartbeat from a timer; a blocked
 * loop stops bumping it. Counted in the process's CPU time, so a machine
 * loaded by others makes no false hangs.
 */
function watchdog (job: { hangFile: string, blockedMs: number, group?: boolean }): { beat: Int32Array, progress: Int32Array, label: Uint8Array, stop: () => void } {
  const shared = new SharedArrayBuffer(8 + 4096)
  const beat = new Int32Array(shared, 0, 1)
  const progress = new Int32Array(shared, 4, 1)
  const label = new Uint8Array(shared, 8, 4096)
  const w = new Worker(`
    const { workerData } = require('node:worker_threads')
    const { writeFileSync } = require('node:fs')
    const beat = new Int32Array(workerData.shared, 0, 1)
    const progress = new Int32Array(workerData.shared, 4, 1)
    const label = new Uint8Array(workerData.shared, 8, 4096)
    let last = Atomics.load(beat, 0)
    let since = Date.now()
    const cpu = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1000 }
    let cpuSince = cpu()
    setInterval(() => {
      const now = Atomics.load(beat, 0)
      if (now !== last) { last = now; since = Date.now(); cpuSince = cpu(); return }
      // Blocked: the process spent blockedMs of CPU time (a loaded machine only slows it down) without a heartbeat,
      // or ten times that in wall time (blocked in a system call).
      const wall = Date.now() - since
      if ((wall > workerData.blockedMs && cpu() - cpuSince > workerData.blockedMs) || wall > 10 * workerData.blockedMs) {
        // The label, NUL, the input (isolated targets), NUL.
        const copy = Buffer.from(label)
        const a = copy.indexOf(0)
        const b = a < 0 ? -1 : copy.indexOf(0, a + 1)
        const text = copy.subarray(0, a < 0 ? copy.length : a).toString('utf8')
        const input = a < 0 ? '' : copy.subarray(a + 1, b < 0 ? copy.length : b).toString('utf8')
        writeFileSync(workerData.hangFile, JSON.stringify({ index: Atomics.load(progress, 0), blockedMs: wall, cpuMs: Math.round(cpu() - cpuSince), label: text, input }))
        process.kill(workerData.group ? -process.pid : process.pid, 'SIGKILL')
      }
    }, 250)
  `, { eval: true, workerData: { shared, hangFile: job.hangFile, blockedMs: job.blockedMs, group: job.group === true } })
  w.unref()
  const timer = setInterval(() => { Atomics.add(beat, 0, 1) }, 100)
  timer.unref()
  return { beat, progress, label, stop: () => { clearInterval(timer); void w.terminate() } }
}

async function main (job: ShardJob | ReplayJob): Promise<void> {
  const target = targets.find((t) => t.name === job.target)
  if (target === undefined) throw new Error(`no fuzz target '${job.target}'`)
  if (job.kind === 'replay') {
    const wd = watchdog(job)
    const r = await replay(target, job.seed, job.path, job.shrink).finally(() => wd.stop())
    const f = r.finding
    send({ type: 'replayed', input: r.input, path: r.path, finding: f === undefined ? undefined : { kind: f.kind, signature: signatureOf(f), message: f.message, stack: stackOf(f) } })
    return
  }
  const wd = watchdog(job)
  try {
    const result = await runShard(target, {
      seed: job.seed,
      cases: job.cases,
      skip: job.skip,
      minimizeMs: job.minimizeMs,
      progress: wd.progress,
      label: wd.label,
      onProgress: (done, counts) => send({ type: 'progress', done, counts }),
      onFinding: (finding) => send({ type: 'finding', finding })
    })
    send({ type: 'done', result })
  } finally {
    wd.stop()
  }
}

// The parent gone: nothing left to report to.
process.on('disconnect', () => process.exit(0))
process.once('message', (job: ShardJob | ReplayJob) => {
  main(job).then(() => {
    process.disconnect?.()
    // Targets close what they open; anything left (a stuck socket) must not keep the process.
    setTimeout(() => process.exit(0), 2000).unref()
  }, (err: unknown) => {
    writeFileSync(2, `fuzz worker: ${(err as Error)?.stack ?? String(err)}\n`)
    process.exit(70)
  })
})
