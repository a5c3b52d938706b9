/**
 * CPU profiles of the UKAI node during a workload: node A (and, for the
 * remote replica, node B too) is restarted under `node --cpu-prof`, fio
 * runs one workload, the node is stopped with SIGTERM and V8 writes the
 * profile as it exits. Each profile becomes a flame graph and a table of
 * the heaviest functions and files by self time.
 */
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { analyseProfile } from '../flame.mjs'
import { populateBlocks } from './data.mjs'
import { runFio } from './fio.mjs'
import { run } from './proc.mjs'

async function newestProfile (dir) {
  const files = (await readdir(dir)).filter((f) => f.endsWith('.cpuprofile')).sort()
  if (files.length === 0) throw new Error(`no .cpuprofile in ${dir}: the node did not exit cleanly`)
  return join(dir, files[files.length - 1])
}

/**
 * @param {{ a: import('./ukai.mjs').UkaiNode, b: import('./ukai.mjs').UkaiNode,
 *   targets: Record<string, import('./targets.mjs').Target>, which: string[],
 *   workloads: import('./fio.mjs').Workload[], timing: { runtime: number, ramp: number },
 *   rawDir: string, outDir: string, log: (s: string) => void }} o
 */
export async function profileRuns (o) {
  await mkdir(o.outDir, { recursive: true })
  const results = []
  for (const targetId of o.which) {
    const t = o.targets[targetId]
    if (t === undefined) continue
    const nodes = targetId === 'ukai-nbd-remote' || targetId === 'ukai-nbd-2' ? [o.a, o.b] : [o.a]
    for (const w of o.workloads) {
      const dirs = nodes.map((n) => join(o.rawDir, 'profiles', `${targetId}-${w.id}-${n.name}`))
      for (const [i, n] of nodes.entries()) {
        await mkdir(dirs[i], { recursive: true })
        await n.stop()
        await n.start({ cpuProfDir: dirs[i], log: join(dirs[i], 'server.log') })
      }
      await run('sync', [])
      let fio
      try {
        fio = await runFio(w, t.fio, o.timing, join(o.rawDir, `profile-${targetId}-${w.id}.json`))
      } finally {
        for (const n of nodes) { await n.stop(); await n.start() }
      }
      for (const [i, n] of nodes.entries()) {
        const prof = await newestProfile(dirs[i])
        const svgName = `flame-${targetId}-${w.id}${nodes.length > 1 ? `-${n.name}` : ''}.svg`
        const title = `node ${n.name} during ${w.label} through ${t.label}: ${fio.value.toFixed(w.unit === 'IOPS' ? 0 : 1)} ${w.unit}`
        const a = await analyseProfile(prof, join(o.outDir, svgName), title)
        const busy = a.tree.samples - (a.functions.find((f) => f.name === '(idle)')?.self ?? 0)
        results.push({
          target: targetId,
          workload: w.id,
          node: n.name,
          value: fio.value,
          unit: w.unit,
          svg: svgName,
          samples: a.tree.samples,
          busyPct: busy / a.tree.samples * 100,
          functions: a.functions.slice(0, 15).map((f) => ({ ...f, pct: f.self / a.tree.samples * 100 })),
          files: a.files.slice(0, 10).map((f) => ({ ...f, pct: f.self / a.tree.samples * 100 }))
        })
        o.log(`  profile ${targetId} ${w.id} node ${n.name}: ${fio.value.toFixed(0)} ${w.unit}, busy ${(busy / a.tree.samples * 100).toFixed(0)}% -> ${svgName}`)
      }
    }
  }
  return results
}

/**
 * Profiles a full resync: an image on node A gets a fully out-of-sync
 * replica on node B, both nodes run under --cpu-prof, `ukai sync` copies
 * it, both stop.
 * @param {{ a: import('./ukai.mjs').UkaiNode, b: import('./ukai.mjs').UkaiNode, reference: string, size: number,
 *   blockSize: number, rawDir: string, outDir: string, log: (s: string) => void }} o
 */
