#!/usr/bin/env node
/**
 * The UKAI benchmark driver (`npm run bench`, through bench/run.sh).
 *
 * One run, one machine: UKAI side by side with the local file, bindfs,
 * qemu-nbd and nbdkit on the same bytes, warm in the page cache, then
 * resync, metadata, memory and abusive-client measures; the metadata and propagation
 * phases run on the embedded store and again on an etcd started for them. Results: bench/results/latest.md,
 * latest.svg and latest.json (full runs only), raw fio JSON and logs in
 * bench/results/raw/<time>/ (kept out of git).
 *
 *   node bench/bench.mjs [--quick] [--only PHASES] [--workloads IDS] [--pairs IDS]
 *                        [--size SIZE] [--runtime S] [--rounds N] [--profile] [--keep]
 *
 * Everything runs on loopback, in a temporary directory that is removed at
 * the end; every process started is ended by its PID, every mount unmounted.
 */
import { mkdir, mkdtemp, rm, writeFile, readFile, statfs } from 'node:fs/promises'
import { createWriteStream } from 'node:fs'
import { cpus, totalmem, tmpdir, release } from 'node:os'
import { join, resolve, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { ratioChart } from './lib/chart.mjs'
import { makeReferenceFile, populateBlocks, residency, warm } from './lib/data.mjs'
import { BenchCeph, RBD_IMAGES, startRbdPeer } from './lib/ceph.mjs'
import { BenchEtcd } from './lib/etcd.mjs'
import { WORKLOADS } from './lib/fio.mjs'
import { abuse } from './lib/abuse.mjs'
import { tlsCost } from './lib/tls.mjs'
import { peakRss } from './lib/memory.mjs'
import { metadataCost, propagation } from './lib/metadata.mjs'
import { migrationPause } from './lib/migration.mjs'
import { cleanup, run } from './lib/proc.mjs'
import { profileResync, profileRuns, writeProfileReport } from './lib/profile.mjs'
import { markdownReport, verdicts } from './lib/report.mjs'
import { deltaResync, resyncRate } from './lib/resync.mjs'
import { moveWhileWriting } from './lib/move.mjs'
import { fmtBytes } from './lib/stats.mjs'
import { Peers, ukaiTargets } from './lib/targets.mjs'
import { PAIRS, runThroughput } from './lib/throughput.mjs'
import { UkaiNode, snapshotBuild } from './lib/ukai.mjs'

const HERE = dirname(fileURLToPath(import.meta.url))
const REPO = resolve(HERE, '..')
const PHASES = ['throughput', 'resync', 'delta', 'move', 'metadata', 'propagation', 'migration', 'memory', 'abuse', 'tls']
const GIB = 2 ** 30
const MIB = 2 ** 20

const USAGE = `usage: node bench/bench.mjs [options]
  --quick            development run: 1 s runs, 1 pair, 256 MiB, no ramp (not published)
  --only LIST        phases, comma-separated: ${PHASES.join(',')} (default: all);
                     metadata and propagation run on the embedded store and on an etcd started for them
  --workloads LIST   ${WORKLOADS.map((w) => w.id).join(',')}
  --pairs LIST       ${PAIRS.map((p) => p.id).join(',')}
  --size SIZE        data size in MiB or with G suffix (default 2G; --quick 256M)
  --runtime S        seconds per fio run (default 10; --quick 1)
  --rounds N         alternating pairs per figure (default 3; --quick 1)
  --profile          instead of measuring, profile the UKAI node (node --cpu-prof) once per
                     workload and UKAI target; flame graphs go to bench/results/profiles/
  --targets LIST     with --profile: ukai-nbd,ukai-fuse,ukai-nbd-2,ukai-nbd-remote,resync
  --dir DIR          where the temporary directory goes (default: $TMPDIR or /tmp)
  --ceph-block-dir D where the Ceph OSDs' block files go (default: a directory of their own
                     on /dev/shm when it has room, else in the temporary directory)
  --dist DIR         test this compiled tree instead of the repository's dist/
  --node-env K=V     extra environment of the UKAI nodes (repeatable), for experiments such as
                     UV_USE_IO_URING=1 or UV_THREADPOOL_SIZE=4; never published
  --keep             keep the temporary directory
  --publish          write bench/results/latest.* even for a partial run
  --report-from FILE only write the reports again from a run's results.json`

function parseSize (s) {
  const m = /^(\d+(?:\.\d+)?)\s*([MG])?i?B?$/i.exec(s)
  if (m === null) throw new Error(`bad size ${s}`)
  return Math.round(Number(m[1]) * ((m[2] ?? 'M').toUpperCase() === 'G' ? GIB : MIB))
}

async function machine (dir) {
  const text = async (cmd, args) => (await run(cmd, args, { allowFail: true })).stdout.trim()
  const os = /PRETTY_NAME="([^"]+)"/.exec(await readFile('/etc/os-release', 'utf8').catch(() => ''))?.[1] ?? 'unknown'
  const virt = await text('systemd-detect-virt', [])
  const fs = await text('findmnt', ['-n', '-o', 'FSTYPE,SOURCE', '-T', dir])
  const st = await statfs(dir)
  return {
    machine: {
      CPU: `${cpus()[0]?.model ?? 'unknown'}, ${cpus().length} logical CPUs`,
      memory: fmtBytes(totalmem()),
      OS: `${os}, Linux ${release()}${virt !== '' && virt !== 'none' ? ` (${virt})` : ''}`,
      'temporary directory': `${dir} (${fs.replace(/\s+/, ' on ')}, ${fmtBytes(st.bavail * st.bsize)} free at start)`
    },
    fs: fs.replace(/\s+/, ' on '),
    versions: {
      node: process.version,
      fio: await text('fio', ['--version']),
      'qemu-nbd': (await text('qemu-nbd', ['--version'])).split('\n')[0],
      nbdkit: await text('nbdkit', ['--version']),
      bindfs: await text('bindfs', ['--version']),
      etcd: await BenchEtcd.version() ?? 'not installed',
      ceph: await BenchCeph.version() ?? 'not installed',
      kernel: release()
    }
  }
}

