/**
 * `npm run chaos`: a seeded, repeatable run of N cycles of faults (kill -9
 * and SIGSTOP of the writer's node, of replica nodes and of etcd, alone and
 * in combination) during random writes through NBD and FUSE, with a model
 * of every acknowledged write. After each cycle's recovery it checks that
 * every acknowledged write reads back, through NBD, from every node, and
 * that in-sync replicas are byte-identical on disk. Prints a table per
 * fault kind and writes chaos/results/latest.md.
 *
 * Not part of `npm test` (the file is not a *.test.ts). Entry: chaos/run.mjs.
 */
import { fork, spawnSync, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { appendFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { mkdtemp, open as openFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { dirname, join, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Cluster } from '../helpers/cluster.js'
import { etcdMissing } from '../helpers/etcd.js'
import type { TestNode } from '../helpers/node-process.js'
import { prng } from '../helpers/assertions.js'
import { NbdClient } from '../../src/peer/nbd-client.js'
import { ImageModel, describeMismatches, newCheckResult, parseLog, type CheckResult } from './model.js'
import { SECTOR } from './pattern.js'
import type { WriterOptions } from './writer.js'

const MiB = 2 ** 20
const BLOCK = MiB
const SIZE = 24 * MiB
/** Short timeouts, so a cycle is short: lease 3 s, a peer that does not answer in 1 s is skipped for 2 s. */
const NODE_CONFIG = { lease_ttl: 3, io_timeout: 1, retry_after: 2 }
/** The NBD writer's lanes pause this long after each write, or its 12 lanes starve the FUSE writer on the same node. */
const NBD_PACE_MS = Number(process.env.CHAOS_NBD_PACE_MS ?? 10)
/** Acknowledged writes each writer must make after a recovery before the check. */
const PROGRESS = 20

const here = dirname(fileURLToPath(import.meta.url))

// ---------------------------------------------------------------- options

export interface ChaosOptions {
  cycles: number
  seed: number
  /** Number of the first cycle (a cycle's faults depend only on the seed and its number). */
  from: number
  kinds: string[] | undefined
  /** The report (chaos/results/latest.md); undefined: none. */
  report: string | undefined
  /** Where node logs of a cycle with a defect are kept. */
  logsDir: string
  verbose: boolean
  /** Self-test of the checks: damages replicas on disk in the first cycle ('lost': every replica of a sector; 'differ': one replica). */
  inject: 'lost' | 'differ' | undefined
}

const USAGE = `usage: npm run chaos -- [--cycles N] [--seed S] [--from K] [--kinds K1,K2] [--report FILE | --no-report] [--verbose]
  --cycles N    cycles to run (default 100)
  --seed S      seed of the run (default: random, printed)
  --from K      number of the first cycle (default 1): replays cycles K.. of a seed
  --kinds LIST  only these fault kinds (comma-separated), of:
  --report FILE where the markdown report goes (default chaos/results/latest.md)
  --no-report   print the table only
  --verbose     print every step
  --inject-defect lost|differ   self-test: damage replicas on disk before the first check (the run must FAIL)
fault kinds:`

// ---------------------------------------------------------------- faults

type Target = 0 | 1 | 2 | 'etcd'
/** kill -9 or SIGSTOP of a target for `dur` ms; or `ukai sync` of both images run (in the background) through node `target`. */
interface Action { target: Target, op: 'kill' | 'stop' | 'sync', at: number, dur: number }
interface Fault { kind: string, actions: Action[] }

const ms = (r: () => number, lo: number, hi: number): number => Math.round(lo + r() * (hi - lo))
const pick = <T>(r: () => number, xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!

/** The fault kinds, each a generator of one cycle's actions. Node 0 writes both images; 1 and 2 hold replicas. */
const KINDS: Record<string, (r: () => number) => Action[]> = {
  'kill -9 writer node': (r) => [{ target: 0, op: 'kill', at: 0, dur: ms(r, 300, 3000) }],
  'kill -9 replica node': (r) => [{ target: pick(r, [1, 2] as const), op: 'kill', at: 0, dur: ms(r, 300, 4000) }],
  'SIGSTOP writer node < io_timeout': (r) => [{ target: 0, op: 'stop', at: 0, dur: ms(r, 100, 800) }],
  'SIGSTOP writer node > io_timeout': (r) => [{ target: 0, op: 'stop', at: 0, dur: ms(r, 1300, 5000) }],
  'SIGSTOP replica node < io_timeout': (r) => [{ target: pick(r, [1, 2] as const), op: 'stop', at: 0, dur: ms(r, 100, 800) }],
  'SIGSTOP replica node > io_timeout': (r) => [{ target: pick(r, [1, 2] as const), op: 'stop', at: 0, dur: ms(r, 1300, 5000) }],
  'kill -9 etcd': (r) => [{ target: 'etcd', op: 'kill', at: 0, dur: ms(r, 500, 5000) }],
  'SIGSTOP etcd': (r) => [{ target: 'etcd', op: 'stop', at: 0, dur: ms(r, 500, 5000) }],
  combination: (r) => {
    // Two or three faults of distinct targets, overlapping in time.
    const targets: Target[] = [0, 1, 2, 'etcd']
    const n = r() < 0.25 ? 3 : 2
    const chosen: Target[] = []
    while (chosen.length < n) {
      const t = pick(r, targets)
      if (!chosen.includes(t)) chosen.push(t)
    }
    return chosen.map((target) => {
      const op = r() < 0.5 ? 'kill' as const : 'stop' as const
      const long = r() < 0.6
      return { target, op, at: ms(r, 0, 1500), dur: op === 'stop' && !long ? ms(r, 100, 800) : ms(r, 1000, 4000) }
    })
  },
  'fault during resync': (r) => {
    // A replica node dies while the writes go on (its blocks go out of
    // sync), comes back, and `ukai sync` copies them while the writes go on;
    // during that copy a second fault.
    const x = pick(r, [1, 2] as const)
    const down = ms(r, 800, 2500)
    const syncAt = down + ms(r, 200, 900)
    const at = syncAt + ms(r, 0, 500)
    const actions: Action[] = [{ target: x, op: 'kill', at: 0, dur: down }, { target: x === 1 ? 2 : 1, op: 'sync', at: syncAt, dur: 0 }]
    const second = pick(r, ['kill writer', 'kill target', 'stop target', 'stop writer', 'stop etcd', 'kill etcd'] as const)
    if (second === 'kill writer') actions.push({ target: 0, op: 'kill', at, dur: ms(r, 300, 2000) })
    else if (second === 'kill target') actions.push({ target: x, op: 'kill', at, dur: ms(r, 300, 2000) })
    else if (second === 'stop target') actions.push({ target: x, op: 'stop', at, dur: ms(r, 200, 2500) })
    else if (second === 'stop writer') actions.push({ target: 0, op: 'stop', at, dur: ms(r, 200, 2500) })
    else if (second === 'stop etcd') actions.push({ target: 'etcd', op: 'stop', at, dur: ms(r, 300, 4000) })
    else actions.push({ target: 'etcd', op: 'kill', at, dur: ms(r, 300, 3000) })
    return actions
  }
}

function targetName (t: Target): string { return t === 'etcd' ? 'etcd' : t === 0 ? 'n0 (writer)' : `n${t} (replica)` }

function describeFault (f: Fault): string {
  return f.actions.map((a) => a.op === 'sync'
    ? `ukai sync through n${String(a.target)} at +${a.at} ms`
    : `${a.op === 'kill' ? 'kill -9' : 'SIGSTOP'} ${targetName(a.target)}${a.at > 0 ? ` at +${a.at} ms` : ''} for ${a.dur} ms`).join(' + ')
}

/**
 * A cycle's fault kind: every run of as many cycles as there are kinds has
 * each kind once, in an order drawn from the seed and that run's number.
 */
function kindOf (seed: number, cycle: number, kinds: string[]): string {
  const round = Math.floor((cycle - 1) / kinds.length)
  const r = prng((seed ^ Math.imul(round + 1, 0x85EBCA6B) ^ 0x5BD1E995) >>> 0)
  const order = [...kinds]
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1))
    ;[order[i], order[j]] = [order[j]!, order[i]!]
  }
  return order[(cycle - 1) % kinds.length]!
}

/** A cycle's random source: the seed and the cycle's number only. */
function cycleRandom (seed: number, cycle: number): () => number {
  return prng((seed ^ Math.imul(cycle, 0x9E3779B1)) >>> 0)
}

// ---------------------------------------------------------------- results

interface CycleResult {
  cycle: number
  kind: string
  fault: string
  acked: number
  failed: number
  /** Acknowledged and failed writes per image (writer). */
  perImage: Record<string, { acked: number, failed: number }>
  flushesFailed: number
  /** Acknowledged writes (distinct) with a sector that did not read back. */
  lost: number
  /** Sectors that read back wrong in any other way (changed after being settled, misplaced, torn, unexpected). */
  otherBad: number
  /** Blocks whose in-sync replicas differ (checkReplicas). */
  differ: number
  recoveryFailed: boolean
  /** Failed writes found to have landed (allowed). */
  landedFailed: number
  notes: string[]
  problems: string[]
  seconds: number
}

// ---------------------------------------------------------------- processes

class Writer {
  readonly name: string
  readonly opts: WriterOptions
  readonly proc: ChildProcess
  output = ''
  private nextId = 1
  private exited = false
  private readonly waiters = new Map<number, (stats: WriterStats) => void>()
  private statsWaiters: Array<(s: { stats: WriterStats, inflight: number }) => void> = []
  private logOffset = 0
  private logRest = ''

  constructor (name: string, opts: WriterOptions, onExit: (w: Writer, code: number | null) => void) {
    this.name = name
    this.opts = opts
    this.proc = fork(join(here, 'writer.js'), [JSON.stringify(opts)], {
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
      env: { ...process.env, UV_THREADPOOL_SIZE: '16' }
    })
    this.proc.stdout!.on('data', (c: Buffer) => { this.output += c.toString() })
    this.proc.stderr!.on('data', (c: Buffer) => { this.output += c.toString() })
    this.proc.on('message', (m: { ev: string, id?: number, stats?: WriterStats, inflight?: number }) => {
      if (m.ev === 'paused' && m.id !== undefined) {
        this.waiters.get(m.id)?.(m.stats!)
        this.waiters.delete(m.id)
      } else if (m.ev === 'stats') {
        const w = this.statsWaiters
        this.statsWaiters = []
        for (const f of w) f({ stats: m.stats!, inflight: m.inflight! })
      }
    })
    this.proc.once('exit', (code) => { this.exited = true; onExit(this, code) })
  }

  get pid (): number | undefined { return this.proc.pid }
  get alive (): boolean { return !this.exited }

  async stats (timeoutMs = 10_000): Promise<{ stats: WriterStats, inflight: number }> {
    const p = new Promise<{ stats: WriterStats, inflight: number }>((resolve) => this.statsWaiters.push(resolve))
    this.proc.send({ cmd: 'stats' })
    return await withTimeout(p, timeoutMs, `${this.name}: no stats`)
  }

  /** Asks it to finish what is in flight and stop; resolves once nothing is in flight. */
  async pause (timeoutMs: number): Promise<WriterStats> {
    const id = this.nextId++
    const p = new Promise<WriterStats>((resolve) => this.waiters.set(id, resolve))
    this.proc.send({ cmd: 'pause', id })
    return await withTimeout(p, timeoutMs, `${this.name}: writes still in flight after ${timeoutMs} ms`)
  }

  resume (): void { if (this.alive) this.proc.send({ cmd: 'resume' }) }

  /** The log lines written since the last call. */
  async newEvents (): Promise<ReturnType<typeof parseLog>> {
    const fh = await openFile(this.opts.log, 'r')
    try {
      const { size } = await fh.stat()
      const buf = Buffer.alloc(size - this.logOffset)
      if (buf.length > 0) await fh.read(buf, 0, buf.length, this.logOffset)
      this.logOffset = size
      const text = this.logRest + buf.toString()
      const cut = text.lastIndexOf('\n') + 1
      this.logRest = text.slice(cut)
      return parseLog(text.slice(0, cut))
    } finally { await fh.close() }
  }

  async end (): Promise<void> {
    if (!this.alive) return
    const exited = once(this.proc, 'exit')
    this.proc.send({ cmd: 'exit' })
    const t = setTimeout(() => { if (this.alive) process.kill(this.pid!, 'SIGKILL') }, 3000)
    await exited
    clearTimeout(t)
  }
}

interface WriterStats { acked: number, failed: number, flushes: number, flushesFailed: number, connects: number, errors: Record<string, number> }

async function withTimeout<T> (p: Promise<T>, timeoutMs: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([p, new Promise<T>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(message)), timeoutMs) })])
  } finally { clearTimeout(timer) }
}

