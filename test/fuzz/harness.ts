/**
 * The fuzzing harness shared by every target (see fuzz/README.md).
 *
 * A target is a fast-check arbitrary of inputs and a `run` that drives the
 * real code with one input and checks the target's contract. Whatever
 * breaks the contract is a finding:
 *
 *   crash      an exception that is not the documented error type, an
 *              unhandled rejection or uncaught exception while the case
 *              ran, an internal error the code reported about itself, or
 *              (seen by the parent, fuzz/run.mjs) the process dying;
 *   hang       no answer within the target's per-case limit (or, seen by
 *              the watchdog thread, the event loop blocked for good);
 *   violation  the code answered, but not as documented (a malformed
 *              reply, a wrong status, something stored for an invalid
 *              body, a parse that does not round-trip).
 *
 * A shard runs `cases` inputs from one fast-check seed with a property
 * that never fails, so every case runs and findings are counted; the
 * first case of each distinct finding is then replayed from its path
 * (`seed` + `path` identify one generated input) and shrunk to a minimal
 * counterexample. `node fuzz/run.mjs --replay TARGET --seed S --path P`
 * reruns exactly that input.
 */
import fc from 'fast-check'

export type FindingKind = 'crash' | 'hang' | 'violation'

/** Counters, flat or one level deep ({codes: {UKAI_ERR_...: n}}). */
export type Stats = Record<string, number | Record<string, number>>

/** Adds one to `stats[key]` (or to `stats[key][sub]`). */
export function count (stats: Stats, key: string, sub?: string): void {
  if (sub === undefined) { stats[key] = ((stats[key] as number | undefined) ?? 0) + 1; return }
  const m = (stats[key] ??= {}) as Record<string, number>
  m[sub] = (m[sub] ?? 0) + 1
}

/** A broken contract, thrown by a target's `run`. Any other exception counts as a crash. */
export class Finding extends Error {
  readonly kind: FindingKind
  constructor (kind: FindingKind, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'Finding'
    this.kind = kind
  }
}

export const crash = (message: string, cause?: unknown): Finding => new Finding('crash', message, { cause })
export const violation = (message: string): Finding => new Finding('violation', message)
export const hang = (message: string): Finding => new Finding('hang', message)

/** What a case may use to stop work left over when it was given up on (a hang). */
export interface CaseContext {
  /** Aborted when the case timed out: close sockets, kill children. */
  signal: AbortSignal
}