export async function profileResync (o) {
  await mkdir(o.outDir, { recursive: true })
  const image = 'resync-profile'
  await o.a.api('POST', '/v1/images', { name: image, size: o.size, block_size: o.blockSize, locations: [o.a.id] })
  await populateBlocks(o.reference, o.a.imageRoot, image, o.blockSize)
  await o.a.api('POST', `/v1/images/${image}/locations`, { location: o.b.id })
  const nodes = [o.a, o.b]
  const dirs = nodes.map((n) => join(o.rawDir, 'profiles', `resync-${n.name}`))
  for (const [i, n] of nodes.entries()) {
    await mkdir(dirs[i], { recursive: true })
    await n.stop()
    await n.start({ cpuProfDir: dirs[i], log: join(dirs[i], 'server.log') })
  }
  await run('sync', [])
  const t0 = performance.now()
  let res
  try {
    res = await o.a.sync(image)
  } finally {
    for (const n of nodes) { await n.stop(); await n.start() }
  }
  const mibps = res.bytes / 2 ** 20 / ((performance.now() - t0) / 1000)
  await o.a.api('DELETE', `/v1/images/${image}`)
  const out = []
  for (const [i, n] of nodes.entries()) {
    const prof = await newestProfile(dirs[i])
    const svgName = `flame-resync-${n.name}.svg`
    const a = await analyseProfile(prof, join(o.outDir, svgName), `node ${n.name} during a full resync of ${res.bytes} bytes (A -> B): ${mibps.toFixed(0)} MiB/s`)
    const busy = a.tree.samples - (a.functions.find((f) => f.name === '(idle)')?.self ?? 0)
    out.push({
      target: 'resync',
      workload: 'full resync',
      node: n.name,
      value: mibps,
      unit: 'MiB/s',
      svg: svgName,
      samples: a.tree.samples,
      busyPct: busy / a.tree.samples * 100,
      functions: a.functions.slice(0, 15).map((f) => ({ ...f, pct: f.self / a.tree.samples * 100 })),
      files: a.files.slice(0, 10).map((f) => ({ ...f, pct: f.self / a.tree.samples * 100 }))
    })
    o.log(`  profile resync node ${n.name}: ${mibps.toFixed(0)} MiB/s, busy ${(busy / a.tree.samples * 100).toFixed(0)}% -> ${svgName}`)
  }
  return out
}

/**
 * The profiles' README: per profile, the top functions and files by self
 * time. Profiles of earlier runs are kept (profiles.json) unless this run
 * made the same one again, so a run of a subset (`--targets resync`)
 * adds to the page instead of replacing it.
 */
export async function writeProfileReport (dir, profiles, header, date) {
  const store = join(dir, 'profiles.json')
  const key = (p) => `${p.target}/${p.workload}/${p.node}`
  let all = []
  try { all = JSON.parse(await readFile(store, 'utf8')) } catch {}
  const fresh = new Set(profiles.map(key))
  all = [...all.filter((p) => !fresh.has(key(p))), ...profiles.map((p) => ({ ...p, date }))]
  const order = ['ukai-nbd', 'ukai-fuse', 'ukai-nbd-2', 'ukai-nbd-remote', 'resync']
  const wl = ['seqread', 'seqwrite', 'randread', 'randwrite']
  all.sort((x, y) => (order.indexOf(x.target) - order.indexOf(y.target)) || (wl.indexOf(x.workload) - wl.indexOf(y.workload)) || x.node.localeCompare(y.node))
  await writeFile(store, JSON.stringify(all, null, 2) + '\n')
  const L = ['# CPU profiles of the UKAI node', '', header, '']
  for (const p of all) {
    L.push(`## ${p.target}, ${p.workload}, node ${p.node}: ${p.value.toFixed(p.unit === 'IOPS' ? 0 : 1)} ${p.unit}`, '')
    L.push(`Profiled ${p.date}. Flame graph: [${p.svg}](${p.svg}). ${p.samples} samples; the JS thread was busy ${p.busyPct.toFixed(0)}% of the time.`, '')
    L.push('| self | function | where |', '| --- | --- | --- |')
    for (const f of p.functions.slice(0, 12)) L.push(`| ${f.pct.toFixed(1)}% | \`${f.name}\` | ${f.file || '—'} |`)
    L.push('', '| self | file |', '| --- | --- |')
    for (const f of p.files.slice(0, 8)) L.push(`| ${f.pct.toFixed(1)}% | ${f.file} |`)
    L.push('')
  }
  await writeFile(join(dir, 'README.md'), L.join('\n'))
}