/** Exit codes of the `ukai` command (README); anything else is a crash. */
const CLI_EXIT_CODES = new Set([0, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13])

/** A failed command's message: its last line, or for a crash (an exit code the CLI does not define) the error and where it was thrown. */
function cliError (code: number, stderr: string): string {
  const lines = stderr.trim().split('\n').filter((l) => l.trim() !== '')
  if (CLI_EXIT_CODES.has(code)) return (lines[lines.length - 1] ?? '').slice(0, 300)
  const err = lines.findIndex((l) => /^\w*Error\b|^\s*\w+Error:|Uncaught|UKAI_ERR/.test(l))
  const from = err < 0 ? 0 : err
  return `CLI CRASHED: ${lines.slice(from, from + 4).map((l) => l.trim()).join(' | ').slice(0, 600)}`
}

const sleep = async (t: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, t))

// ---------------------------------------------------------------- the run

class Chaos {
  readonly opts: ChaosOptions
  cluster: Cluster | undefined
  work = ''
  writers: Writer[] = []
  models = new Map<string, ImageModel>()
  /** PIDs this run stopped with SIGSTOP and has not resumed. */
  readonly stopped = new Set<number>()
  /** Nodes (indexes) this run killed and has not relaunched; etcd too. */
  readonly down = new Set<Target>()
  /** Node log files and how much of each node's current output is in them. */
  private readonly logFiles: string[] = []
  private readonly logged: number[] = []
  results: CycleResult[] = []
  fatal: string | undefined
  interrupted = false
  private cleaning: Promise<void> | undefined
  readonly started = Date.now()

  constructor (opts: ChaosOptions) { this.opts = opts }

  say (s: string): void { process.stdout.write(`${s}\n`) }
  debug (s: string): void { if (this.opts.verbose) this.say(`  ${new Date().toISOString().slice(11, 23)} ${s}`) }

  get nodes (): TestNode[] { return this.cluster!.nodes }

  // ---- logs