async function ukaiVersion () {
  const head = (await run('git', ['-C', REPO, 'rev-parse', '--short', 'HEAD'], { allowFail: true })).stdout.trim()
  const dirty = (await run('git', ['-C', REPO, 'status', '--porcelain', '--', 'src'], { allowFail: true })).stdout.trim()
  const n = dirty === '' ? 0 : dirty.split('\n').length
  return `commit ${head || 'unknown'}${n > 0 ? ` plus uncommitted changes to ${n} path(s) under src/ (the work tree as built when the run began)` : ''}`
}

async function main () {
  const { values } = parseArgs({
    options: {
      quick: { type: 'boolean' },
      only: { type: 'string' },
      workloads: { type: 'string' },
      pairs: { type: 'string' },
      size: { type: 'string' },
      runtime: { type: 'string' },
      rounds: { type: 'string' },
      profile: { type: 'boolean' },
      targets: { type: 'string' },
      dir: { type: 'string' },
      'ceph-block-dir': { type: 'string' },
      keep: { type: 'boolean' },
      dist: { type: 'string' },
      'node-env': { type: 'string', multiple: true },
      publish: { type: 'boolean' },
      'report-from': { type: 'string' },
      help: { type: 'boolean' }
    }
  })
  if (values.help === true) { process.stdout.write(USAGE + '\n'); return 0 }
  if (values['report-from'] !== undefined) {
    // Re-renders the reports from a run's results.json, without measuring.
    const results = JSON.parse(await readFile(values['report-from'], 'utf8'))
    const resultsDir = join(HERE, 'results')
    await writeReports(results, {
      pairs: PAIRS, workloads: WORKLOADS, rawDir: dirname(resolve(values['report-from'])), resultsDir,
      publish: values.publish === true || !results.meta.partial, log: (s) => process.stdout.write(s + '\n')
    })
    return 0
  }
  const quick = values.quick === true
  const phases = values.profile === true ? ['throughput'] : values.only === undefined ? PHASES : values.only.split(',')
  const profileTargets = ['ukai-nbd', 'ukai-fuse', 'ukai-nbd-2', 'ukai-nbd-remote', 'resync'].filter((t) => values.targets === undefined || values.targets.split(',').includes(t))
  for (const p of phases) if (!PHASES.includes(p)) throw new Error(`unknown phase ${p}\n${USAGE}`)
  const workloads = values.workloads === undefined ? WORKLOADS : values.workloads.split(',').map((id) => WORKLOADS.find((w) => w.id === id) ?? (() => { throw new Error(`unknown workload ${id}`) })())
  const pairs = values.pairs === undefined ? PAIRS : values.pairs.split(',').map((id) => PAIRS.find((p) => p.id === id) ?? (() => { throw new Error(`unknown pair ${id}`) })())
  const size = parseSize(values.size ?? (quick ? '256M' : '2G'))
  const blockSize = 64 * MIB
  if (size % blockSize !== 0) throw new Error('--size must be a multiple of 64 MiB')
  const timing = { runtime: Number(values.runtime ?? (quick ? 1 : 10)), ramp: quick ? 0 : 1 }
  const rounds = Number(values.rounds ?? (quick ? 1 : 3))
  const nodeEnv = Object.fromEntries((values['node-env'] ?? []).map((kv) => {
    const i = kv.indexOf('=')
    if (i <= 0) throw new Error(`--node-env takes KEY=VALUE, got ${kv}`)
    return [kv.slice(0, i), kv.slice(i + 1)]
  }))
  const partial = quick || values['node-env'] !== undefined || values.profile === true || values.only !== undefined || values.workloads !== undefined || values.pairs !== undefined
  const publish = values.publish === true || !partial

  const started = Date.now()
  const stamp = new Date(started).toISOString().replace(/[:.]/g, '-')
  const resultsDir = join(HERE, 'results')
  const rawDir = join(resultsDir, 'raw', stamp)
  await mkdir(rawDir, { recursive: true })
  const logFile = createWriteStream(join(rawDir, 'bench.log'))
  const log = (s) => {
    const line = `[${((Date.now() - started) / 1000).toFixed(0).padStart(4)} s] ${s}`
    process.stdout.write(line + '\n')
    logFile.write(line + '\n')
  }

  const parent = values.dir ?? tmpdir()
  const st = await statfs(parent)
  // Reference file, block files of three images (four copies), cp target, delta image on two nodes.
  const rbdWanted = phases.includes('throughput') && values.profile !== true
    ? Object.keys(RBD_IMAGES).filter((id) => pairs.some((p) => p.b === id))
    : []
  // (The Ceph peer checks the room for its block files itself.)
  const need = size * 8 + GIB
  if (st.bavail * st.bsize < need) throw new Error(`${parent} has ${fmtBytes(st.bavail * st.bsize)} free; the run needs about ${fmtBytes(need)}`)
  const tmp = await mkdtemp(join(parent, 'ukai-bench-'))
  log(`temporary directory ${tmp}; raw results in ${rawDir}`)

  let interrupted = false
  const onSignal = (sig) => {
    if (interrupted) process.exit(1)
    interrupted = true
    log(`${sig}: stopping what was started and cleaning up`)
    void cleanup().then(() => keepOrRemove()).finally(() => process.exit(130))
  }
  const keepOrRemove = async () => { if (values.keep !== true) await rm(tmp, { recursive: true, force: true }) }
  process.on('SIGINT', () => onSignal('SIGINT'))
  process.on('SIGTERM', () => onSignal('SIGTERM'))

  const info = await machine(tmp)
  const results = {
    meta: {
      date: new Date(started).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC'),
      quick,
      partial,
      size,
      blockSize,
      runtime: timing.runtime,
      ramp: timing.ramp,
      rounds,
      phases,
      ...info,
      ukai: await ukaiVersion() + (Object.keys(nodeEnv).length > 0 ? `; nodes run with ${Object.entries(nodeEnv).map(([k, v]) => `${k}=${v}`).join(' ')}` : ''),
      warm: []
    }
  }
  results.meta.machine.tools = Object.entries(info.versions).map(([k, v]) => `${k} ${v.replace(/^[a-z-]+ /i, '')}`).join(', ')

  try {
    log('snapshot of the compiled node (dist/)')
    const build = join(tmp, 'build')
    const cli = await snapshotBuild(REPO, build, values.dist === undefined ? undefined : resolve(values.dist))

    log(`reference data: ${fmtBytes(size)} of random bytes`)
    const localDir = join(tmp, 'local')
    await mkdir(localDir)
    const reference = join(localDir, 'disk.img')
    await makeReferenceFile(reference, size)

    const metadataRoot = join(tmp, 'metadata')
    const a = new UkaiNode({ name: 'A', dir: join(tmp, 'node-a'), metadataRoot, cli, env: nodeEnv })
    const b = new UkaiNode({ name: 'B', dir: join(tmp, 'node-b'), metadataRoot, cli, env: nodeEnv })
    await a.configure()
    await b.configure()
    const images = { one: 'bench-1', two: 'bench-2', remote: 'bench-remote' }

    const needsCluster = phases.some((p) => p !== 'memory' && p !== 'abuse' && p !== 'tls')
    if (phases.includes('throughput')) {
      log('images: one replica on A, two replicas (A, B), one replica on B only; block files filled with the reference bytes')
      const sz = String(size)
      await a.ukai('image', 'create', images.one, '-s', sz, '-b', String(blockSize), '-l', a.id)
      await a.ukai('image', 'create', images.two, '-s', sz, '-b', String(blockSize), '-l', a.id, '-l', b.id)
      await a.ukai('image', 'create', images.remote, '-s', sz, '-b', String(blockSize), '-l', b.id)
      await populateBlocks(reference, a.imageRoot, images.one, blockSize)
      await populateBlocks(reference, a.imageRoot, images.two, blockSize)
      await populateBlocks(reference, b.imageRoot, images.two, blockSize)
      await populateBlocks(reference, b.imageRoot, images.remote, blockSize)
    }
    if (needsCluster) {
      log(`starting UKAI nodes A and B (${a.id}, ${b.id})`)
      await a.start()
      await b.start()
    }

    if (values.profile === true) {
      // Profile mode: no figures, only where the node spends its time.
      const targets = ukaiTargets(a, images)
      const dataPaths = [a.imageRoot, b.imageRoot]
      log(`page cache: ${fmtBytes(await warm(dataPaths))} of data files written again into it`)
      log('profiles: the UKAI node under node --cpu-prof, one run per workload and target')
      const outDir = join(resultsDir, 'profiles')
      results.profiles = await profileRuns({ a, b, targets, which: profileTargets, workloads, timing, rawDir, outDir, log })
      if (profileTargets.includes('resync')) {
        results.profiles.push(...await profileResync({ a, b, reference, size, blockSize, rawDir, outDir, log }))
      }
      await writeProfileReport(outDir, results.profiles,
        `Made by \`npm run bench -- --profile\` (${timing.runtime} s per run, ${fmtBytes(size)} image, warm page cache); latest: ${results.meta.date}, UKAI ${results.meta.ukai}. ` +
        'One fio run per profile (the workloads of the benchmark; for resync one `ukai sync` of a fully out-of-sync replica), the node started under `node --cpu-prof` (1 ms sampling) and stopped after it. ' +
        'Native functions are named with their JS caller (`writeBuffer` from `write node:fs` is a file write handed to the libuv pool; from `writeGeneric` it is a socket write). ' +
        'Self time is time spent in the function itself; `(program)` is time in native code outside JS (libuv, the kernel, fuse-native\'s C side), `(garbage collector)` is GC, `(idle)` is the event loop waiting.', results.meta.date)
      log(`flame graphs and ${join(outDir, 'README.md')} written`)
    } else if (phases.includes('throughput')) {
      const peers = new Peers(reference, join(tmp, 'peers'))
      await mkdir(peers.dir)
      log('starting the peers: bindfs, qemu-nbd, nbdkit, nbdkit chain')
      await peers.start()
      const targets = { ...peers.targets(), ...ukaiTargets(a, images) }
      // The distributed-storage peer, only when a pair asks for it.
      let ceph
      if (rbdWanted.length > 0) {
        log(`starting the Ceph RBD peer: one monitor, one manager, two OSDs; pools ${rbdWanted.map((id) => `${RBD_IMAGES[id].pool} (size ${RBD_IMAGES[id].size})`).join(', ')}`)
        try {
          const peer = await startRbdPeer({ dir: join(tmp, 'ceph'), blockDir: values['ceph-block-dir'] === undefined ? undefined : resolve(values['ceph-block-dir']), reference, size, wanted: rbdWanted, log })
          ceph = peer.ceph
          Object.assign(targets, peer.targets)
          results.meta.ceph = { ...peer.meta, warm: [] }
          log(`  Ceph ${peer.meta.version} up in ${(peer.meta.startMs / 1000).toFixed(0)} s; block files in ${peer.meta.blockDir} (${peer.meta.blockFs}); ${fmtBytes(await ceph.cachedBytes())} in the BlueStore data caches`)
        } catch (err) {
          results.meta.ceph = { error: err.message }
          log(`  the Ceph RBD peer could not start: ${err.message}`)
        }
      }
      const dataPaths = [reference, a.imageRoot, b.imageRoot]
      log(`page cache: ${fmtBytes(await warm(dataPaths))} of data files written again into it`)
      try {
        results.throughput = await runThroughput({
          targets,
          workloads,
          pairs,
          rounds,
          timing,
          warmup: quick ? 1 : 2,
          rawDir,
          log,
          beforeWorkload: async (w) => {
            let r = await residency(dataPaths)
            let rewarmed = false
            if (r.resident < r.size) {
              await warm(dataPaths)
              rewarmed = true
              r = await residency(dataPaths)
            }
            results.meta.warm.push({ workload: w.id, ...r, rewarmed })
            log(`  page cache: ${(r.resident / r.size * 100).toFixed(1)}% of ${fmtBytes(r.size)} resident${rewarmed ? ' (after writing what it lost again)' : ''}`)
            if (ceph !== undefined) {
              const cached = await ceph.cachedBytes()
              results.meta.ceph.warm.push({ workload: w.id, cached })
              log(`  Ceph: ${fmtBytes(cached)} in the OSDs' BlueStore data caches`)
            }
          }
        })
      } finally {
        await ceph?.stop()
        await peers.stop()
      }
    }
    if (phases.includes('throughput')) {
      for (const name of Object.values(images)) await a.api('DELETE', `/v1/images/${name}`).catch((err) => log(`destroying ${name}: ${err.message}`))
    }

    // `key`: where the results go (the phase's name unless it runs again on another backend).
    const phase = async (name, fn, key = name, nodeB = b) => {
      if (!phases.includes(name)) return
      log(`${key}`)
      try {
        results[key] = await fn()
      } catch (err) {
        results[key] = { error: err.message }
        log(`  ${key} failed: ${err.message}`)
        // A failed phase may leave node B stopped.
        if (nodeB.daemon === undefined) await nodeB.start().catch(() => {})
      }
    }
    const metadataOpts = { dist: join(build, 'dist'), changes: quick ? 10 : 50, creations: quick ? 2 : 5, crossChecks: quick ? 10 : 30, log }
    await phase('resync', async () => await resyncRate({ a, b, reference, size, blockSize, rounds, dir: localDir, log }))
    await phase('delta', async () => await deltaResync({ a, b, reference, size, blockSize, rawDir, log }))
    await phase('move', async () => await moveWhileWriting({ a, b, reference, size, blockSize, rounds, dir: localDir, rawDir, log }))
    await phase('metadata', async () => await metadataCost({ a, b, ...metadataOpts }))
    await phase('propagation', async () => await propagation({ a, b, dist: join(build, 'dist'), repeats: quick ? 5 : 20, log }))
    if (needsCluster) {
      await a.stop()
      await b.stop()
    }

    // The same two phases with nodes A and B on etcd: one etcd member on
    // loopback, its data directory in the temporary directory (the same
    // disk as everything else), started for these phases only.
    const etcdPhases = phases.filter((p) => p === 'metadata' || p === 'propagation' || p === 'migration')
    if (etcdPhases.length > 0) {
      const etcd = new BenchEtcd(join(tmp, 'etcd'), join(rawDir, 'etcd.log'))
      const prefix = 'ukai-bench'
      const node = (n, d) => new UkaiNode({ name: n, dir: join(tmp, d), metadataRoot: join(tmp, `${d}-metadata-unused`), cli, env: nodeEnv, metadataServers: etcd.servers, metadataPrefix: prefix })
      let ea, eb
      try {
        log('etcd: one member on 127.0.0.1 for the metadata and propagation phases on etcd')
        await etcd.start()
        const fsOf = (await run('findmnt', ['-n', '-o', 'FSTYPE,SOURCE', '-T', etcd.dataDir], { allowFail: true })).stdout.trim().replace(/\s+/, ' on ')
        results.meta.etcd = { version: info.versions.etcd, url: etcd.url, dataDir: etcd.dataDir, fs: fsOf, prefix }
        log(`  etcd ${info.versions.etcd} (pid ${etcd.pid}) at ${etcd.url}, data dir ${etcd.dataDir} (${fsOf})${/^tmpfs/.test(fsOf) ? ': tmpfs, its fsyncs cost nothing; not representative' : ''}`)
        ea = node('A-etcd', 'node-a-etcd')
        eb = node('B-etcd', 'node-b-etcd')
        await ea.configure()
        await eb.configure()
        log(`starting UKAI nodes A and B on etcd (${ea.id}, ${eb.id}; metadata_prefix ${prefix})`)
        await ea.start()
        await eb.start()
        await phase('metadata', async () => await metadataCost({ a: ea, b: eb, etcd, ...metadataOpts }), 'metadataEtcd', eb)
        await phase('propagation', async () => await propagation({ a: ea, b: eb, dist: join(build, 'dist'), repeats: quick ? 5 : 20, log }), 'propagationEtcd', eb)
        await phase('migration', async () => await migrationPause({ dist: join(build, 'dist'), tmp, rawDir, a: ea, b: eb, pairs: quick ? 1 : 3, log }), 'migration', eb)
      } catch (err) {
        log(`  etcd pair failed: ${err.message}`)
        for (const p of etcdPhases) {
          const k = p === 'migration' ? p : `${p}Etcd`
          if (results[k] === undefined) results[k] = { error: err.message }
        }
      } finally {
        await ea?.stop()
        await eb?.stop()
        await etcd.stop()
      }
    }
    await phase('memory', async () => {
      const c = new UkaiNode({ name: 'C', dir: join(tmp, 'node-c'), metadataRoot: join(tmp, 'metadata-c'), cli, env: nodeEnv })
      await c.configure()
      await c.start()
      try {
        return await peakRss({ node: c, images: 100, runtime: quick ? 2 : 10, rawDir, log })
      } finally {
        await c.stop()
      }
    })
    // Abusive NBD clients against a node of its own (no FUSE mount).
    await phase('abuse', async () => {
      const d = new UkaiNode({ name: 'D', dir: join(tmp, 'node-d'), metadataRoot: join(tmp, 'metadata-d'), cli, env: nodeEnv, mount: false })
      await d.configure()
      await d.start()
      try {
        return await abuse({ node: d, quick, rawDir, log })
      } finally {
        await d.stop()
      }
    })
    // Mutual TLS on the peer port against plain text, on two pairs of nodes of their own.
    await phase('tls', async () => await tlsCost({ tmp, cli, quick, rawDir, size: Math.min(size, 1024 * MIB), blockSize, log }))
  } finally {
    await cleanup()
    await keepOrRemove()
  }

  results.meta.durationMs = Date.now() - started
  await writeFile(join(rawDir, 'results.json'), JSON.stringify(results, null, 2) + '\n')
  if (values.profile === true) {
    log(`done in ${(results.meta.durationMs / 60000).toFixed(1)} min`)
    logFile.end()
    return 0
  }
  await writeReports(results, { pairs, workloads, rawDir, resultsDir, publish, log })
  log(`done in ${(results.meta.durationMs / 60000).toFixed(1)} min`)
  logFile.end()
  return 0
}

