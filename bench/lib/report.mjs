/**
 * The Markdown report (`bench/results/latest.md`): when and where it ran,
 * how, the paired ratios with their spread, the absolute figures, the
 * measures beyond throughput, and every target met or missed.
 */
import { WORKLOADS } from './fio.mjs'
import { PAIRS, targetOf } from './throughput.mjs'
import { fmt, fmtBytes, fmtMs, fmtRatio, max, median, min } from './stats.mjs'

const YES = '✅ met'
const NO = '❌ missed'

/** Every target with its verdict: `{ what, target, value, met }` (met undefined: not measured). */
export function verdicts (r) {
  const out = []
  for (const p of PAIRS) {
    for (const w of WORKLOADS) {
      const t = targetOf(p, w)
      if (t === undefined) continue
      const e = r.throughput?.pairs?.[p.id]?.[w.id]
      const m = e === undefined || e.ratios.length === 0 ? NaN : median(e.ratios)
      out.push({ what: `${p.title}, ${w.label}`, target: t.text, value: fmtRatio(m), met: Number.isFinite(m) ? m >= t.min : undefined })
    }
  }
  if (r.resync?.rounds !== undefined) {
    const ratio = median(r.resync.rounds.map((x) => x.ukaiMiBps / x.cpMiBps))
    out.push({ what: 'full resync rate vs cp', target: '≥ 0.8×', value: fmtRatio(ratio), met: ratio >= 0.8 })
  } else out.push({ what: 'full resync rate vs cp', target: '≥ 0.8×', value: 'not measured', met: undefined })
  if (r.delta?.scenarios !== undefined) {
    for (const s of r.delta.scenarios) out.push({ what: `delta resync after an outage: ${s.label}`, target: '≤ 1.1× bytes written', value: fmtRatio(s.ratio), met: s.ratio <= 1.1 })
  } else out.push({ what: 'delta resync after an outage', target: '≤ 1.1× bytes written', value: 'not measured', met: undefined })
  if (r.move?.rounds !== undefined) {
    const stall = median(r.move.rounds.map((x) => x.addedStallMs))
    out.push({ what: 'added write stall during image move', target: '≤ 100 ms', value: fmtMs(stall), met: stall <= 100 })
  } else out.push({ what: 'added write stall during image move', target: '≤ 100 ms', value: 'not measured', met: undefined })
  for (const [md, where] of [[r.metadata, 'embedded file store'], [r.metadataEtcd, 'etcd']]) {
    const what = `one sync-state change persisted, ${where} (1 TiB image, 1 MiB blocks), median`
    if (md?.changeMs !== undefined) {
      const m = median(md.changeMs)
      out.push({ what, target: '< 10 ms', value: fmtMs(m), met: m < 10 })
    } else out.push({ what, target: '< 10 ms', value: 'not measured', met: undefined })
  }
  abuseVerdicts(out, r.abuse)
  tlsVerdicts(out, r.tls)
  return out
}

/** The tls phase's target: TLS / plain text on writes to two replicas, each write workload. */
function tlsVerdicts (out, t) {
  if (t?.rows === undefined) {
    out.push({ what: 'NBD 2 replicas, peers over mutual TLS / plain text, writes', target: '≥ 0.9×', value: 'not measured', met: undefined })
    return
  }
  for (const row of t.rows.filter((x) => x.write)) {
    const m = median(row.ratios)
    out.push({ what: `peers over mutual TLS / plain text, ${row.label}`, target: `≥ ${t.target.min}×`, value: fmtRatio(m), met: m >= t.target.min })
  }
}

/** The tls phase's rows (results of bench/lib/tls.mjs). */
function tlsRows (L, t) {
  if (t?.rows === undefined) {
    L.push(`| peers over mutual TLS | not measured: ${esc1(t?.error)} | | | |`)
    return
  }
  for (const row of t.rows) {
    const f = (xs) => `${fmt(median(xs))} ${row.unit} (${fmt(min(xs))}–${fmt(max(xs))})`
    L.push(`| UKAI NBD, ${row.label}: peers over mutual TLS vs plain text (${t.rounds} alternating pairs of ${t.runtime} s, ${fmtBytes(t.size)} image) | TLS ${f(row.tls)} | plain ${f(row.plain)} | ${fmtRatio(median(row.ratios))} (${min(row.ratios).toFixed(2)}–${max(row.ratios).toFixed(2)}) | ${row.write ? `≥ ${t.target.min}×: ${median(row.ratios) >= t.target.min ? YES : NO}` : ''} |`)
  }
}