  /** Appends what node `i` printed since the last call to its log file. */
  drainLog (i: number): void {
    const n = this.nodes[i]!
    const text = n.output.slice(this.logged[i]!)
    if (text.length > 0) appendFileSync(this.logFiles[i]!, text)
    this.logged[i] = n.output.length
  }

  markLogs (line: string): void {
    for (let i = 0; i < this.nodes.length; i++) {
      this.drainLog(i)
      appendFileSync(this.logFiles[i]!, `\n===== chaos: ${line} =====\n`)
    }
  }

  logSizes (): number[] {
    return this.logFiles.map((f) => { try { return readFileSync(f).length } catch { return 0 } })
  }

  // ---- setup

  async setup (): Promise<void> {
    this.work = await mkdtemp(join(tmpdir(), 'ukai-chaos-'))
    this.debug(`work directory ${this.work}`)
    this.cluster = await Cluster.start({ nodes: 3, mount: [0], nbd: [0, 1, 2], etcd: true, config: NODE_CONFIG })
    for (let i = 0; i < 3; i++) {
      this.logFiles.push(join(this.work, `n${i}.log`))
      this.logged.push(0)
    }
    const [n0, n1, n2] = this.nodes as [TestNode, TestNode, TestNode]
    // vn (NBD): blocks 0-7 on n0,n1; 8-15 on n1,n2 (remote to the writer); 16-23 on all three.
    await this.cli(n0, 'image', 'create', 'vn', '-s', String(SIZE), '-b', String(BLOCK), '-l', n0.id, '-l', n1.id)
    await this.cli(n0, 'image', 'add-location', 'vn', n2.id, '-s', '8', '-e', '23')
    await this.cli(n0, 'sync', 'vn')
    await this.cli(n0, 'image', 'remove-location', 'vn', n0.id, '-s', '8', '-e', '15')
    // vf (FUSE): blocks 0-7 on n0,n2; 8-15 on all three; 16-23 on n1,n2 (remote).
    await this.cli(n0, 'image', 'create', 'vf', '-s', String(SIZE), '-b', String(BLOCK), '-l', n0.id, '-l', n2.id)
    await this.cli(n0, 'image', 'add-location', 'vf', n1.id, '-s', '8', '-e', '23')
    await this.cli(n0, 'sync', 'vf')
    await this.cli(n0, 'image', 'remove-location', 'vf', n0.id, '-s', '16', '-e', '23')
    this.models.set('vn', new ImageModel(1, SIZE))
    this.models.set('vf', new ImageModel(2, SIZE))
    const wr = prng(this.opts.seed)
    const seedOf = (): number => Math.floor(wr() * 2 ** 32)
    const lanes = (n: number): Array<[number, number]> => Array.from({ length: n }, (_, i) => [i * SIZE / n, (i + 1) * SIZE / n])
    const onExit = (w: Writer, code: number | null): void => {
      if (this.cleaning === undefined) this.fatal ??= `writer ${w.name} exited (${code ?? 'signal'}) during the run:\n${w.output}`
    }
    // NBD: 12 lanes of 2 MiB, each over a block boundary; all in flight on one connection.
    this.writers.push(new Writer('nbd→vn', {
      kind: 'nbd', image: 'vn', target: n0.nbdSocket!, stream: 1, seed: seedOf(), lanes: lanes(12),
      log: join(this.work, 'vn.log'), flushMs: 400, maxLength: 256 * 1024, paceMs: NBD_PACE_MS
    }, onExit))
    // FUSE: 8 lanes of 3 MiB on n0's mount, O_DIRECT.
    this.writers.push(new Writer('fuse→vf', {
      kind: 'fuse', image: 'vf', target: join(n0.mountpoint!, 'vf'), stream: 2, seed: seedOf(), lanes: lanes(8),
      log: join(this.work, 'vf.log'), flushMs: 400, maxLength: 256 * 1024, paceMs: 0
    }, onExit))
    await this.waitProgress(PROGRESS, 30_000)
  }

  async cli (n: TestNode, ...args: string[]): Promise<string> {
    const r = await n.cli(...args)
    if (r.code !== 0) throw new Error(`ukai ${args.join(' ')} on ${n.id}: exit ${r.code}: ${r.stderr}`)
    return r.stdout
  }

