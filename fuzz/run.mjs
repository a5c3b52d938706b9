#!/usr/bin/env node
// `npm run fuzz`: fuzzes the NBD server's option and request parsers, the
// peer client's reply parser, the control API's bodies and the metadata
// import (see fuzz/README.md), then writes fuzz/results/latest.md.
//
//   node fuzz/run.mjs [--cases N] [--seed S] [--only a,b] [--jobs J] [--out FILE] [--no-build]
//   node fuzz/run.mjs --replay TARGET --seed S --path P [--no-shrink]
//   node fuzz/run.mjs --list
//
// The working tree is compiled into fuzz/.build/ first (a snapshot of its
// own, so builds of dist/ by others during the run change nothing), then
// every target runs in shards, each in a child process
// (dist/test/fuzz/worker.js of that build) with an IPC channel, at most
// --jobs CPUs' worth at a time. A child that dies is a crash; one whose
// event loop stays blocked is killed by its watchdog and is a hang; both
// are resumed after the case they were on.
import { execFileSync, fork, spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { accessSync, constants, copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { availableParallelism, cpus, loadavg, tmpdir } from 'node:os'
import { dirname, join, relative, resolve } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const BUILD = join(ROOT, 'fuzz', '.build')
const DEFAULT_OUT = join(ROOT, 'fuzz', 'results', 'latest.md')
/** Event loop blocked this long in a worker: a hang (the watchdog kills it). */
const BLOCKED_MS = 30_000
/** No message from a worker for this long: a hang (the parent kills it). */
const SILENT_MS = 5 * 60_000
/** Processes one shard may take after hangs and crashes before the rest of it is given up. */
const MAX_RESTARTS = 6

// ---------------------------------------------------------------------------
// Arguments

function parseArgs (argv) {
  const o = { cases: undefined, seed: undefined, only: undefined, jobs: undefined, out: undefined, build: true, replay: undefined, path: undefined, shrink: true, list: false, minimizeMs: 60_000 }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const val = () => {
      const v = a.includes('=') ? a.slice(a.indexOf('=') + 1) : argv[++i]
      if (v === undefined) usage(`${a} needs a value`)
      return v
    }
    const name = a.includes('=') ? a.slice(0, a.indexOf('=')) : a
    switch (name) {
      case '--cases': o.cases = Number(val()); break
      case '--seed': o.seed = Number(val()); break
      case '--only': o.only = val().split(',').map((s) => s.trim()).filter(Boolean); break
      case '--jobs': o.jobs = Number(val()); break
      case '--out': o.out = resolve(val()); break
      case '--replay': o.replay = val(); break
      case '--path': o.path = val(); break
      case '--minimize-ms': o.minimizeMs = Number(val()); break
      case '--no-build': o.build = false; break
      case '--no-shrink': o.shrink = false; break
      case '--list': o.list = true; break
      case '--help': case '-h': usage(); break
      default: usage(`unknown argument ${a}`)
    }
  }
  if (o.cases !== undefined && !(Number.isSafeInteger(o.cases) && o.cases > 0)) usage('--cases must be a positive integer')
  if (o.seed !== undefined && !Number.isSafeInteger(o.seed)) usage('--seed must be an integer')
  if (o.jobs !== undefined && !(o.jobs > 0)) usage('--jobs must be positive')
  if (o.replay !== undefined && (o.seed === undefined || o.path === undefined)) usage('--replay needs --seed and --path')
  return o
}

function usage (error) {
  const text = `usage: node fuzz/run.mjs [--cases N] [--seed S] [--only TARGET,...] [--jobs J] [--out FILE] [--no-build]
       node fuzz/run.mjs --replay TARGET --seed S --path P [--no-shrink]
       node fuzz/run.mjs --list

  --cases N    cases in all, shared among the targets by their default shares (default: about 1,000,000)
  --seed S     run seed; each shard's fast-check seed derives from it (default: random, printed)
  --only T,..  run only these targets
  --jobs J     CPUs to keep busy (default: the machine's, at most 2... see fuzz/README.md)
  --out FILE   results file (default fuzz/results/latest.md for a full default run; otherwise none unless given)
  --no-build   use fuzz/.build as it is
  --replay     run one input of TARGET (shard seed S, fast-check path P) and shrink it; prints it, the finding and the stack`
  if (error !== undefined) { process.stderr.write(`fuzz: ${error}\n\n${text}\n`); process.exit(2) }
  process.stdout.write(text + '\n')
  process.exit(0)
}

// ---------------------------------------------------------------------------
// Build and provenance

function build () {
  const tsc = join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc')
  rmSync(BUILD, { recursive: true, force: true })
  const r = spawnSync(process.execPath, [tsc, '-p', join(ROOT, 'tsconfig.json'), '--outDir', BUILD], { cwd: ROOT, encoding: 'utf8' })
  const errors = (r.stdout + r.stderr).split('\n').filter((l) => /error TS\d+/.test(l))
  if (!existsSync(join(BUILD, 'test', 'fuzz', 'worker.js'))) {
    process.stderr.write(`fuzz: the build failed:\n${r.stdout}${r.stderr}\n`)
    process.exit(1)
  }
  // The native file addon goes with the snapshot: src/blockstore/sparse.ts looks for it
  // beside the compiled tree (fuzz/.build/build/Release), and block I/O needs it.
  const addon = join(ROOT, 'build', 'Release', 'ukai_fs.node')
  if (!existsSync(addon)) {
    process.stderr.write('fuzz: the native file addon build/Release/ukai_fs.node is missing: run scripts/setup.sh (or npm ci) first\n')
    process.exit(1)
  }
  mkdirSync(join(BUILD, 'build', 'Release'), { recursive: true })
  copyFileSync(addon, join(BUILD, 'build', 'Release', 'ukai_fs.node'))
  return errors
}

function git (...args) {
  try { return execFileSync('git', args, { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trimEnd() } catch { return '' }
}

function provenance () {
  const head = git('rev-parse', 'HEAD')
  const subject = git('log', '-1', '--format=%s')
  const dirty = git('status', '--porcelain', '--', 'src').split('\n').filter(Boolean)
  const hash = createHash('sha256')
  const walk = (dir) => {
    for (const name of readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name < b.name ? -1 : 1)) {
      const p = join(dir, name.name)
      if (name.isDirectory()) walk(p)
      else if (name.name.endsWith('.ts')) { hash.update(relative(ROOT, p)); hash.update(readFileSync(p)) }
    }
  }
  walk(join(ROOT, 'src'))
  return { head, subject, dirty, srcHash: hash.digest('hex').slice(0, 16) }
}

// ---------------------------------------------------------------------------
// Shards and workers

const shardSeed = (seed, target, k) => createHash('sha256').update(`${seed}:${target}:${k}`).digest().readInt32BE(0)

function tmpBase () {
  // Fixtures fsync their metadata; tmpfs keeps that off the disk.
  for (const base of ['/dev/shm', tmpdir()]) {
    try { accessSync(base, constants.W_OK); return base } catch {}
  }
  return tmpdir()
}

const running = new Set()

/** Ends a worker and whatever it started: its process group, by the worker's id. */
function killGroup (child) {
  try { process.kill(-child.pid, 'SIGKILL') } catch { try { child.kill('SIGKILL') } catch {} }
}

function runWorker (job, runTmp, onMessage, heapMb) {
  return new Promise((resolvePromise) => {
    const child = fork(join(BUILD, 'test', 'fuzz', 'worker.js'), [], {
      cwd: ROOT,
      execArgv: ['--enable-source-maps', ...(heapMb !== undefined ? [`--max-old-space-size=${heapMb}`] : [])],
      env: { ...process.env, TMPDIR: runTmp, UV_THREADPOOL_SIZE: '8' },
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
      // Its own process group: killing it by its id takes the processes it started (the CLI target's) along.
      detached: true
    })
    running.add(child)
    let tail = ''
    const keep = (c) => { tail = (tail + c.toString()).slice(-8000) }
    child.stdout.on('data', keep)
    child.stderr.on('data', keep)
    let last = Date.now()
    let done = false
    const silent = setInterval(() => {
      if (Date.now() - last > SILENT_MS) { tail += `\n(fuzz: no message for ${SILENT_MS / 1000} s: killed)`; killGroup(child) }
    }, 5000)
    child.on('message', (m) => {
      last = Date.now()
      if (m.type === 'done' || m.type === 'replayed') done = true
      onMessage(m)
    })
    child.on('exit', (code, signal) => {
      clearInterval(silent)
      running.delete(child)
      resolvePromise({ code, signal, done, tail })
    })
    child.send(job)
  })
}

/** Runs one shard to the end, resuming after the case a dead or stuck process was on. */
async function runShard (target, seed, cases, runTmp, report) {
  const agg = { target: target.name, seed, cases: 0, crashes: 0, hangs: 0, violations: 0, findings: [], durationMs: 0, notes: [], stats: {}, stoppedAt: undefined, isolatedRestarts: 0 }
  let skip = 0
  for (let attempt = 0; skip < cases; attempt++) {
    if (attempt >= MAX_RESTARTS) {
      agg.notes.push(`shard ${seed}: ${cases - skip} cases given up after ${MAX_RESTARTS} processes died or hung`)
      break
    }
    const hangFile = join(runTmp, `hang-${target.name}-${seed >>> 0}-${attempt}.json`)
    rmSync(hangFile, { force: true })
    let progress = skip
    /** What this process counted and found before it died, if it does. */
    let counted = { cases: 0, crashes: 0, hangs: 0, violations: 0 }
    const streamed = new Map()
    const started = Date.now()
    const blockedMs = target.blockedMs ?? BLOCKED_MS
    const r = await runWorker({ kind: 'shard', target: target.name, seed, cases, skip, hangFile, blockedMs, minimizeMs: report.minimizeMs, group: true }, runTmp, (m) => {
      if (m.type === 'progress') { progress = m.done; counted = m.counts; report.progress(target.name, seed, m.done - skip + agg.cases) }
      if (m.type === 'finding') { streamed.set(m.finding.signature, m.finding); report.finding(m.finding) }
      if (m.type === 'done') {
        const res = m.result
        agg.cases += res.cases
        agg.crashes += res.crashes
        agg.hangs += res.hangs
        agg.violations += res.violations
        agg.findings.push(...res.findings)
        mergeStats(agg.stats, res.stats)
        if (res.stoppedAt !== undefined) agg.stoppedAt = res.stoppedAt
      }
    }, target.heapMb)
    agg.durationMs += Date.now() - started
    if (r.done && agg.stoppedAt !== undefined) {
      // An isolated target hung: the rest of the shard in a fresh process (not counted against MAX_RESTARTS).
      skip = agg.stoppedAt + 1
      agg.stoppedAt = undefined
      attempt--
      if (++agg.isolatedRestarts > 100) { agg.notes.push(`shard ${seed}: stopped after 100 hangs`); break }
      continue
    }
    if (r.done) break
    // The process ended without its result: keep what it reported, then
    // record the watchdog's hang, or the crash.
    agg.crashes += counted.crashes
    agg.hangs += counted.hangs
    agg.violations += counted.violations
    agg.findings.push(...streamed.values())
    let f
    if (existsSync(hangFile)) {
      const h = JSON.parse(readFileSync(hangFile, 'utf8'))
      const label = h.label !== undefined && h.label !== '' ? `${h.label}: ` : ''
      f = { target: target.name, kind: 'hang', signature: `hang | ${label}the event loop was blocked | ${target.name}`, message: `${label}the event loop stayed blocked for ${Math.round(h.blockedMs / 1000)} s (${Math.round((h.cpuMs ?? 0) / 1000)} s of CPU: synchronous work that does not end): the watchdog killed the process`, stack: r.tail.trim().split('\n').slice(-15).join('\n'), seed, path: String(h.index), count: 1, input: h.input !== undefined && h.input !== '' ? h.input : `(replay it: node fuzz/run.mjs --replay ${target.name} --seed ${seed} --path ${h.index})` }
      agg.hangs++
      agg.cases += Math.max(0, h.index - skip) + 1
      skip = h.index + 1
    } else {
      f = { target: target.name, kind: 'crash', signature: `crash | the fuzzing process died (${r.signal ?? `exit ${r.code}`}) | ${target.name}`, message: `the process died (${r.signal !== null ? `signal ${r.signal}` : `exit code ${r.code}`}) at or after case ${progress}`, stack: r.tail.trim().split('\n').slice(-25).join('\n'), seed, path: String(progress), count: 1, input: `(somewhere from case ${progress}: node fuzz/run.mjs --replay ${target.name} --seed ${seed} --path ${progress})` }
      agg.crashes++
      agg.cases += Math.max(0, progress - skip) + 1
      skip = progress + 1
    }
    agg.findings.push(f)
    report.finding(f)
  }
  return agg
}

// ---------------------------------------------------------------------------
// Results

/** Adds counters (flat, or one level deep) of `from` into `into`. */
function mergeStats (into, from) {
  for (const [k, v] of Object.entries(from ?? {})) {
    if (typeof v === 'number') into[k] = (into[k] ?? 0) + v
    else { into[k] ??= {}; for (const [kk, vv] of Object.entries(v)) into[k][kk] = (into[k][kk] ?? 0) + vv }
  }
  return into
}

function showStats (st) {
  return Object.entries(st).map(([k, v]) => typeof v === 'number' ? `${k} ${fmt(v)}` : `${k}: ${Object.entries(v).sort((a, b) => b[1] - a[1]).map(([kk, vv]) => `${kk} ${fmt(vv)}`).join(', ')}`).join('; ')
}

const fmt = (n) => n.toLocaleString('en-US')
const dur = (ms) => {
  const s = Math.round(ms / 1000)
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, '0')} s`
}

function mergeFindings (findings) {
  const by = new Map()
  for (const f of findings) {
    const k = `${f.target}\u0000${f.signature}`
    const known = by.get(k)
    if (known === undefined) { by.set(k, { ...f }); continue }
    known.count += f.count
    if (known.minimized === undefined && f.minimized !== undefined) known.minimized = f.minimized
  }
  return [...by.values()]
}

const fence = (s) => '```\n' + String(s).replace(/```/g, '`\u200b``') + '\n```'

function renderResults ({ rows, findings, prov, errors, seed, totalCases, wallMs, jobs, args, targets, load }) {
  const totals = rows.reduce((t, r) => ({ cases: t.cases + r.cases, crashes: t.crashes + r.crashes, hangs: t.hangs + r.hangs, violations: t.violations + r.violations }), { cases: 0, crashes: 0, hangs: 0, violations: 0 })
  const cpu = cpus()[0]?.model?.trim() ?? 'unknown CPU'
  const lines = []
  lines.push('# Fuzzing results', '')
  lines.push(`\`npm run fuzz\` (\`node fuzz/run.mjs${args.length > 0 ? ' ' + args.join(' ') : ''}\`), ${new Date().toISOString().replace(/\.\d+Z$/, 'Z')}.`, '')
  lines.push(`- **Measured**: commit \`${prov.head.slice(0, 12)}\` (${prov.subject})${prov.dirty.length === 0 ? ', src/ as committed' : `, with uncommitted changes in src/: ${prov.dirty.map((l) => `\`${l.slice(3)}\``).join(', ')}`}; src/ tree hash \`${prov.srcHash}\`.`)
  if (errors.length > 0) lines.push(`- **The build reported ${errors.length} type error(s)** (the emitted JavaScript was fuzzed all the same): ${errors.slice(0, 5).map((e) => `\`${e.trim()}\``).join('; ')}${errors.length > 5 ? '; ...' : ''}`)
  lines.push(`- Node.js ${process.version}, ${availableParallelism()} CPU(s) (${cpu}), ${jobs} job(s) at a time; load average at the start ${load.start}, at the end ${load.end} (other work on the machine slows the run down, not its results).`)
  lines.push(`- Run seed **${seed}**; each shard's fast-check seed derives from it. The same run again: \`node fuzz/run.mjs --seed ${seed} --cases ${totalCases}${args.includes('--only') ? ` --only ${rows.map((r) => r.target).join(',')}` : ''}\`.`)
  lines.push(`- **${fmt(totals.cases)} cases in ${dur(wallMs)}: ${totals.crashes} crash(es), ${totals.hangs} hang(s), ${totals.violations} contract violation(s).**`, '')
  lines.push('| target | cases | crashes | hangs | violations | time (shards summed) | seed |')
  lines.push('| --- | ---: | ---: | ---: | ---: | ---: | ---: |')
  for (const r of rows) lines.push(`| \`${r.target}\` | ${fmt(r.cases)} | ${r.crashes} | ${r.hangs} | ${r.violations} | ${dur(r.durationMs)} | ${seed} |`)
  lines.push(`| **all** | **${fmt(totals.cases)}** | **${totals.crashes}** | **${totals.hangs}** | **${totals.violations}** | ${dur(rows.reduce((t, r) => t + r.durationMs, 0))} | |`, '')
  const notes = rows.flatMap((r) => r.notes)
  if (notes.length > 0) lines.push('Notes:', '', ...notes.map((n) => `- ${n}`), '')
  lines.push('## Targets and their contracts', '')
  for (const t of targets.filter((t) => rows.some((r) => r.target === t.name))) {
    lines.push(`- **\`${t.name}\`**: ${t.summary}.`, `  *Contract* — ${t.contract}.`)
    const st = rows.find((r) => r.target === t.name).stats
    if (Object.keys(st).length > 0) lines.push(`  *Reached* — ${showStats(st)}.`)
  }
  lines.push('')
  lines.push('## Findings', '')
  if (findings.length === 0) lines.push('None.')
  const order = { crash: 0, hang: 1, violation: 2 }
  findings.sort((a, b) => order[a.kind] - order[b.kind] || b.count - a.count)
  findings.forEach((f, i) => {
    lines.push(`### ${i + 1}. \`${f.target}\` — ${f.kind}: ${f.message.split('\n')[0]}`, '')
    lines.push(`- Seen in ${fmt(f.count)} case(s). Signature: \`${f.signature}\``)
    lines.push(`- First case: shard seed \`${f.seed}\`, path \`${f.path}\` — \`node fuzz/run.mjs --replay ${f.target} --seed ${f.seed} --path ${f.path}\``)
    const m = f.minimized
    if (m !== undefined && 'path' in m) {
      lines.push(`- Minimal counterexample (${m.shrinks} shrink steps; \`--replay ${f.target} --seed ${f.seed} --path ${m.path} --no-shrink\`):`, '', fence(m.input), '')
      lines.push('  Message and stack:', '', fence(`${m.message}\n\n${m.stack}`), '')
    } else {
      if (m !== undefined && 'failed' in m) lines.push(`- Not shrunk: ${m.failed}.`)
      lines.push('- Input:', '', fence(f.input), '', '  Message and stack:', '', fence(`${f.message}\n\n${f.stack}`), '')
    }
  })
  return lines.join('\n') + '\n'
}