export interface Target<T, C = unknown> {
  name: string
  /** What is driven, one line. */
  summary: string
  /** What counts as a crash, a hang and a violation for this target. */
  contract: string
  /** Share of a full run (fuzz/run.mjs distributes --cases by these). */
  defaultCases: number
  /** Cases per worker process (a shard). */
  shardSize: number
  /** Per-case limit: no answer within it is a hang. */
  caseTimeoutMs: number
  /** Cases of the fixed-seed slice in `npm test` (test/fuzz-slice.test.ts). */
  sliceCases: number
  /** Share of a CPU a shard keeps busy (less for targets that mostly wait on sockets and children); for scheduling. */
  cpuShare?: number
  /** Rough time per case, for scheduling and the estimate printed at the start. */
  msPerCase?: number
  /** The event loop blocked this long is a hang (default 30 s): the watchdog kills the process. */
  blockedMs?: number
  /** Heap limit of the process running it (MB), for targets that may run out of memory. */
  heapMb?: number
  /** Run only in a child process, also in the slice (a case may block the event loop or exhaust memory). */
  isolate?: boolean
  arbitrary: fc.Arbitrary<T>
  setup: () => Promise<C>
  run: (input: T, ctx: C, cc: CaseContext) => Promise<void> | void
  /** Checks the fixture still works (a well-formed client is served ...); every `checkEvery` cases and at the end. */
  check?: (ctx: C) => Promise<void>
  checkEvery?: number
  teardown: (ctx: C) => Promise<void>
  /** A printable form of an input (compact, truncated). */
  show: (input: T) => string
  /** A short name for the kind of input ("POST /v1/images"), put before hang and unhandled-error messages so they group by it. */
  label?: (input: T) => string
  /** What the cases reached (answers by kind, ...), counted in this process; reported with the results. */
  stats?: () => Stats
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type AnyTarget = Target<any, any>

export interface FindingRecord {
  target: string
  kind: FindingKind
  /** Groups findings of one cause: kind, message shape, the src/ frame it came from. */
  signature: string
  message: string
  stack: string
  /** The shard's fast-check seed and the run's path: together they give the input. */
  seed: number
  path: string
  /** Findings with this signature in the shard. */
  count: number
  input: string
  minimized?: { path: string, input: string, message: string, stack: string, shrinks: number } | { failed: string }
}

export interface ShardResult {
  target: string
  seed: number
  cases: number
  crashes: number
  hangs: number
  violations: number
  findings: FindingRecord[]
  durationMs: number
  /** An isolated target hung at this case: the rest of the shard must run in a fresh process. */
  stoppedAt?: number
  stats?: Stats
}

export interface ShardOptions {
  seed: number
  cases: number
  /** Cases to pass over first (a shard resumed after the case where it hung). */
  skip?: number
  /** Distinct findings replayed and shrunk per shard. */
  minimize?: number
  /** Time given to shrinking one finding. */
  minimizeMs?: number
  /** Cases done so far (skipped ones included) and the findings counted so far. */
  onProgress?: (done: number, counts: { cases: number, crashes: number, hangs: number, violations: number }) => void
  onFinding?: (f: FindingRecord) => void
  /** Current case index, for the watchdog thread. */
  progress?: Int32Array
  /** The current case's label (UTF-8, NUL-terminated), for the watchdog thread. */
  label?: Uint8Array
}

// ---------------------------------------------------------------------------
// Unhandled errors while a case runs

let armed: ((err: unknown, what: string) => void) | undefined
let lastUnhandled: { err: unknown, what: string } | undefined
let installed = false

/**
 * Uncaught exceptions and unhandled rejections become crashes of the case
 * that was running (or of the last one, when they surface after it).
 */
export function installUnhandledHooks (): void {
  if (installed) return
  installed = true
  const on = (what: string) => (err: unknown): void => {
    if (armed !== undefined) armed(err, what)
    else lastUnhandled = { err, what }
  }
  process.on('uncaughtException', on('uncaught exception'))
  process.on('unhandledRejection', on('unhandled rejection'))
}

function errText (err: unknown): { message: string, stack: string } {
  if (err instanceof Error) return { message: err.message, stack: err.stack ?? `${err.name}: ${err.message}` }
  return { message: String(err), stack: String(err) }
}

/** Runs one case of a target with its time limit; resolves undefined or the Finding it broke. */
export async function runCase<T, C> (target: Target<T, C>, input: T, ctx: C): Promise<Finding | undefined> {
  const ac = new AbortController()
  let timer: NodeJS.Timeout | undefined
  let unhandled: ((f: Finding) => void) | undefined
  const unhandledP = new Promise<Finding>((resolve) => { unhandled = resolve })
  const label = target.label === undefined ? '' : `${safeLabel(target, input)}: `
  armed = (err, what) => {
    const { message } = errText(err)
    unhandled!(crash(`${label}${what}: ${message}`, err))
  }
  if (lastUnhandled !== undefined) {
    const u = lastUnhandled
    lastUnhandled = undefined
    armed(u.err, `${u.what} (after the previous case)`)
  }
  try {
    const p = Promise.resolve().then(async () => { await target.run(input, ctx, { signal: ac.signal }) })
    const timeout = new Promise<Finding>((resolve) => {
      timer = setTimeout(() => resolve(hang(`${label}no answer within ${target.caseTimeoutMs} ms`)), target.caseTimeoutMs)
    })
    const outcome = await Promise.race([
      p.then(() => undefined, (err: unknown) => err instanceof Finding ? err : crash(`${(err as Error)?.name ?? 'Error'}: ${errText(err).message}`, err)),
      timeout,
      unhandledP
    ])
    if (outcome !== undefined) {
      ac.abort()
      p.catch(() => {})
    }
    return outcome
  } finally {
    clearTimeout(timer)
    armed = undefined
  }
}

// ---------------------------------------------------------------------------
// Signatures

/** The innermost frame in the project's own code (src/ first, then test/). */
function ownFrame (stack: string): string {
  const lines = stack.split('\n').slice(1)
  for (const dir of ['/src/', '/test/']) {
    for (const l of lines) {
      const m = /at (?:async )?(?:(\S+) \()?.*?((?:src|test)\/[^:)]+)(?::(\d+))?/.exec(l)
      if (m !== null && l.includes(dir) && !l.includes('/test/fuzz/harness')) return `${m[2]}${m[1] !== undefined ? ` ${m[1]}` : ''}`
    }
  }
  return '?'
}

/** Message shape: numbers, hex, quoted text and long runs masked, so one cause gives one signature. */
export function messageShape (message: string): string {
  return message.split('\n')[0]!
    .replace(/'[^']*'|"[^"]*"/g, 'S')
    .replace(/0x[0-9a-f]+/gi, 'H')
    .replace(/\d+/g, 'N')
    .slice(0, 140)
}

export function signatureOf (f: Finding): string {
  const inner = f.cause instanceof Error ? f.cause : f
  return `${f.kind} | ${messageShape(f.message)} | ${ownFrame(inner.stack ?? '')}`
}

/**
 * The stack worth reading: the real exception's (the innermost cause that
 * is not the fuzzer's Finding), else where the fuzzer's check failed.
 */
export function stackOf (f: Finding): string {
  const real: string[] = []
  let c: unknown = f.cause
  for (let depth = 0; c !== undefined && c !== null && depth < 6; depth++) {
    if (!(c instanceof Finding)) real.push(errText(c).stack)
    c = (c as { cause?: unknown }).cause
  }
  const text = real.length > 0 ? real.join('\ncaused by: ') : (f.stack ?? f.message).split('\n').filter((l) => !l.includes('/test/fuzz/harness.')).slice(0, 6).join('\n')
  return text.split('\n').slice(0, 40).join('\n')
}

// ---------------------------------------------------------------------------
// A shard

export async function runShard<T, C> (target: Target<T, C>, opts: ShardOptions): Promise<ShardResult> {
  installUnhandledHooks()
  const started = Date.now()
  const result: ShardResult = { target: target.name, seed: opts.seed, cases: 0, crashes: 0, hangs: 0, violations: 0, findings: [], durationMs: 0 }
  const bySig = new Map<string, FindingRecord>()
  const ctx = await target.setup()
  const record = (f: Finding, index: number, input: T | undefined, where = ''): void => {
    if (f.kind === 'crash') result.crashes++
    else if (f.kind === 'hang') result.hangs++
    else result.violations++
    const signature = signatureOf(f)
    const known = bySig.get(signature)
    if (known !== undefined) { known.count++; return }
    const rec: FindingRecord = {
      target: target.name,
      kind: f.kind,
      signature,
      message: where + f.message,
      stack: stackOf(f),
      seed: opts.seed,
      path: String(index),
      count: 1,
      input: input === undefined ? '(none: a check of the fixture after the cases)' : safeShow(target, input)
    }
    bySig.set(signature, rec)
    result.findings.push(rec)
    opts.onFinding?.(rec)
  }
  let lastReport = Date.now()
  let lastYield = Date.now()
  const counts = (): { cases: number, crashes: number, hangs: number, violations: number } => ({ cases: result.cases, crashes: result.crashes, hangs: result.hangs, violations: result.violations })
  try {
    let index = 0
    const skip = opts.skip ?? 0
    await fc.check(fc.asyncProperty(target.arbitrary, async (input: T) => {
      const i = index++
      if (i < skip || result.stoppedAt !== undefined) return true
      if (opts.progress !== undefined) Atomics.store(opts.progress, 0, i)
      if (opts.label !== undefined && (target.label !== undefined || target.isolate === true)) {
        // What the watchdog writes down if this case blocks the process: the label, and for isolated targets the input.
        const text = `${safeLabel(target, input)}\u0000${target.isolate === true ? safeShow(target, input) : ''}`
        const n = new TextEncoder().encodeInto(text, opts.label.subarray(0, opts.label.length - 1)).written
        opts.label[n] = 0
        opts.label[n + 1] = 0
      }
      const f = await runCase(target, input, ctx)
      if (f !== undefined) record(f, i, input)
      // Work a hung case left running would slow every later one down.
      if (f?.kind === 'hang' && target.isolate === true) result.stoppedAt = i
      result.cases = i + 1 - skip
      if (target.check !== undefined && target.checkEvery !== undefined && (i + 1) % target.checkEvery === 0) {
        const g = await checkFixture(target, ctx)
        if (g !== undefined) record(g, i, input, `after case ${i}: `)
      }
      if (opts.onProgress !== undefined && Date.now() - lastReport > 500) {
        lastReport = Date.now()
        opts.onProgress(i + 1, counts())
      }
      // Synchronous cases chain promises without end: let timers and I/O (the watchdog's heartbeat) run.
      if (Date.now() - lastYield > 50) {
        await tick()
        lastYield = Date.now()
      }
      return true
    }), { seed: opts.seed, numRuns: opts.cases })
    // An unhandled rejection of the last case that surfaced after it.
    await tick()
    if (lastUnhandled !== undefined) {
      const u = lastUnhandled
      lastUnhandled = undefined
      record(crash(`${u.what} (after the shard's last case): ${errText(u.err).message}`, u.err), Math.max(0, skip + result.cases - 1), undefined)
    }
    if (target.check !== undefined) {
      const g = await checkFixture(target, ctx)
      if (g !== undefined) {
        // Not any one case's doing: recorded against the last.
        const last = Math.max(0, skip + result.cases - 1)
        record(g, last, undefined, `after the shard's last case (${last}): `)
      }
    }
    // Shrink the first case of each distinct finding (not in a process a hung case still burdens).
    let n = result.stoppedAt !== undefined ? Infinity : 0
    for (const rec of result.findings) {
      if (n++ >= (opts.minimize ?? 3)) break
      if (rec.message.startsWith('after ')) continue
      rec.minimized = await minimize(target, ctx, rec, opts.minimizeMs ?? 60_000)
      opts.onFinding?.(rec)
    }
  } finally {
    await target.teardown(ctx).catch(() => {})
    try { result.stats = target.stats?.() } catch {}
    result.durationMs = Date.now() - started
    opts.onProgress?.((opts.skip ?? 0) + result.cases, counts())
  }
  return result
}

async function checkFixture<T, C> (target: Target<T, C>, ctx: C): Promise<Finding | undefined> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([
      target.check!(ctx).then(() => undefined, (err: unknown) => err instanceof Finding ? err : crash(`fixture check: ${errText(err).message}`, err)),
      new Promise<Finding>((resolve) => { timer = setTimeout(() => resolve(hang('the fixture check did not finish within 60 s')), 60_000) })
    ])
  } finally { clearTimeout(timer) }
}