  /** Waits until every writer has `n` more acknowledged writes than now. */
  async waitProgress (n: number, timeoutMs: number): Promise<string | undefined> {
    const base = await Promise.all(this.writers.map(async (w) => (await w.stats()).stats.acked))
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const now = await Promise.all(this.writers.map(async (w) => await w.stats()))
      const behind = this.writers.filter((_, i) => now[i]!.stats.acked < base[i]! + n)
      if (behind.length === 0) return undefined
      if (this.fatal !== undefined) return this.fatal
      if (Date.now() > deadline) {
        return behind.map((w) => {
          const s = now[this.writers.indexOf(w)]!
          const errs = Object.entries(s.stats.errors).sort((a, b) => b[1] - a[1]).slice(0, 3).map(([m, c]) => `${c}× ${m}`).join('; ')
          return `${w.name} made ${s.stats.acked - base[this.writers.indexOf(w)]!} of ${n} writes in ${timeoutMs / 1000} s (${s.inflight} in flight; errors: ${errs})`
        }).join('; ')
      }
      await sleep(100)
    }
  }

  // ---- faults

  async launchNode (i: number, notes: string[], deadline: number): Promise<boolean> {
    const n = this.nodes[i]!
    for (let attempt = 1; ; attempt++) {
      this.drainLog(i)
      try {
        await n.launch()
        this.logged[i] = 0
        this.down.delete(i as Target)
        this.debug(`n${i} ready${attempt > 1 ? ` (attempt ${attempt})` : ''}`)
        if (attempt > 1) notes.push(`n${i} started at attempt ${attempt}`)
        return true
      } catch (err) {
        // launch() reset the output: keep what this attempt printed.
        this.logged[i] = 0
        this.drainLog(i)
        const why = String((err as Error).message).split('\n').filter((l) => l.trim() !== '').slice(0, 3).join(' | ')
        this.debug(`n${i} launch attempt ${attempt} failed: ${why}`)
        if (Date.now() > deadline) {
          notes.push(`n${i} did not start in time: ${why}`)
          return false
        }
        await sleep(this.down.has('etcd') || this.stopped.has(this.cluster!.etcd!.pid!) ? 300 : 1000)
      }
    }
  }

  async launchEtcd (notes: string[], deadline: number): Promise<boolean> {
    const etcd = this.cluster!.etcd!
    for (let attempt = 1; ; attempt++) {
      try {
        await etcd.launch()
        this.down.delete('etcd')
        this.debug('etcd serving')
        return true
      } catch (err) {
        await etcd.stop('SIGKILL').catch(() => {})
        if (Date.now() > deadline) {
          notes.push(`etcd did not start: ${String((err as Error).message).slice(0, 300)}`)
          return false
        }
        await sleep(500)
      }
    }
  }

  pidOf (t: Target): number | undefined {
    return t === 'etcd' ? this.cluster!.etcd!.pid : this.nodes[t]!.pid
  }

  async apply (a: Action): Promise<void> {
    if (a.op === 'stop') {
      const pid = this.pidOf(a.target)
      if (pid === undefined) return
      process.kill(pid, 'SIGSTOP')
      this.stopped.add(pid)
    } else if (a.target === 'etcd') {
      this.down.add('etcd')
      await this.cluster!.etcd!.stop('SIGKILL')
    } else {
      this.down.add(a.target)
      await this.nodes[a.target]!.stop('SIGKILL')
      this.drainLog(a.target)
    }
    this.debug(`${a.op === 'kill' ? 'killed' : 'stopped'} ${targetName(a.target)}`)
  }

  /** Runs a fault's timeline; resolves when everything it did is undone and every node is ready again. */
  async runFault (f: Fault, notes: string[]): Promise<boolean> {
    // Each action on its own clock; a fault of a target that is still
    // starting from an earlier one waits for that start (and then lasts its
    // full duration). The start of a killed node or etcd is not awaited by
    // the others: a SIGCONT of etcd must not wait for a node that needs etcd.
    const starting = new Map<Target, Promise<boolean>>()
    const t0 = Date.now()
    const deadline = (): number => Date.now() + 60_000
    const results = await Promise.all(f.actions.map(async (a) => {
      const wait = t0 + a.at - Date.now()
      if (wait > 0) await sleep(wait)
      if (a.op === 'sync') {
        this.backgroundSync(a.target as number, 'during the fault')
        return true
      }
      // Actions on one target are chained in time order.
      const prior = f.actions.filter((b) => b !== a && b.target === a.target && b.op !== 'sync' && b.at < a.at)
      while (prior.some((b) => !starting.has(b.target) && this.isFaulted(b.target))) await sleep(20)
      await starting.get(a.target)
      await this.apply(a)
      await sleep(a.dur)
      if (a.op === 'stop') {
        const pid = this.pidOf(a.target)
        if (pid !== undefined && this.stopped.delete(pid)) process.kill(pid, 'SIGCONT')
        this.debug(`resumed ${targetName(a.target)}`)
        return true
      }
      const p = a.target === 'etcd' ? this.launchEtcd(notes, deadline()) : this.launchNode(a.target, notes, deadline())
      starting.set(a.target, p)
      return await p
    }))
    return results.every((x) => x)
  }

  /** True while the run has the target killed or stopped. */
  isFaulted (t: Target): boolean {
    if (this.down.has(t)) return true
    const pid = this.pidOf(t)
    return pid !== undefined && this.stopped.has(pid)
  }

  /** `ukai sync` of both images through node `i`, running while the writes (and faults) go on; its outcome is a note. */
  backgroundSync (i: number, when: string): void {
    const n = this.nodes[i]!
    this.bgSyncs.push((async () => {
      const out: string[] = []
      for (const image of ['vn', 'vf']) {
        const t = Date.now()
        const res = await n.cli('sync', image)
        this.debug(`sync ${image} through n${i} ${when}: exit ${res.code} in ${Date.now() - t} ms`)
        if (res.code !== 0) {
          this.countSyncFailure(when, res.code, res.stderr)
          if (!CLI_EXIT_CODES.has(res.code)) out.push(`sync ${image} through n${i} ${when}: exit ${res.code}: ${cliError(res.code, res.stderr)}`)
        }
      }
      return out
    })())
  }

  bgSyncs: Array<Promise<string[]>> = []

  /** Nodes that exited without being killed by the run: noted, relaunched. */
  async reviveCrashed (notes: string[]): Promise<boolean> {
    let ok = true
    for (let i = 0; i < this.nodes.length; i++) {
      const n = this.nodes[i]!
      const p = n.proc
      if (p !== undefined && p.exitCode === null && p.signalCode === null) continue
      this.drainLog(i)
      notes.push(`n${i} exited on its own (${p?.exitCode ?? p?.signalCode ?? '?'}): ${n.output.trim().split('\n').slice(-3).join(' | ').slice(0, 400)}`)
      ok &&= await this.launchNode(i, notes, Date.now() + 60_000)
    }
    const etcd = this.cluster!.etcd!
    if (etcd.proc === undefined || etcd.proc.exitCode !== null || etcd.proc.signalCode !== null) {
      notes.push('etcd exited on its own')
      ok &&= await this.launchEtcd(notes, Date.now() + 60_000)
    }
    return ok
  }

  // ---- checks

  /** Runs `ukai sync` of the image until it succeeds (a node may be skipped for retry_after after a fault). */
  async sync (image: string, r: () => number, notes: string[]): Promise<boolean> {
    let last = ''
    for (let attempt = 1; attempt <= 8; attempt++) {
      const n = pick(r, this.nodes)
      const res = await n.cli('sync', image)
      if (res.code === 0) {
        this.syncStats.attempts[Math.min(attempt, 3) - 1]!++
        if (attempt > 2) notes.push(`sync ${image} succeeded at attempt ${attempt}`)
        return true
      }
      this.countSyncFailure('after the pause', res.code, res.stderr)
      last = `exit ${res.code} on ${this.nodeName(n.id)}: ${cliError(res.code, res.stderr)}`
      this.debug(`sync ${image} attempt ${attempt}: ${last}`)
      await sleep(1000)
    }
    this.syncStats.failed++
    notes.push(`sync ${image} failed 8 times, last: ${last}`)
    return false
  }

  /** The syncs run after the writers paused: how many succeeded at the first, second, third or later attempt, and failed 8 times. */
  readonly syncStats = { attempts: [0, 0, 0], failed: 0 }
  /** Failed syncs (expected while faults go on, and while nodes are skipped after them), by when, exit code and message. */
  readonly syncFailures = new Map<string, number>()

  countSyncFailure (when: string, code: number, stderr: string): void {
    const msg = cliError(code, stderr).replace(/127\.0\.0\.1:\d+/g, (m) => this.nodeName(m)).replace(/\d+/g, 'N')
    const key = `${when}: exit ${code}: ${msg}`
    this.syncFailures.set(key, (this.syncFailures.get(key) ?? 0) + 1)
    if (!CLI_EXIT_CODES.has(code)) this.crashes.push(`ukai sync ${when}: exit ${code}:\n${stderr}`)
  }

  /** Output of CLI commands that crashed (an exit code the CLI does not define). */
  readonly crashes: string[] = []

  /** Reads the whole image through NBD from node `i` and checks it against the model. */
  async readBack (image: string, i: number, result: CheckResult, notes: string[]): Promise<boolean> {
    const model = this.models.get(image)!
    let c: NbdClient
    try {
      c = await NbdClient.connect({ path: this.nodes[i]!.nbdSocket! }, image, { timeoutMs: 30_000 })
    } catch (err) {
      notes.push(`read ${image} through n${i}: cannot connect: ${(err as Error).message}`)
      return false
    }
    let ok = true
    try {
      if (!c.readOnly) notes.push(`the NBD reader of ${image} on n${i} was given a writable export: the writer's open is gone`)
      const buf = Buffer.alloc(BLOCK)
      for (let off = 0; off < SIZE; off += BLOCK) {
        let err: unknown
        // A node skips a location for retry_after (2 s) after it failed: a block may be unreadable that long.
        for (let attempt = 1; attempt <= 4; attempt++) {
          try {
            await c.read(off, buf)
            err = undefined
            if (attempt > 1) notes.push(`read ${image} block ${off / BLOCK} through n${i} succeeded at attempt ${attempt}`)
            break
          } catch (e) {
            err = e
            if (c.closed) break
            await sleep(1000)
          }
        }
        if (err !== undefined) {
          notes.push(`read ${image} block ${off / BLOCK} through n${i} failed: ${(err as Error).message}`)
          ok = false
          if (c.closed) break
          continue
        }
        model.check(buf, off, result)
      }
    } finally { await c.close().catch(() => {}) }
    return ok
  }

  /** Reads the image back through each of `nodes` in turn, checking it against the model (which the first read settles). */
  async readCheck (image: string, nodes: number[], when: string, tally: { lost: number, otherBad: number, landedFailed: number },
    notes: string[], problems: string[]): Promise<boolean> {
    const result = newCheckResult()
    const described = new Set<number>()
    let ok = true
    for (const i of nodes) {
      const before = result.mismatches.length
      if (!await this.readBack(image, i, result, notes)) ok = false
      if (result.mismatches.length > before) {
        problems.push(`${image} read through n${i} ${when}:`, ...describeMismatches(result.mismatches.slice(before)).map((l) => `  ${l}`))
        const model = this.models.get(image)!
        for (const m of result.mismatches.slice(before)) {
          for (const seq of [m.expected, ...m.candidates]) {
            if (seq === 0 || described.has(seq)) continue
            described.add(seq)
            problems.push(`  ${model.describeWrite(seq)}`)
          }
          if (described.size > 24) break
        }
      }
    }
    tally.lost += result.lostWrites.size
    tally.otherBad += result.mismatches.filter((m) => m.kind !== 'lost').length
    tally.landedFailed += result.landedFailed
    return ok
  }

  /** checkReplicas, and for each block that differs which replica holds what the model says. */
  async compareReplicas (image: string): Promise<string[]> {
    const cluster = this.cluster!
    const problems = await cluster.checkReplicas(image)
    if (problems.length === 0) return []
    const out = [...problems]
    const doc = await cluster.image(image)
    const model = this.models.get(image)!
    const blocks = new Set(problems.map((p) => Number(/^block (\d+)/.exec(p)?.[1] ?? -1)).filter((b) => b >= 0))
    for (const b of blocks) {
      for (const [loc, st] of Object.entries(doc.locations)) {
        if (!st.blocks.some(([s, e]) => b >= s && b < e)) continue
        const oos = st.out_of_sync.some(([s, e]) => b >= s && b < e)
        const node = cluster.nodeById(loc)
        if (node === undefined) continue
        const data = await cluster.blockOnDisk(node, image, b, BLOCK)
        const r = newCheckResult()
        model.check(data, b * BLOCK, r, false)
        const idx = this.nodes.indexOf(node)
        out.push(`  block ${b} on n${idx} (${oos ? 'out of sync' : 'in sync'}): ${r.mismatches.length === 0 ? 'matches the model' : describeMismatches(r.mismatches, 3).join('; ')}`)
      }
    }
    return out
  }

  /**
   * Self-test: overwrites with zeros one sector of vn that holds an
   * acknowledged write, on every replica of its block ('lost') or on one
   * ('differ'), behind the nodes' backs.
   */
  async injectDefect (kind: 'lost' | 'differ'): Promise<string> {
    const model = this.models.get('vn')!
    let sector = -1
    for (let s = (3 * BLOCK) / SECTOR; s < model.sectors; s++) if (model.expected[s] !== 0 && !model.candidates.has(s)) { sector = s; break }
    if (sector < 0) throw new Error('inject: no sector written yet')
    const b = Math.floor(sector * SECTOR / BLOCK)
    const doc = await this.cluster!.image('vn')
    const holders = Object.entries(doc.locations).filter(([, st]) => st.blocks.some(([s, e]) => b >= s && b < e)).map(([loc]) => this.cluster!.nodeById(loc)!)
    const victims = kind === 'lost' ? holders : holders.slice(-1)
    for (const n of victims) {
      const fh = await openFile(join(n.imageRoot, 'vn', String(b).padStart(16, '0')), 'r+')
      await fh.write(Buffer.alloc(SECTOR), 0, SECTOR, sector * SECTOR - b * BLOCK)
      await fh.close()
    }
    return `self-test: zeroed bytes ${sector * SECTOR}-${sector * SECTOR + SECTOR - 1} of vn (acknowledged write ${model.expected[sector]!}) on ${victims.map((n) => this.nodeName(n.id)).join(', ')}`
  }

  // ---- a cycle

  async cycle (cycle: number): Promise<CycleResult> {
    const r = cycleRandom(this.opts.seed, cycle)
    const kind = kindOf(this.opts.seed, cycle, this.opts.kinds ?? Object.keys(KINDS))
    const fault: Fault = { kind, actions: KINDS[kind]!(r) }
    const label = describeFault(fault)
    const start = Date.now()
    const notes: string[] = []
    const problems: string[] = []
    const logStart = this.logSizes()
    this.markLogs(`cycle ${cycle} (seed ${this.opts.seed}): ${label}`)
    this.debug(`cycle ${cycle}: ${label}`)
    let recovered = true

    // Writes run; the fault comes; everything is brought back.
    await sleep(ms(r, 400, 1500))
    if (!await this.runFault(fault, notes)) recovered = false
    if (!await this.reviveCrashed(notes)) recovered = false
    // Writes go on after the recovery (the writers reconnect by themselves),
    // and a sync copies what went out of sync while they do.
    this.backgroundSync(Math.floor(r() * 3), 'during the writes')
    const stuck = await this.waitProgress(PROGRESS, 45_000)
    if (stuck !== undefined) { notes.push(`no progress after recovery: ${stuck}`); recovered = false }
    const syncs = await withTimeout(Promise.all(this.bgSyncs), 120_000, 'a sync during the writes did not end in 120 s').catch((err: Error) => [[err.message]])
    this.bgSyncs = []
    const syncNotes = syncs.flat()
    if (syncNotes.length > 0) notes.push(...syncNotes)
    // Nothing in flight while checking.
    const paused = await Promise.all(this.writers.map(async (w) => await w.pause(60_000).catch((err: Error) => err)))
    for (const p of paused) if (p instanceof Error) { this.fatal ??= p.message }
    if (this.fatal !== undefined) throw new Error(this.fatal)

    let acked = 0
    let failed = 0
    const perImage: Record<string, { acked: number, failed: number }> = {}
    for (const w of this.writers) {
      const model = this.models.get(w.opts.image)!
      const c = perImage[w.opts.image] = { acked: 0, failed: 0 }
      for (const e of await w.newEvents()) {
        model.apply(e)
        if (e.kind === 'A') c.acked++
        else c.failed++
      }
      acked += c.acked
      failed += c.failed
    }
    const flushesFailed = (paused as WriterStats[]).reduce((n, s) => n + s.flushesFailed, 0) - this.flushesFailedBefore
    this.flushesFailedBefore += flushesFailed

    // Every acknowledged write reads back, from every node, before the
    // sync (from whatever replicas are in sync) ...
    const tally = { lost: 0, otherBad: 0, landedFailed: 0 }
    for (const image of ['vn', 'vf']) {
      const order = [0, 1, 2].sort(() => r() - 0.5)
      if (!await this.readCheck(image, order, 'before the sync', tally, notes, problems)) recovered = false
    }

    for (const image of ['vn', 'vf']) if (!await this.sync(image, r, notes)) recovered = false
    for (const image of ['vn', 'vf']) {
      const oos = await this.cluster!.outOfSync(image)
      const left = Object.entries(oos).filter(([, n]) => n > 0)
      if (left.length > 0) notes.push(`${image}: replicas out of sync after the sync: ${left.map(([l, n]) => `${this.nodeName(l)} ${n} block(s)`).join(', ')}`)
    }

    if (this.opts.inject !== undefined && cycle === this.opts.from) notes.push(await this.injectDefect(this.opts.inject))

    // ... and after it, from one node; then every in-sync replica on disk.
    let differ = 0
    for (const image of ['vn', 'vf']) {
      if (!await this.readCheck(image, [Math.floor(r() * 3)], 'after the sync', tally, notes, problems)) recovered = false
      const diff = await this.compareReplicas(image)
      // A block counts in the cycle it starts to differ; one that still does is noted.
      const now = new Set(diff.filter((l) => !l.startsWith(' ')).map((l) => `${image} ${l}`))
      const fresh = [...now].filter((l) => !this.differing.has(l))
      const still = now.size - fresh.length
      for (const l of this.differing) if (l.startsWith(`${image} `) && !now.has(l)) this.differing.delete(l)
      for (const l of now) this.differing.add(l)
      differ += fresh.length
      if (fresh.length > 0) problems.push(`${image}: in-sync replicas differ:`, ...diff.map((l) => `  ${l}`))
      if (still > 0) notes.push(`${image}: ${still} block replica(s) still differ since an earlier cycle`)
    }
    const { lost, otherBad, landedFailed } = tally

    for (const w of this.writers) w.resume()
    const res: CycleResult = {
      cycle, kind, fault: label, acked, failed, perImage, flushesFailed, lost, otherBad, differ, recoveryFailed: !recovered,
      landedFailed, notes, problems, seconds: (Date.now() - start) / 1000
    }
    if (lost > 0 || otherBad > 0 || differ > 0 || !recovered) this.keepLogs(res, logStart)
    return res
  }

  private flushesFailedBefore = 0
  /** checkReplicas problems seen at the last check ("image block N: ..."). */
  private readonly differing = new Set<string>()

  nodeName (loc: string): string {
    const i = this.nodes.findIndex((n) => n.id === loc)
    return i < 0 ? loc : `n${i}`
  }

  /** Copies what the nodes printed during a cycle with a defect next to the report. */
  keepLogs (res: CycleResult, from: number[]): void {
    for (let i = 0; i < this.nodes.length; i++) this.drainLog(i)
    const dir = join(this.opts.logsDir, `seed-${this.opts.seed}-cycle-${res.cycle}`)
    mkdirSync(dir, { recursive: true })
    for (let i = 0; i < this.logFiles.length; i++) {
      const all = readFileSync(this.logFiles[i]!)
      writeFileSync(join(dir, `n${i}.log`), all.subarray(from[i]!))
    }
    writeFileSync(join(dir, 'cycle.txt'), [
      `seed ${this.opts.seed} cycle ${res.cycle}: ${res.kind}: ${res.fault}`,
      `replay: npm run chaos -- --seed ${this.opts.seed} --from ${res.cycle} --cycles 1`,
      `nodes: ${this.nodes.map((n, i) => `n${i}=${n.id}`).join(' ')}`,
      '', 'notes:', ...res.notes, '', 'problems:', ...res.problems, ''
    ].join('\n'))
    res.notes.push(`node logs of this cycle: ${relative(process.cwd(), dir)}`)
  }

  // ---- whole run

  async run (): Promise<void> {
    await this.setup()
    const last = this.opts.from + this.opts.cycles - 1
    for (let c = this.opts.from; c <= last; c++) {
      if (this.interrupted) break
      let res: CycleResult
      try {
        res = await this.cycle(c)
      } catch (err) {
        this.fatal ??= `cycle ${c}: ${(err as Error).stack ?? String(err)}`
        break
      }
      this.results.push(res)
      const flag = res.lost > 0 || res.otherBad > 0 || res.differ > 0 ? '  <-- DEFECT' : res.recoveryFailed ? '  <-- RECOVERY FAILED' : ''
      const per = Object.entries(res.perImage).map(([im, x]) => `${im} ${x.acked}/${x.failed}`).join(' ')
      this.say(`cycle ${String(c).padStart(3)}/${last}  ${res.fault.padEnd(66)} acked/failed ${per.padEnd(24)} lost ${res.lost}  differ ${res.differ}  ${res.seconds.toFixed(1)} s${flag}`)
      for (const n of res.notes) this.say(`    note: ${n}`)
      for (const p of res.problems) this.say(`    ${p}`)
      // A cluster that cannot be brought back three times running is not worth more cycles.
      const tail = this.results.slice(-3)
      if (tail.length === 3 && tail.every((x) => x.recoveryFailed)) {
        this.fatal = `three recoveries in a row failed (cycles ${tail.map((x) => x.cycle).join(', ')}); stopping`
        break
      }
    }
  }

  /** What the writers counted over the whole run, once it is over. */
  writerStats: Array<{ name: string, stats: WriterStats }> = []

  async collectWriterStats (): Promise<void> {
    for (const w of this.writers) {
      if (!w.alive) continue
      try { this.writerStats.push({ name: w.name, stats: (await w.stats(5000)).stats }) } catch {}
    }
  }

  async cleanup (): Promise<void> {
    this.cleaning ??= (async () => {
      // Whatever is stopped runs again first, so it can be ended.
      for (const pid of this.stopped) { try { process.kill(pid, 'SIGCONT') } catch {} }
      this.stopped.clear()
      for (const w of this.writers) await w.end().catch(() => {})
      if (this.cluster !== undefined) {
        for (let i = 0; i < this.nodes.length; i++) { try { this.drainLog(i) } catch {} }
        await this.cluster.destroy().catch((err: Error) => this.say(`cleanup: ${err.message}`))
      }
      if (this.work !== '') await rm(this.work, { recursive: true, force: true })
    })()
    await this.cleaning
  }
}