/**
 * latest.md, latest.svg (and latest.json) from the results: into the raw
 * directory always, into bench/results/ when `publish`.
 */
async function writeReports (results, { pairs, workloads, rawDir, resultsDir, publish, log }) {
  const { size } = results.meta
  const timing = { runtime: results.meta.runtime }
  const { rounds, quick } = results.meta
  const md = markdownReport(results)
  const svg = ratioChart({
    pairs,
    workloads,
    throughput: results.throughput ?? { pairs: {} },
    title: 'UKAI against its peers, same machine, same run',
    subtitle: `${results.meta.date}; ${fmtBytes(size)} warm in the page cache; fio ${timing.runtime} s runs, ${rounds} alternating pair(s)${quick ? '; QUICK run' : ''}`
  })
  await writeFile(join(rawDir, 'latest.md'), md)
  await writeFile(join(rawDir, 'latest.svg'), svg)
  if (publish) {
    await writeFile(join(resultsDir, 'latest.md'), md)
    await writeFile(join(resultsDir, 'latest.svg'), svg)
    await writeFile(join(resultsDir, 'latest.json'), JSON.stringify(stripFiles(results), null, 2) + '\n')
    log(`published bench/results/latest.md, latest.svg, latest.json`)
  } else {
    log(`partial or quick run: report in ${join(rawDir, 'latest.md')} (bench/results/latest.* left alone)`)
  }
  for (const v of verdicts(results)) log(`${v.met === undefined ? '  ?' : v.met ? ' ok' : 'MISS'}  ${v.what}: ${v.value} (target ${v.target})`)
}

/** The published JSON without paths into the (uncommitted) raw directory. */
function stripFiles (results) {
  return JSON.parse(JSON.stringify(results, (k, v) => (k === 'file' ? undefined : v)))
}

main().then((code) => { process.exitCode = code }, async (err) => {
  process.stderr.write(`bench: ${err.stack ?? err.message}\n`)
  await cleanup()
  process.exitCode = 1
})