// ---------------------------------------------------------------------------
// Main

async function main () {
  const argv = process.argv.slice(2)
  const args = parseArgs(argv)
  if (args.build && args.replay === undefined && !args.list) process.stdout.write('fuzz: compiling the working tree into fuzz/.build ...\n')
  const errors = args.build ? build() : []
  if (errors.length > 0) process.stdout.write(`fuzz: the build reported ${errors.length} type error(s); fuzzing the emitted JavaScript anyway\n${errors.slice(0, 5).join('\n')}\n`)
  const { targets: all } = await import(pathToFileURL(join(BUILD, 'test', 'fuzz', 'targets', 'index.js')).href)

  if (args.list) {
    for (const t of all) process.stdout.write(`${t.name.padEnd(18)} ${String(t.defaultCases).padStart(8)}  ${t.summary}\n`)
    return 0
  }

  const runTmp = mkdtempSync(join(tmpBase(), 'ukai-fuzz-'))
  const cleanup = () => {
    for (const c of running) killGroup(c)
    rmSync(runTmp, { recursive: true, force: true })
  }
  process.on('SIGINT', () => { process.stderr.write('\nfuzz: interrupted\n'); cleanup(); process.exit(130) })
  process.on('SIGTERM', () => { cleanup(); process.exit(143) })

  try {
    if (args.replay !== undefined) {
      if (!all.some((t) => t.name === args.replay)) { process.stderr.write(`fuzz: no target '${args.replay}' (--list)\n`); return 2 }
      let out
      const t = all.find((x) => x.name === args.replay)
      const hangFile = join(runTmp, 'hang-replay.json')
      const r = await runWorker({ kind: 'replay', target: args.replay, seed: args.seed, path: args.path, shrink: args.shrink, hangFile, blockedMs: t.blockedMs ?? BLOCKED_MS, group: true }, runTmp, (m) => { if (m.type === 'replayed') out = m }, t.heapMb)
      if (out === undefined) {
        if (existsSync(hangFile)) {
          const h = JSON.parse(readFileSync(hangFile, 'utf8'))
          process.stdout.write(`target ${args.replay}, seed ${args.seed}, path ${args.path}\nresult: hang\n${h.label !== '' ? `${h.label}: ` : ''}the event loop stayed blocked for ${Math.round(h.blockedMs / 1000)} s: the watchdog killed the process\n${r.tail}\n`)
          return 1
        }
        process.stderr.write(`fuzz: the replay process died (${r.signal ?? `exit code ${r.code}`}):\n${r.tail}\n`)
        return 1
      }
      process.stdout.write(`target ${args.replay}, seed ${args.seed}, path ${out.path}\ninput:\n${out.input}\n\n`)
      if (out.finding === undefined) { process.stdout.write('result: no finding (the contract held for this input)\n'); return 0 }
      process.stdout.write(`result: ${out.finding.kind}\nsignature: ${out.finding.signature}\n${out.finding.message}\n\n${out.finding.stack}\n`)
      return 1
    }

    const targets = args.only === undefined ? all : args.only.map((n) => {
      const t = all.find((x) => x.name === n)
      if (t === undefined) { process.stderr.write(`fuzz: no target '${n}' (--list)\n`); process.exit(2) }
      return t
    })
    const defaultTotal = targets.reduce((n, t) => n + t.defaultCases, 0)
    const total = args.cases ?? defaultTotal
    const seed = args.seed ?? (Math.floor(Math.random() * 2 ** 31))
    const jobs = args.jobs ?? Math.min(2, availableParallelism())
    const out = args.out ?? (args.only === undefined && args.cases === undefined ? DEFAULT_OUT : undefined)

    // Shards, longest first.
    const shards = []
    const perTarget = new Map()
    for (const t of targets) {
      const n = Math.max(1, Math.round(total * t.defaultCases / defaultTotal))
      perTarget.set(t.name, n)
      for (let k = 0, left = n; left > 0; k++) {
        const c = Math.min(t.shardSize, left)
        shards.push({ target: t, seed: shardSeed(seed, t.name, k), cases: c, est: c * (t.msPerCase ?? 1) / (t.cpuShare ?? 1) })
        left -= c
      }
    }
    shards.sort((a, b) => b.est - a.est)
    const estMs = shards.reduce((s, x) => s + x.cases * (x.target.msPerCase ?? 1), 0) / jobs
    process.stdout.write(`fuzz: seed ${seed}, ${fmt(total)} cases over ${targets.length} target(s) in ${shards.length} shard(s), ${jobs} job(s); estimated ${dur(estMs)}\n`)
    for (const t of targets) process.stdout.write(`  ${t.name.padEnd(18)} ${fmt(perTarget.get(t.name)).padStart(9)} cases\n`)

    const shardDone = new Map()
    const seen = new Set()
    const report = {
      minimizeMs: args.minimizeMs,
      progress: (name, shard, n) => { shardDone.set(shard, n) },
      finding: (f) => {
        const key = `${f.target} ${f.signature}${f.minimized !== undefined ? ' min' : ''}`
        if (seen.has(key)) return
        seen.add(key)
        const m = f.minimized !== undefined && 'input' in f.minimized ? `\n    minimal: ${f.minimized.input.slice(0, 300)}` : ''
        process.stdout.write(`  ! ${f.target}: ${f.kind}: ${f.message.split('\n')[0].slice(0, 200)}\n    seed ${f.seed} path ${f.minimized !== undefined && 'path' in f.minimized ? f.minimized.path : f.path}${m}\n`)
      }
    }
    const started = Date.now()
    const loadStart = loadavg()[0].toFixed(1)
    const ticker = setInterval(() => {
      const parts = targets.map((t) => {
        const n = shards.filter((s) => s.target === t).reduce((a, s) => a + (shardDone.get(s.seed) ?? 0), 0)
        return `${t.name} ${Math.round(100 * Math.min(n, perTarget.get(t.name)) / perTarget.get(t.name))}%`
      })
      process.stdout.write(`  [${dur(Date.now() - started)}] ${parts.join(', ')}\n`)
    }, 30_000)

    // Run shards while their CPU shares fit in `jobs`.
    const results = []
    await new Promise((resolveAll) => {
      let busy = 0
      let active = 0
      const queue = shards.slice()
      const next = () => {
        while (queue.length > 0) {
          const i = queue.findIndex((s) => active === 0 || busy + (s.target.cpuShare ?? 1) <= jobs + 1e-9)
          if (i < 0) break
          const s = queue.splice(i, 1)[0]
          const share = s.target.cpuShare ?? 1
          busy += share
          active++
          runShard(s.target, s.seed, s.cases, runTmp, report).then((r) => {
            results.push(r)
            shardDone.set(s.seed, r.cases)
            busy -= share
            active--
            if (queue.length === 0 && active === 0) resolveAll()
            else next()
          })
        }
      }
      next()
    })
    clearInterval(ticker)
    const wallMs = Date.now() - started

    const rows = targets.map((t) => {
      const rs = results.filter((r) => r.target === t.name)
      return {
        target: t.name,
        cases: rs.reduce((n, r) => n + r.cases, 0),
        crashes: rs.reduce((n, r) => n + r.crashes, 0),
        hangs: rs.reduce((n, r) => n + r.hangs, 0),
        violations: rs.reduce((n, r) => n + r.violations, 0),
        durationMs: rs.reduce((n, r) => n + r.durationMs, 0),
        notes: rs.flatMap((r) => r.notes),
        stats: rs.reduce((st, r) => mergeStats(st, r.stats), {})
      }
    })
    const findings = mergeFindings(results.flatMap((r) => r.findings))
    const md = renderResults({ rows, findings, prov: provenance(), errors, seed, totalCases: total, wallMs, jobs, args: argv, targets, load: { start: loadStart, end: loadavg()[0].toFixed(1) } })
    process.stdout.write('\n' + md.split('\n').filter((l) => l.startsWith('|') || /^- \*\*\d/.test(l)).join('\n') + '\n')
    if (out !== undefined) {
      mkdirSync(dirname(out), { recursive: true })
      writeFileSync(out, md)
      process.stdout.write(`\nfuzz: results written to ${relative(process.cwd(), out)}\n`)
    } else {
      process.stdout.write('\nfuzz: results not written (a partial run; --out FILE to keep them)\n')
    }
    const bad = rows.reduce((n, r) => n + r.crashes + r.hangs + r.violations, 0)
    return bad === 0 ? 0 : 1
  } finally {
    cleanup()
  }
}

main().then((code) => { process.exitCode = code }, (err) => {
  process.stderr.write(`fuzz: ${err?.stack ?? err}\n`)
  for (const c of running) killGroup(c)
  process.exitCode = 1
})