// ---------------------------------------------------------------- report

interface Row { kind: string, cycles: number, acked: number, failed: number, lost: number, differ: number, recoveryFailed: number, otherBad: number, flushesFailed: number, landed: number }

function rows (results: CycleResult[], kinds: string[]): Row[] {
  const out: Row[] = []
  const add = (kind: string, rs: CycleResult[]): void => {
    out.push({
      kind,
      cycles: rs.length,
      acked: rs.reduce((n, x) => n + x.acked, 0),
      failed: rs.reduce((n, x) => n + x.failed, 0),
      lost: rs.reduce((n, x) => n + x.lost, 0),
      differ: rs.reduce((n, x) => n + x.differ, 0),
      recoveryFailed: rs.filter((x) => x.recoveryFailed).length,
      otherBad: rs.reduce((n, x) => n + x.otherBad, 0),
      flushesFailed: rs.reduce((n, x) => n + x.flushesFailed, 0),
      landed: rs.reduce((n, x) => n + x.landedFailed, 0)
    })
  }
  for (const k of kinds) {
    const rs = results.filter((x) => x.kind === k)
    if (rs.length > 0) add(k, rs)
  }
  add('**all**', results)
  return out
}

const HEADER = ['fault', 'cycles', 'acknowledged writes', 'failed writes (expected)', 'lost acknowledged writes', 'in-sync replicas that differ', 'recoveries that failed', 'other wrong reads', 'failed flushes']