function safeLabel<T> (target: { label?: (input: T) => string }, input: T): string {
  try { return target.label?.(input) ?? '' } catch { return '?' }
}

function safeShow<T> (target: { show: (input: T) => string }, input: T): string {
  try { return target.show(input) } catch (err) { return `(cannot show: ${errText(err).message})` }
}

/** Replays a finding from its path and shrinks it, keeping only failures with the same signature. */
async function minimize<T, C> (target: Target<T, C>, ctx: C, rec: FindingRecord, ms: number): Promise<FindingRecord['minimized']> {
  let last: Finding | undefined
  const r = await fc.check(fc.asyncProperty(target.arbitrary, async (input: T) => {
    const f = await runCase(target, input, ctx)
    if (f !== undefined && signatureOf(f) === rec.signature) { last = f; return false }
    return true
  }), { seed: rec.seed, path: rec.path, numRuns: 1, interruptAfterTimeLimit: ms, markInterruptAsFailure: false })
  if (!r.failed || r.counterexample === null) return { failed: 'the finding did not recur when its case was replayed alone (it depends on earlier cases)' }
  // Run the minimal input once more so message and stack are its own.
  const again = await runCase(target, r.counterexample[0], ctx)
  const f = again !== undefined && signatureOf(again) === rec.signature ? again : last!
  return { path: r.counterexamplePath!, input: safeShow(target, r.counterexample[0]), message: f.message, stack: stackOf(f), shrinks: r.numShrinks }
}