/** The abuse phase's two targets, judged on the worst scenario. */
function abuseVerdicts (out, a) {
  const rssWhat = `node RSS growth with ${a?.abusers ?? 20} abusive NBD clients (worst scenario)`
  const readWhat = 'a well-behaved client\'s 4 KiB read during the abuse (max of every read, worst scenario)'
  if (a?.scenarios === undefined) {
    out.push({ what: rssWhat, target: '≤ 256 MiB', value: 'not measured', met: undefined })
    out.push({ what: readWhat, target: '≤ 100 ms', value: 'not measured', met: undefined })
    return
  }
  const growth = max(a.scenarios.map((s) => s.rssGrowth))
  out.push({ what: rssWhat, target: `≤ ${fmtBytes(a.targets.rssGrowthBytes)}`, value: fmtBytes(growth), met: growth <= a.targets.rssGrowthBytes })
  const failed = a.scenarios.filter((s) => s.readMs === undefined)
  const worst = failed.length > 0 ? Infinity : max(a.scenarios.flatMap((s) => s.readMs))
  out.push({ what: readWhat, target: `≤ ${a.targets.goodReadMs} ms`, value: failed.length > 0 ? `no answer (${failed.map((s) => s.kind).join(', ')})` : fmtMs(worst), met: worst <= a.targets.goodReadMs })
}

const verdictText = (v) => v.met === undefined ? 'not measured' : v.met ? YES : NO

function ratioCell (e, w, p) {
  if (e === undefined) return 'not run'
  if (e.ratios.length === 0) return `failed${e.error !== undefined ? '¹' : ''}`
  const m = median(e.ratios)
  const t = targetOf(p, w)
  const mark = t === undefined ? '' : m >= t.min ? ' ✅' : ' ❌'
  return `**${fmtRatio(m)}** (${min(e.ratios).toFixed(2)}–${max(e.ratios).toFixed(2)})${mark}`
}

/** All runs of one target on one workload, wherever it appeared (limit or any pair). */
function runsOf (thr, targetId, workloadId) {
  const runs = []
  if (targetId === 'local') runs.push(...(thr.limit?.[workloadId]?.runs ?? []))
  for (const p of PAIRS) {
    const e = thr.pairs?.[p.id]?.[workloadId]
    if (e === undefined) continue
    if (p.a === targetId) runs.push(...e.a)
    if (p.b === targetId) runs.push(...e.b)
  }
  return runs
}

export const TARGET_LABELS = {
  local: 'local file (page cache, the limit)',
  bindfs: 'bindfs -o big_writes (FUSE peer)',
  'qemu-nbd': 'qemu-nbd (NBD peer)',
  nbdkit: 'nbdkit file (NBD peer)',
  'nbdkit-chain': 'nbdkit nbd → nbdkit file (two NBD hops)',
  'ukai-fuse': 'UKAI FUSE, 1 replica',
  'ukai-nbd': 'UKAI NBD, 1 replica',
  'ukai-nbd-2': 'UKAI NBD, 2 replicas (local + node B)',
  'ukai-nbd-remote': 'UKAI NBD, only replica on node B',
  'rbd-2': 'Ceph RBD, pool size 2 (fio rbd engine)',
  'rbd-1': 'Ceph RBD, pool size 1 (fio rbd engine)'
}

/**
 * @param {any} r the results (see bench.mjs)
 */