function markdownTable (rs: Row[]): string {
  const lines = [`| ${HEADER.join(' | ')} |`, `| ${HEADER.map((_, i) => i === 0 ? '---' : '---:').join(' | ')} |`]
  for (const r of rs) lines.push(`| ${[r.kind, r.cycles, r.acked, r.failed, r.lost, r.differ, r.recoveryFailed, r.otherBad, r.flushesFailed].join(' | ')} |`)
  return lines.join('\n')
}

function textTable (rs: Row[]): string {
  const cells = [['fault', 'cycles', 'acked', 'failed', 'lost', 'differ', 'recov.failed', 'other', 'flush fail'],
    ...rs.map((r) => [r.kind.replace(/\*/g, ''), r.cycles, r.acked, r.failed, r.lost, r.differ, r.recoveryFailed, r.otherBad, r.flushesFailed].map(String))]
  const width = cells[0]!.map((_, i) => Math.max(...cells.map((c) => c[i]!.length)))
  return cells.map((c) => c.map((x, i) => i === 0 ? x.padEnd(width[i]!) : x.padStart(width[i]!)).join('  ')).join('\n')
}

function git (...args: string[]): string {
  const r = spawnSync('git', args, { encoding: 'utf8' })
  return r.status === 0 ? r.stdout.replace(/\s+$/, '') : ''
}