/** Runs one input (seed and path) of a target, shrinking from it; for `fuzz/run.mjs --replay`. */
export async function replay<T, C> (target: Target<T, C>, seed: number, path: string, shrink: boolean): Promise<{ input: string, finding: Finding | undefined, path: string }> {
  installUnhandledHooks()
  const ctx = await target.setup()
  try {
    let first: { input: T, finding: Finding | undefined } | undefined
    let sig: string | undefined
    // numRuns 1: the one input at `path` (fast-check would go on from it), shrunk when it fails; without shrinking, stop there.
    const r = await fc.check(fc.asyncProperty(target.arbitrary, async (input: T) => {
      const f = await runCase(target, input, ctx)
      if (first === undefined) { first = { input, finding: f }; sig = f === undefined ? undefined : signatureOf(f); return !shrink ? false : f === undefined }
      return f === undefined || signatureOf(f) !== sig
    }), { seed, path, numRuns: 1, endOnFailure: !shrink, interruptAfterTimeLimit: 120_000 })
    if (shrink && r.failed && r.counterexample !== null) {
      const f = await runCase(target, r.counterexample[0], ctx)
      return { input: safeShow(target, r.counterexample[0]), finding: f, path: r.counterexamplePath! }
    }
    return { input: first === undefined ? '(no input)' : safeShow(target, first.input), finding: first?.finding, path }
  } finally {
    await target.teardown(ctx).catch(() => {})
  }
}

// ---------------------------------------------------------------------------
// Small helpers for targets

/** Resolves after the event loop has run pending I/O callbacks once. */
export const tick = async (): Promise<void> => await new Promise((resolve) => setImmediate(resolve))

/** Waits for `p`, but no longer than `ms`; then rejects with a hang Finding naming `what`. */
export async function within<V> (p: Promise<V>, ms: number, what: string): Promise<V> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([p, new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => reject(hang(`${what} (no answer within ${ms} ms)`)), ms)
    })])
  } finally { clearTimeout(timer) }
}