export function markdownReport (r) {
  const m = r.meta
  const L = []
  const thr = r.throughput
  L.push('# UKAI benchmark results', '')
  L.push(`Measured ${m.date} (${m.quick ? 'QUICK development run: not representative' : 'full run'}; the whole run took ${(m.durationMs / 60000).toFixed(1)} min). ` +
    'Generated by `npm run bench`; method and analysis in [bench/README.md](../README.md).', '')
  L.push('## Machine', '')
  for (const [k, v] of Object.entries(m.machine)) L.push(`- ${k}: ${v}`)
  L.push(`- UKAI under test: ${m.ukai}`)
  if (m.ceph !== undefined) {
    L.push(m.ceph.error !== undefined
      ? `- Ceph RBD peer: not run: ${esc1(m.ceph.error)}`
      : `- Ceph RBD peer: Ceph ${m.ceph.version}, one monitor, one manager and two BlueStore OSDs on 127.0.0.1 (cephx), started for the throughput phase; pools ${m.ceph.pools.map((p) => `${p.pool} (size ${p.size}, 32 PGs)`).join(', ')}, one image each holding the reference bytes (\`rbd import\`); OSD block files in ${m.ceph.blockDir} (${m.ceph.blockFs}), BlueStore cache ${fmtBytes(m.ceph.cacheBytes)} per OSD (LRU, for ${fmtBytes(m.ceph.storedPerOsd)} stored per OSD); fio's rbd engine with the RBD cache in writeback mode. BlueStore data cache before each workload: ${(m.ceph.warm ?? []).map((x) => `${x.workload} ${fmtBytes(x.cached)}`).join(', ') || 'n/a'}. Setup: bench/README.md, "Ceph RBD".`)
  }
  if (m.etcd !== undefined) {
    L.push(`- etcd (metadata and propagation phases on etcd): ${m.etcd.version}, one member on ${m.etcd.url} with etcd's defaults (the WAL fsynced on every commit), data directory ${m.etcd.dataDir} (${m.etcd.fs}${/^tmpfs/.test(m.etcd.fs ?? '') ? ': tmpfs, fsyncs cost nothing, not representative' : ', the same disk as the block files and the embedded store'}); nodes A and B of that pair with \`metadata_servers\` on it, \`metadata_prefix\` ${m.etcd.prefix}`)
  }
  L.push('')
  L.push('## Method', '')
  L.push(`- Data: one reference file of ${fmtBytes(m.size)} of random bytes; UKAI images of the same size (${fmtBytes(m.blockSize)} blocks) hold the same bytes in their block files. All of it lives on ${m.fs}.`)
  L.push(`- Warm page cache: every data file (the reference file, every block file of every node) is in the page cache, filled the same way for every target: written in 64 KiB writes (a file cached by reading, or by 16 MiB writes, is held in large folios on this kernel's ext4, where a 4 KiB write costs ~40 µs under the file's lock); before each workload fincore(1) checked residency, and a file that had lost pages was dropped from the cache and written again. Residency before each workload: ${(m.warm ?? []).map((x) => `${x.workload} ${(x.resident / x.size * 100).toFixed(1)}% of ${fmtBytes(x.size)}${x.rewarmed ? ' (rewritten)' : ''}`).join(', ') || 'n/a'}.`)
  L.push(`- fio ${m.versions.fio}: ${m.runtime} s per run after ${m.ramp} s of ramp (not counted), one job, \`--norandommap --randrepeat=1\`; sequential read/write \`bs=1M iodepth=4\`; random read/write \`bs=4k iodepth=16\`. Files: \`ioengine=libaio\`, the local file through the page cache (\`direct=0\`), FUSE files with O_DIRECT (\`direct=1\`, as a hypervisor with \`cache=none\`; every request reaches the FUSE daemon, whose backing files are warm). NBD targets: fio's \`nbd\` engine (libnbd) on a unix socket. Writes are not fsynced; sync(1) runs before every run so none pays for the previous one's dirty pages.`)
  if (r.metadata !== undefined || r.metadataEtcd !== undefined || r.propagation !== undefined || r.propagationEtcd !== undefined) {
    L.push('- Metadata and propagation: measured twice, with nodes A and B sharing the embedded store (one metadata_root, one shard file per image) and with a second pair A and B on the etcd above (`metadata_servers`), never both pairs at once. Changes are made in the benchmark process with the store code of the build under test, on the pair\'s backend, while both nodes watch it; each figure comes with simpler cross-checks of the same cost. What each row measures: bench/README.md, "Beyond throughput".')
  }
  L.push(`- Fairness: each UKAI figure is paired with its peer in alternating runs (A B A B …, ${m.rounds} pair${m.rounds === 1 ? '' : 's'}); the figure is the median of the per-pair ratios A/B, with their min–max. The peers serve the same reference file; all servers run during all workloads (idle when not measured).`)
  L.push('')
  L.push('## Throughput: UKAI / peer', '')
  L.push('Median ratio of paired runs (min–max of the ratios); ✅/❌: target met/missed. Ratios above 1 mean UKAI is faster.', '')
  L.push(`| pair | target | ${WORKLOADS.map((w) => w.label).join(' | ')} |`)
  L.push(`| --- | --- | ${WORKLOADS.map(() => '---').join(' | ')} |`)
  const failures = []
  for (const p of PAIRS) {
    const cells = WORKLOADS.map((w) => {
      const e = thr?.pairs?.[p.id]?.[w.id]
      if (e?.error !== undefined) failures.push(`${p.title}, ${w.label}: ${e.error}`)
      return ratioCell(e, w, p)
    })
    L.push(`| ${p.title} | ${p.target?.text ?? '—'} | ${cells.join(' | ')} |`)
  }
  L.push('')
  if (failures.length > 0) {
    L.push('¹ Runs that failed:', '')
    for (const f of [...new Set(failures)]) L.push(`- ${f.replace(/\n/g, ' ').slice(0, 400)}`)
    L.push('')
  }
  L.push('![ratios](latest.svg)', '')
  L.push('## Absolute figures', '')
  L.push('Median of every run of the target on the workload (min–max), MiB/s for sequential, IOPS for random; p99 completion latency of the median run.', '')
  L.push(`| target | runs | ${WORKLOADS.map((w) => `${w.label} (${w.unit})`).join(' | ')} |`)
  L.push(`| --- | --- | ${WORKLOADS.map(() => '---').join(' | ')} |`)
  for (const [id, label] of Object.entries(TARGET_LABELS)) {
    let nruns = 0
    const cells = WORKLOADS.map((w) => {
      const runs = runsOf(thr ?? {}, id, w.id)
      nruns = Math.max(nruns, runs.length)
      if (runs.length === 0) return 'n/a'
      const vals = runs.map((x) => x.value)
      const med = median(vals)
      const closest = runs.reduce((a, b) => Math.abs(b.value - med) < Math.abs(a.value - med) ? b : a)
      return `${fmt(med)} (${fmt(min(vals))}–${fmt(max(vals))}), p99 ${fmtMs(closest.latP99us / 1000)}`
    })
    L.push(`| ${label} | ${nruns} | ${cells.join(' | ')} |`)
  }
  L.push('')
  L.push('## Beyond throughput', '')
  L.push('| measure | UKAI | reference | ratio | target |')
  L.push('| --- | --- | --- | --- | --- |')
  const v = verdicts(r)
  const find = (prefix) => v.find((x) => x.what.startsWith(prefix))
  if (r.resync?.rounds !== undefined) {
    const rs = r.resync.rounds
    const u = rs.map((x) => x.ukaiMiBps)
    const c = rs.map((x) => x.cpMiBps)
    const cs = rs.map((x) => x.cpSyncMiBps)
    const ratio = rs.map((x) => x.ukaiMiBps / x.cpMiBps)
    const ratioS = rs.map((x) => x.ukaiMiBps / x.cpSyncMiBps)
    L.push(`| full resync of a fully out-of-sync ${fmtBytes(m.size)} replica (node A → node B, ${rs.length} alternating pair${rs.length === 1 ? '' : 's'}) | ${fmt(median(u))} MiB/s (${fmt(min(u))}–${fmt(max(u))}) | \`cp\` ${fmt(median(c))} MiB/s (${fmt(min(c))}–${fmt(max(c))}); \`cp\` + fsync ${fmt(median(cs))} MiB/s | ${fmtRatio(median(ratio))} of cp (${min(ratio).toFixed(2)}–${max(ratio).toFixed(2)}); ${fmtRatio(median(ratioS))} of cp + fsync | ≥ 0.8× cp: ${verdictText(find('full resync'))} |`)
  } else L.push(`| full resync | not measured: ${esc1(r.resync?.error)} | | | ≥ 0.8× cp |`)
  if (r.delta?.scenarios !== undefined) {
    for (const s of r.delta.scenarios) {
      L.push(`| delta resync after node B's outage, ${s.label} (${fmtBytes(r.delta.blockSize)} blocks) | copied ${fmtBytes(s.copied)} (${s.blocksOutOfSync} block(s) out of sync) in ${fmtMs(s.ms)} | written during the outage: ${fmtBytes(s.written)} | ${fmtRatio(s.ratio)} | ≤ 1.1×: ${verdictText(v.find((x) => x.what.endsWith(s.label)))} |`)
    }
  } else L.push(`| delta resync | not measured: ${esc1(r.delta?.error)} | | | ≤ 1.1× |`)
  if (r.move?.rounds !== undefined) {
    const rs = r.move.rounds
    const rate = rs.map((x) => x.moveMiBps)
    const ratio = rs.map((x) => x.moveMiBps / x.cpMiBps)
    const stall = rs.map((x) => x.addedStallMs)
    L.push(`| image move of ${fmtBytes(m.size)} while a writer writes it (fio, random 4 KiB, QD1, 200/s, on the destination's NBD; ${rs.length} round${rs.length === 1 ? '' : 's'}, alternating direction) | ${fmt(median(rate))} MiB/s (${fmt(min(rate))}–${fmt(max(rate))}); slowest write ${fmtMs(median(rs.map((x) => x.during.maxMs)))}, p99 ${fmtMs(median(rs.map((x) => x.during.p99Ms)))} | \`cp\` ${fmt(median(rs.map((x) => x.cpMiBps)))} MiB/s; the writer alone: slowest ${fmtMs(median(rs.map((x) => x.alone.maxMs)))}, p99 ${fmtMs(median(rs.map((x) => x.alone.p99Ms)))} | ${fmtRatio(median(ratio))} of cp; added stall ${fmtMs(median(stall))} (${fmtMs(min(stall))}–${fmtMs(max(stall))}) | stall ≤ 100 ms: ${verdictText(find('added write stall'))} |`)
  } else L.push(`| image move while written | not measured: ${esc1(r.move?.error)} | | | stall ≤ 100 ms |`)
  metadataRows(L, r.metadata, 'embedded file store', find('one sync-state change persisted, embedded'))
  metadataRows(L, r.metadataEtcd, 'etcd', find('one sync-state change persisted, etcd'))
  propagationRows(L, r.propagation, 'embedded file store')
  propagationRows(L, r.propagationEtcd, 'etcd, over its watches')
  migrationRows(L, r.migration)
  if (r.memory?.peakRss !== undefined) {
    const mm = r.memory
    L.push(`| peak RSS of a node serving ${mm.images} open images (1 GiB each, NBD, random 4 KiB I/O on all at once; ${mm.openMax} open at the same time) | ${fmtBytes(mm.peakRss)} (VmHWM) | idle node: ${fmtBytes(mm.idleRss)}; with the images created, closed: ${fmtBytes(mm.createdRss)} | ${fmtBytes((mm.peakRss - mm.idleRss) / mm.images)} per open image | |`)
  } else L.push(`| peak RSS, 100 open images | not measured: ${esc1(r.memory?.error)} | | | |`)
  abuseRows(L, r.abuse, v)
  tlsRows(L, r.tls)
  L.push('')
  L.push('## Targets', '')
  L.push('| target | measured | verdict |')
  L.push('| --- | --- | --- |')
  for (const x of v) L.push(`| ${x.what}: ${x.target} | ${x.value} | ${verdictText(x)} |`)
  L.push('')
  L.push(`Met: ${v.filter((x) => x.met === true).length}; missed: ${v.filter((x) => x.met === false).length}; not measured: ${v.filter((x) => x.met === undefined).length}. What limits each missed target and what would lift it: [bench/README.md](../README.md#targets-missed-what-limits-them).`)
  L.push('')
  return L.join('\n')
}