const METHOD = `A cluster of three \`ukai server\` processes on 127.0.0.1 on a real etcd
(one member), with short timeouts (\`lease_ttl\` 3 s, \`io_timeout\` 1 s,
\`retry_after\` 2 s). Node n0 writes two images of 24 MiB in 1 MiB blocks:

- \`vn\`, through n0's NBD export: blocks 0-7 on n0, n1; 8-15 on n1, n2
  (remote to the writer); 16-23 on n0, n1, n2;
- \`vf\`, through n0's FUSE mount (\`O_DIRECT\`, so a write that returned is
  in the node, not in the kernel's page cache of the mount): blocks 0-7 on
  n0, n2; 8-15 on all three; 16-23 on n1, n2 (remote).

Each writer is a process of its own (so killing n0 does not lose the
model): the NBD writer has 12 writes in flight on one connection, the FUSE
writer 8, each in a region of its own (one write in flight per region, so
the order of a region's writes is known), of 512 B to 256 KiB at 512-byte
aligned offsets, with a flush (NBD flush, FUSE fsync) every 400 ms. Every
512-byte sector written carries its write's number, its own position and
a body derived from both, so what a sector holds can be read back without
the harness keeping data. A write counts as acknowledged when its reply
came back (FUSE: \`write()\` returned; of a short write, the part it
returned); it is logged to a file (A or F, offset, length). The FUSE
writer writes from page-aligned buffers, as QEMU does with \`O_DIRECT\`
(the kernel cuts a direct write into FUSE requests at the pages of the
caller's buffer). A failed write may have landed in whole, in part
or not at all: its sectors may hold it or what was there before, until a
later acknowledged write covers them. A writer never gives up on a request
(it waits for the reply or for the connection to die with the node) and
opens a new connection only when nothing is in flight on the old one.

Each cycle (its fault and timings depend only on the seed and the cycle's
number; every ten cycles have each of the ten fault kinds once): writes for
0.4-1.5 s; the fault (kill -9 or SIGSTOP of n0, of a
replica node n1/n2, or of etcd, for 0.1-5 s, SIGSTOPs shorter and longer
than \`io_timeout\`, or two or three of them on different targets,
overlapping; or a replica node killed and started again, then \`ukai sync\`
while the writes go on and, during the copy, a second fault: kill -9 or
SIGSTOP of the writer, of the node being synced, or of etcd); recovery
(SIGCONT, etcd and killed nodes started again on the same data, until
ready); the writers reconnect by themselves and must make ${PROGRESS} more
acknowledged writes each while a \`ukai sync\` runs beside them (a sync
that fails then is noted, not counted); then they pause (nothing in flight),
\`ukai sync\` runs for both images, and the check: both images are read
whole through NBD from every node and every sector must hold the last
acknowledged write over it (or one of the failed writes since); the first
read after a failure settles the sector, later reads must agree with it;
and \`Cluster.checkReplicas\` compares every block's in-sync replicas on
disk (must be empty). Then the writers resume, and the next cycle starts
on the same cluster and images.

Columns: *lost acknowledged writes*: acknowledged writes with a sector that
read back as something else (must be 0); *in-sync replicas that differ*:
blocks whose in-sync replicas are not byte-identical (must be 0);
*recoveries that failed*: cycles where a node or etcd could not be started
again, a writer made no progress within 45 s, \`ukai sync\` failed 8 times
or a block could not be read; *other wrong reads*: sectors that changed
after a check had settled them, or hold misplaced or torn data; *failed
writes* and *failed flushes* are expected during faults.`

