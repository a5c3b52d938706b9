/**
 * Runs one shard of a target in a child process (worker.js, with its
 * watchdog), for the slice of targets whose cases may block the event loop
 * or exhaust memory: the test process must survive them. fuzz/run.mjs
 * does the same for every shard, with resumption.
 */
import { fork } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { FindingRecord, ShardResult } from './harness.js'
import type { ShardJob, WorkerMessage } from './worker.js'

export async function runShardInChild (target: { name: string, blockedMs?: number, heapMb?: number }, seed: number, cases: number, minimizeMs = 5000): Promise<ShardResult> {
  const dir = mkdtempSync(join(tmpdir(), 'ukai-fuzz-child-'))
  const hangFile = join(dir, 'hang.json')
  const started = Date.now()
  try {
    const findings: FindingRecord[] = []
    let result: ShardResult | undefined
    let progress = 0
    let tail = ''
    const exit = await new Promise<{ code: number | null, signal: string | null }>((resolve) => {
      const child = fork(fileURLToPath(new URL('./worker.js', import.meta.url)), [], {
        execArgv: ['--enable-source-maps', ...(target.heapMb !== undefined ? [`--max-old-space-size=${target.heapMb}`] : [])],
        env: { ...process.env, TMPDIR: dir },
        stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
        detached: true
      })
      const keep = (c: Buffer): void => { tail = (tail + c.toString()).slice(-4000) }
      child.stdout!.on('data', keep)
      child.stderr!.on('data', keep)
      child.on('message', (m: WorkerMessage) => {
        if (m.type === 'progress') progress = m.done
        if (m.type === 'finding') findings.push(m.finding)
        if (m.type === 'done') result = m.result as ShardResult
      })
      // A child that neither finishes nor is stopped by its watchdog: ended after two minutes.
      const limit = setTimeout(() => { try { process.kill(-child.pid!, 'SIGKILL') } catch { child.kill('SIGKILL') } }, 120_000)
      child.on('exit', (code, signal) => { clearTimeout(limit); resolve({ code, signal }) })
      const job: ShardJob = { kind: 'shard', target: target.name, seed, cases, skip: 0, hangFile, blockedMs: target.blockedMs ?? 30_000, minimizeMs, group: true }
      child.send(job)
    })
    if (result !== undefined) return result
    const hung = existsSync(hangFile) ? JSON.parse(readFileSync(hangFile, 'utf8')) as { index: number, blockedMs: number, label?: string, input?: string } : undefined
    const f: FindingRecord = hung !== undefined
      ? { target: target.name, kind: 'hang', signature: `hang | ${hung.label ?? ''}: the event loop was blocked`, message: `${hung.label ?? ''}: the event loop stayed blocked for ${Math.round(hung.blockedMs / 1000)} s (the watchdog killed the process)`, stack: tail, seed, path: String(hung.index), count: 1, input: hung.input ?? '(see the replay)' }
      : { target: target.name, kind: 'crash', signature: 'crash | the process died', message: `the process died (${exit.signal ?? `exit ${String(exit.code)}`}) at or after case ${progress}`, stack: tail, seed, path: String(progress), count: 1, input: '(see the replay)' }
    const unique = new Map(findings.map((x) => [x.signature, x]))
    return {
      target: target.name,
      seed,
      cases: hung !== undefined ? hung.index + 1 : progress,
      crashes: [...unique.values()].filter((x) => x.kind === 'crash').length + (f.kind === 'crash' ? 1 : 0),
      hangs: [...unique.values()].filter((x) => x.kind === 'hang').length + (f.kind === 'hang' ? 1 : 0),
      violations: [...unique.values()].filter((x) => x.kind === 'violation').length,
      findings: [...unique.values(), f],
      durationMs: Date.now() - started
    }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}