/** The metadata cost rows of one backend (results of bench/lib/metadata.mjs metadataCost). */
function metadataRows (L, md, where, verdict) {
  if (md?.createMs === undefined) {
    L.push(`| metadata cost, ${where} | not measured: ${esc1(md?.error)} | | | < 10 ms per sync-state change |`)
    return
  }
  const keys = (k) => k === undefined ? '' : `${k.count} keys, ${fmtBytes(k.bytes)} of keys + values (${k.bytes} bytes), largest ${fmtBytes(k.largest)}`
  L.push(`| 1 TiB image, 1 MiB blocks (${md.blocks.toLocaleString('en-US')} blocks, 2 locations), ${where}: creation through node A's API | ${fmtMs(median(md.createMs))} (${fmtMs(min(md.createMs))}–${fmtMs(max(md.createMs))}, ${md.createMs.length} runs) | | | |`)
  const stored = md.keys === undefined ? `${fmtBytes(md.storedBytes)} (${md.storedBytes} bytes)` : keys(md.keys) + (md.shardFileBytes !== undefined ? `; shard file ${fmtBytes(md.shardFileBytes)}` : '')
  L.push(`| … bytes stored | ${stored} | the original's per-block JSON: ${fmtBytes(md.seedBytes)}${md.seedMs !== undefined ? `, exported in ${fmtMs(md.seedMs)}` : ''} | ${fmt(md.seedBytes / md.storedBytes)}× smaller | |`)
  // Results of runs before the metadata core (one JSON file per image) carry no backend.
  const how = md.backend === 'etcd' ? 'one range read + one etcd transaction, committed with its WAL fsync'
    : md.backend === 'file' ? 'read + one shard file replaced: write, fsync, rename, directory fsync' : 'update + fsync + rename + directory fsync of the image\'s file'
  L.push(`| … one sync-state change persisted (\`MetadataStore.update\`: ${how})${md.backend === undefined ? '' : ', back to back while nodes A and B re-read the last one'} | median ${fmtMs(median(md.changeMs))}, max ${fmtMs(max(md.changeMs))} (${md.changeMs.length} changes) | | | < 10 ms median: ${verdictText(verdict ?? { met: undefined })} |`)
  if (md.cpuPerChangeMs !== undefined) {
    const total = Object.values(md.cpuPerChangeMs).reduce((x, y) => x + y, 0)
    L.push(`| … CPU time per back-to-back change, from /proc (${md.cpus} CPUs; ${fmtMs(md.wallPerChangeMs)} of wall time per change) | ${Object.entries(md.cpuPerChangeMs).map(([k, v]) => `${k} ${fmtMs(v)}`).join(', ')}; ${fmtMs(total)} in all | | | |`)
  }
  if (md.spacedChangeMs !== undefined) {
    L.push(`| … the same, each change ${md.spacingMs} ms after the last (the nodes idle) | median ${fmtMs(median(md.spacedChangeMs))}, max ${fmtMs(max(md.spacedChangeMs))} (${md.spacedChangeMs.length} changes) | | | |`)
  }
  const fk = md.fragmentedKeys === undefined ? `${fmtBytes(md.fragmentedBytes)} stored` : keys(md.fragmentedKeys) + (md.fragmentedShardFileBytes !== undefined ? `; shard file ${fmtBytes(md.fragmentedShardFileBytes)}` : '')
  const spacedF = md.fragmentedSpacedChangeMs === undefined ? '' : `; spaced: median ${fmtMs(median(md.fragmentedSpacedChangeMs))}, max ${fmtMs(max(md.fragmentedSpacedChangeMs))}`
  L.push(`| … the same with 10,000 scattered out-of-sync blocks (${fk}) | back to back: median ${fmtMs(median(md.fragmentedChangeMs))}, max ${fmtMs(max(md.fragmentedChangeMs))} (${md.fragmentedChangeMs.length} changes)${spacedF} | | | |`)
  if (typeof md.etcd === 'string') L.push(`| … etcd backend | ${md.etcd} | | | |`)
  const c = md.crossCheck
  if (c !== undefined) {
    const parts = []
    if (c.unwatchedChangeMs !== undefined) parts.push(`the same back-to-back changes of the same image where no node watches (${md.backend === 'etcd' ? 'another metadata_prefix on the same etcd' : 'another metadata_root on the same disk'}): median ${fmtMs(median(c.unwatchedChangeMs))}, max ${fmtMs(max(c.unwatchedChangeMs))}${c.unwatchedWriterCpuMs !== undefined ? `, the writer's CPU time ${fmtMs(c.unwatchedWriterCpuMs)} per change` : ''}`)
    parts.push(`one bare put of a ${fmtBytes(c.valueBytes)} value through the core (no read, no compare): median ${fmtMs(median(c.barePutMs))}, max ${fmtMs(max(c.barePutMs))}`)
    if (c.rawFsyncMs !== undefined) parts.push(`raw write + fsync + rename + directory fsync in the same directory: median ${fmtMs(median(c.rawFsyncMs))}`)
    if (c.walFsync !== undefined) parts.push(`etcd's own WAL fsyncs during the ${c.walFsync.changes} timed changes: ${c.walFsync.count}, mean ${fmtMs(c.walFsync.meanMs)}`)
    if (c.gatewayPutMs !== undefined) parts.push(`put through etcd's JSON gateway (plain HTTP, no UKAI code): median ${fmtMs(median(c.gatewayPutMs))}, a read the same way ${fmtMs(median(c.gatewayRangeMs))}`)
    if (c.etcdctlPutMs !== undefined) parts.push(`\`etcdctl put\` loop: median ${fmtMs(median(c.etcdctlPutMs))}, \`etcdctl get\` loop ${fmtMs(median(c.etcdctlGetMs))} (each a new process, whose start dominates; difference ${fmtMs(median(c.etcdctlPutMs) - median(c.etcdctlGetMs))}: the commit is within that noise)`)
    L.push(`| … cross-check of the change's cost (${c.barePutMs.length} runs of each simpler measure) | ${parts.join('; ')} | | | |`)
  }
}

/** The propagation rows of one backend (results of bench/lib/metadata.mjs propagation). */
function propagationRows (L, p, where) {
  if (p?.appear === undefined) {
    L.push(`| propagation, ${where} | not measured: ${esc1(p?.error)} | | | |`)
    return
  }
  const a = p.appear.map((x) => x.afterRequestMs)
  const aa = p.appear.map((x) => x.afterAckMs)
  const d = p.vanish.map((x) => x.afterRequestMs)
  L.push(`| propagation node A → node B, ${where}: image created through A's API until B's mount serves it (${a.length} runs) | median ${fmtMs(median(a))}, max ${fmtMs(max(a))} from the request (${fmtMs(median(aa))} after A's answer) | | | |`)
  L.push(`| … image destroyed through A until B's mount stops serving it | median ${fmtMs(median(d))}, max ${fmtMs(max(d))} | | | |`)
  const s = p.syncState?.changes
  if (s !== undefined && s.length > 0) {
    const req = s.map((x) => x.afterRequestMs)
    const f = (xs) => `median ${fmtMs(median(xs))}, max ${fmtMs(max(xs))}`
    const after = s.map((x) => x.afterAckMs)
    const afterTxt = median(after) <= 0 ? `B had it before the writer's own call returned in most changes: ${f(after)} after it returned` : `${f(after)} after the update returned`
    L.push(`| … sync-state change made through the store (as the writer does) until B's volume uses it (B's reads of the block switch replica; ${s.length} changes, out of sync and back) | ${f(req)} from the update's start, the update itself ${f(s.map((x) => x.updateMs))}; ${afterTxt}; not before ${fmtMs(median(s.map((x) => x.appliedAfterRequestMinMs)))} (median; resolution one read through B, ${fmtMs(median(s.map((x) => x.readMs)))}) | checks: the next read counted against the expected replica in B's own I/O statistics ${p.syncState.statsOk ?? 'n/a'} of ${s.length} times; B's \`refresh {revision}\` answered at the change's revision or later ${p.syncState.refreshOk} of ${s.length} times (median ${fmtMs(median(s.map((x) => x.refreshMs)))}) | | |`)
  } else if (p.syncState?.error !== undefined) {
    L.push(`| … sync-state change until B's volume uses it | not measured: ${esc1(p.syncState.error)} | | | |`)
  }
}

function migrationRows (L, mg) {
  if (mg?.ukaiSummary === undefined) {
    L.push(`| live migration's added pause | not measured: ${esc1(mg?.error)} | | | |`)
    return
  }
  const u = mg.ukaiSummary
  const q = mg.peerSummary
  const range = (xs, k) => { const v = xs.map((x) => x[k]).filter((x) => x !== undefined); return v.length === 0 ? '' : ` (${fmtMs(min(v))}–${fmtMs(max(v))})` }
  L.push(`| live migration of a guest VM while it writes (QEMU TCG, 4 KiB O_DIRECT writes read back; two nodes on etcd, each QEMU on its node's NBD export; ${mg.ukai.length} migrations A ⇄ B): the guest-visible stall, the longest gap between two of its rounds around the handover | median ${fmtMs(u.stallMs)}${range(mg.ukai, 'stallMs')}; a normal round ${fmtMs(u.typicalGapMs)} | both QEMUs on one \`qemu-nbd --shared=2\` export of a raw file (${mg.peer.length} migrations): median ${fmtMs(q.stallMs)}${range(mg.peer, 'stallMs')}; a normal round ${fmtMs(q.typicalGapMs)} | ${fmtRatio(u.stallMs / q.stallMs)} of qemu-nbd's | |`)
  L.push(`| … QEMU's downtime and total time; UKAI's takeover of the writer lease (the destination's first write: grant, fences, reconciliation) | UKAI: downtime ${fmtMs(u.downtimeMs)}, total ${fmtMs(u.totalTimeMs)}, takeover ${fmtMs(u.takeoverMs)}${range(mg.ukai, 'takeoverMs')} | qemu-nbd: downtime ${fmtMs(q.downtimeMs)}, total ${fmtMs(q.totalTimeMs)} | | |`)
}

const ABUSE_LABELS = {
  'read-flood': 'each pipelines 400 READs of 32 MiB and never reads a reply',
  'write-flood': 'each pipelines 32 MiB WRITEs (an image of its own each) as fast as its socket takes them, never reading a reply',
  disconnect: 'each sends 84 KB of READ headers (3000 READs of 32 MiB) and disconnects, again and again'
}

/** The abuse phase's rows (results of bench/lib/abuse.mjs). */
function abuseRows (L, a, v) {
  if (a?.scenarios === undefined) {
    L.push(`| abusive NBD clients | not measured: ${esc1(a?.error)} | | | |`)
    return
  }
  const lat = (xs) => xs === undefined ? 'n/a' : `median ${fmtMs(median(xs))}, max ${fmtMs(max(xs))}`
  const hs = (xs) => xs.some((x) => !Number.isFinite(x)) ? `not done in 30 s${xs.length > 1 ? ` (after ${xs.length - 1} done: ${lat(xs.filter(Number.isFinite))})` : ''}` : lat(xs)
  const rssV = v.find((x) => x.what.startsWith('node RSS growth'))
  const readV = v.find((x) => x.what.startsWith('a well-behaved client'))
  L.push(`| idle node, the reference for the rows below: a well-behaved client's 4 KiB reads (${a.reads}, one after the other) and a new client's connect + handshake (${a.idle.handshakeMs.length}) | reads ${lat(a.idle.readMs)}; handshake ${lat(a.idle.handshakeMs)} | RSS ${fmtBytes(a.idle.rss)} | | RSS growth ≤ ${fmtBytes(a.targets.rssGrowthBytes)}: ${verdictText(rssV)}; read ≤ ${a.targets.goodReadMs} ms: ${verdictText(readV)} |`)
  for (const s of a.scenarios) {
    const reads = s.readMs === undefined ? `no answer: ${esc1(s.readError)}` : lat(s.readMs)
    L.push(`| ${a.abusers} abusive NBD clients, ${s.kind}: ${ABUSE_LABELS[s.kind] ?? s.kind} (${s.abuseSeconds.toFixed(1)} s) | RSS +${fmtBytes(s.rssGrowth)} (${s.hwmReset ? 'VmHWM reset before' : 'VmRSS sampled'}, from ${fmtBytes(s.rssBefore)}); the well-behaved client's reads ${reads}; new handshakes ${hs(s.handshakeMs)} | node CPU ${s.cpuDuringAbuse.toFixed(2)} s during the abuse, ${s.cpuAfterLeft.toFixed(2)} s in the 3 s after the clients left${s.busyAfterLeftSeconds === undefined ? '' : `; then busy (20% of a CPU or more in a second) ${s.stillBusy === true ? 'for more than' : 'for'} ${s.busyAfterLeftSeconds} s`} | reads ${s.readMs === undefined ? 'n/a' : fmtRatio(median(s.readMs) / median(a.idle.readMs))} of idle (median) | |`)
  }
}

function esc1 (s) {
  return String(s ?? 'not run').replace(/\|/g, '\\|').replace(/\n/g, ' ').slice(0, 300)
}