function writeReport (chaos: Chaos, file: string): void {
  const o = chaos.opts
  const kinds = o.kinds ?? Object.keys(KINDS)
  const rs = rows(chaos.results, kinds)
  const total = rs[rs.length - 1]!
  const defects = chaos.results.filter((x) => x.lost > 0 || x.otherBad > 0 || x.differ > 0 || x.recoveryFailed)
  const dirty = git('status', '--porcelain', '--untracked-files=no').split('\n').filter((l) => l !== '').map((l) => l.slice(3))
  const secs = (Date.now() - chaos.started) / 1000
  const pass = chaos.fatal === undefined && total.lost === 0 && total.differ === 0 && total.recoveryFailed === 0 && total.otherBad === 0
  const lines = [
    '# Chaos run',
    '',
    `- result: **${pass ? 'PASS' : 'FAIL'}**${chaos.fatal !== undefined ? ` (the run stopped: ${chaos.fatal.split('\n')[0]!})` : ''}`,
    `- seed: ${o.seed}; cycles ${o.from}-${o.from + chaos.results.length - 1} (${chaos.results.length} of ${o.cycles} asked)`,
    `- replay: \`npm run chaos -- --seed ${o.seed} --cycles ${o.cycles}${o.from !== 1 ? ` --from ${o.from}` : ''}${o.kinds !== undefined ? ` --kinds '${o.kinds.join(',')}'` : ''}\``,
    `- commit: ${git('rev-parse', 'HEAD') || 'unknown'}${dirty.length > 0 ? ` with uncommitted changes in ${dirty.join(', ')}` : ''}`,
    `- date: ${new Date(chaos.started).toISOString()}`,
    `- duration: ${Math.floor(secs / 60)} min ${Math.round(secs % 60)} s`,
    `- host: ${process.platform}, Node.js ${process.version}, ${git('--version')}`,
    '',
    '## Results per fault kind',
    '',
    markdownTable(rs),
    '',
    `Failed writes found to have landed (allowed): ${total.landed} sector(s).`,
    ''
  ]
  lines.push('## Defects', '')
  if (defects.length === 0 && chaos.fatal === undefined) {
    lines.push('None: every acknowledged write read back from every node after every cycle, and in-sync replicas were byte-identical.', '')
  } else {
    if (chaos.fatal !== undefined) lines.push('The run stopped early:', '', '```', chaos.fatal.slice(0, 4000), '```', '')
    for (const d of defects) {
      lines.push(`### Cycle ${d.cycle}: ${d.kind}`, '',
        `- fault: ${d.fault}`,
        `- replay: \`npm run chaos -- --seed ${o.seed} --from ${d.cycle} --cycles 1\` (the same fault and timings on a fresh cluster; the interleaving with the writes differs)`,
        `- acknowledged ${d.acked}, failed ${d.failed}; lost acknowledged writes ${d.lost}, in-sync blocks that differ ${d.differ}, other wrong sectors ${d.otherBad}, recovery ${d.recoveryFailed ? 'FAILED' : 'ok'}`)
      for (const n of d.notes) lines.push(`- ${n}`)
      if (d.problems.length > 0) lines.push('', '```', ...d.problems.slice(0, 60), '```')
      lines.push('')
    }
  }
  if (chaos.writerStats.length > 0) {
    lines.push('## What the writers saw', '',
      '| writer | acknowledged | failed | flushes | failed flushes | connections |', '| --- | ---: | ---: | ---: | ---: | ---: |',
      ...chaos.writerStats.map(({ name, stats: st }) => `| ${name} | ${st.acked} | ${st.failed} | ${st.flushes} | ${st.flushesFailed} | ${st.connects} |`),
      '', 'Errors (expected during faults; numbers in messages replaced by N), most frequent first:', '')
    for (const { name, stats: st } of chaos.writerStats) {
      for (const [m, n] of Object.entries(st.errors).sort((a, b) => b[1] - a[1]).slice(0, 12)) lines.push(`- ${name}: ${n}× \`${m.replace(/`/g, "'")}\``)
    }
    lines.push('')
  }
  lines.push('## Syncs', '',
    `\`ukai sync\` after the writers paused (both images, every cycle): ${chaos.syncStats.attempts[0]} succeeded at the first attempt, ` +
    `${chaos.syncStats.attempts[1]} at the second, ${chaos.syncStats.attempts[2]} later (1 s apart), ${chaos.syncStats.failed} failed 8 times.`, '')
  if (chaos.syncFailures.size > 0) {
    lines.push('Failed syncs (during a fault or the writes after it a sync may fail: a node is down, skipped for `retry_after`, or a writer takes the image over from it; numbers replaced by N):', '')
    for (const [k, n] of [...chaos.syncFailures].sort((a, b) => b[1] - a[1])) lines.push(`- ${n}× ${k.replace(/`/g, "'")}`)
    lines.push('')
  }
  if (chaos.crashes.length > 0) {
    lines.push('## CLI crashes', '', 'The `ukai` command exited with a code it does not define:', '')
    for (const c of chaos.crashes.slice(0, 5)) lines.push('```', c.trim().slice(0, 3000), '```', '')
  }
  const noted = chaos.results.filter((x) => x.notes.length > 0 && !defects.includes(x))
  if (noted.length > 0) {
    lines.push('## Notes from cycles without a defect', '')
    for (const x of noted) for (const n of x.notes) lines.push(`- cycle ${x.cycle} (${x.kind}): ${n}`)
    lines.push('')
  }
  lines.push('## Method', '', METHOD, '', '## Cycles', '', '<details><summary>every cycle</summary>', '',
    '| cycle | fault | acked | failed | lost | differ | recovery | seconds |', '| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |',
    ...chaos.results.map((x) => `| ${x.cycle} | ${x.fault} | ${x.acked} | ${x.failed} | ${x.lost} | ${x.differ} | ${x.recoveryFailed ? 'FAILED' : 'ok'} | ${x.seconds.toFixed(1)} |`),
    '', '</details>', '')
  mkdirSync(dirname(file), { recursive: true })
  writeFileSync(file, lines.join('\n'))
}

// ---------------------------------------------------------------- main

function parseArgs (argv: string[], root: string): ChaosOptions {
  const o: ChaosOptions = {
    cycles: 100,
    seed: Math.floor(Math.random() * 2 ** 31),
    from: 1,
    kinds: undefined,
    report: join(root, 'chaos/results/latest.md'),
    logsDir: join(root, 'chaos/results/logs'),
    verbose: false,
    inject: undefined
  }
  const int = (v: string | undefined, name: string): number => {
    const n = Number(v)
    if (v === undefined || !Number.isInteger(n) || n < 0) throw new Error(`${name} needs a non-negative integer, not ${String(v)}`)
    return n
  }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!
    const [flag, inline] = a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined]
    const value = (): string | undefined => inline ?? argv[++i]
    switch (flag) {
      case '--cycles': o.cycles = int(value(), '--cycles'); break
      case '--seed': o.seed = int(value(), '--seed'); break
      case '--from': o.from = Math.max(1, int(value(), '--from')); break
      case '--kinds': {
        const ks = (value() ?? '').split(',').map((k) => k.trim()).filter((k) => k !== '')
        const unknown = ks.filter((k) => KINDS[k] === undefined)
        if (unknown.length > 0 || ks.length === 0) throw new Error(`unknown fault kind(s) ${unknown.join(', ')}; kinds: ${Object.keys(KINDS).join(', ')}`)
        o.kinds = ks
        break
      }
      case '--report': o.report = resolve(value() ?? ''); break
      case '--no-report': o.report = undefined; break
      case '--verbose': case '-v': o.verbose = true; break
      case '--inject-defect': {
        const v = value()
        if (v !== 'lost' && v !== 'differ') throw new Error(`--inject-defect takes lost or differ, not ${String(v)}`)
        o.inject = v
        break
      }
      case '--help': case '-h': throw new Error('help')
      default: throw new Error(`unknown argument ${a}`)
    }
  }
  return o
}

export async function main (argv: string[], root: string): Promise<number> {
  let opts: ChaosOptions
  try {
    opts = parseArgs(argv, root)
  } catch (err) {
    const m = (err as Error).message
    process.stderr.write(`${m === 'help' ? '' : `chaos: ${m}\n`}${USAGE}${Object.keys(KINDS).map((k) => `\n                '${k}'`).join('')}\n`)
    return m === 'help' ? 0 : 2
  }
  const missing = etcdMissing()
  if (missing !== undefined) { process.stderr.write(`chaos: ${missing}\n`); return 2 }
  process.chdir(root)
  const chaos = new Chaos(opts)
  chaos.say(`chaos: seed ${opts.seed}, cycles ${opts.from}-${opts.from + opts.cycles - 1}${opts.kinds !== undefined ? `, kinds ${opts.kinds.join(', ')}` : ''}`)
  chaos.say(`chaos: replay with: npm run chaos -- --seed ${opts.seed} --cycles ${opts.cycles}${opts.from !== 1 ? ` --from ${opts.from}` : ''}`)
  const onSignal = (sig: NodeJS.Signals): void => {
    if (chaos.interrupted) return
    chaos.interrupted = true
    chaos.say(`chaos: ${sig}: ending every process of the run`)
    void chaos.cleanup().finally(() => {
      if (chaos.results.length > 0) chaos.say(textTable(rows(chaos.results, opts.kinds ?? Object.keys(KINDS))))
      chaos.say('chaos: interrupted; no report written')
      process.exit(130)
    })
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  try {
    await chaos.run()
    await chaos.collectWriterStats()
  } catch (err) {
    chaos.fatal ??= (err as Error).stack ?? String(err)
  } finally {
    if (!chaos.interrupted) await chaos.cleanup()
  }
  if (chaos.interrupted) return await new Promise<number>(() => {})
  const rs = rows(chaos.results, opts.kinds ?? Object.keys(KINDS))
  chaos.say('')
  chaos.say(textTable(rs))
  if (chaos.fatal !== undefined) chaos.say(`\nchaos: the run stopped: ${chaos.fatal}`)
  if (opts.report !== undefined) {
    writeReport(chaos, opts.report)
    chaos.say(`\nchaos: report written to ${relative(root, opts.report)}`)
  }
  const total = rs[rs.length - 1]!
  const pass = chaos.fatal === undefined && total.lost === 0 && total.differ === 0 && total.recoveryFailed === 0 && total.otherBad === 0
  chaos.say(`chaos: ${pass ? 'PASS' : 'FAIL'} (seed ${opts.seed}, ${((Date.now() - chaos.started) / 60000).toFixed(1)} min)`)
  return pass ? 0 : 1
}
