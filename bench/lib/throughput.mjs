/**
 * Throughput: every UKAI figure against its peer, in alternating runs.
 *
 * For each workload and each pair (A = UKAI, B = its peer) the runs go
 * A B A B ... (`rounds` pairs), every run preceded by sync(1) so that no
 * run pays for the dirty pages of the one before. The figure reported is
 * the median of the per-round ratios A/B; the min–max of those ratios
 * says how noisy the runs were. The local file (the limit) runs
 * `rounds` times per workload, before the pairs. Before any of it, every
 * target gets one short unmeasured run of the workload (warm-up).
 */
import { join } from 'node:path'
import { runFio, WORKLOADS } from './fio.mjs'
import { run } from './proc.mjs'

/**
 * @typedef {{ id: string, a: string, b: string, title: string, target?: { min: number, on: 'all' | 'write', text: string } }} Pair
 */

/** @type {Pair[]} */
export const PAIRS = [
  { id: 'nbd-vs-nbdkit', a: 'ukai-nbd', b: 'nbdkit', title: 'UKAI NBD / nbdkit file', target: { min: 1.0, on: 'all', text: '≥ 1.0×' } },
  { id: 'nbd-vs-qemu', a: 'ukai-nbd', b: 'qemu-nbd', title: 'UKAI NBD / qemu-nbd', target: { min: 1.5, on: 'all', text: '≥ 1.5×' } },
  { id: 'fuse-vs-bindfs', a: 'ukai-fuse', b: 'bindfs', title: 'UKAI FUSE / bindfs big_writes', target: { min: 1.0, on: 'all', text: '≥ 1.0×' } },
  { id: 'two-vs-one', a: 'ukai-nbd-2', b: 'ukai-nbd', title: 'UKAI NBD 2 replicas / 1 replica', target: { min: 0.7, on: 'write', text: '≥ 0.7× on writes' } },
  { id: 'remote-vs-chain', a: 'ukai-nbd-remote', b: 'nbdkit-chain', title: 'UKAI NBD remote replica / nbdkit chain' },
  // The distributed-storage peer: a one-host Ceph cluster (bench/lib/ceph.mjs).
  { id: 'two-vs-rbd2', a: 'ukai-nbd-2', b: 'rbd-2', title: 'UKAI NBD 2 replicas / Ceph RBD size 2', target: { min: 2.0, on: 'all', text: '≥ 2×' } },
  { id: 'one-vs-rbd1', a: 'ukai-nbd', b: 'rbd-1', title: 'UKAI NBD 1 replica / Ceph RBD size 1', target: { min: 2.0, on: 'all', text: '≥ 2×' } }
]

/** The target that applies to a pair on a workload, if any. */
export function targetOf (pair, workload) {
  const t = pair.target
  if (t === undefined) return undefined
  if (t.on === 'write' && !workload.write) return undefined
  return t
}

/**
 * @param {{
 *   targets: Record<string, import('./targets.mjs').Target>,
 *   workloads?: import('./fio.mjs').Workload[],
 *   pairs?: Pair[],
 *   rounds: number,
 *   timing: { runtime: number, ramp: number },
 *   warmup: number,
 *   rawDir: string,
 *   log: (s: string) => void,
 *   beforeWorkload?: (w: import('./fio.mjs').Workload) => Promise<void>,
 * }} o
 */
export async function runThroughput (o) {
  const workloads = o.workloads ?? WORKLOADS
  const pairs = o.pairs ?? PAIRS
  const result = { limit: {}, pairs: {}, order: [] }
  let n = 0
  const once = async (w, targetId, round) => {
    const t = o.targets[targetId]
    if (t === undefined) throw new Error(`target ${targetId} is not available`)
    await run('sync', [])
    const file = join(o.rawDir, `${w.id}-${targetId}-${++n}.json`)
    const r = await runFio(w, t.fio, o.timing, file)
    result.order.push({ workload: w.id, target: targetId, round, value: r.value })
    o.log(`  ${w.id} ${targetId} #${round}: ${r.value.toFixed(w.unit === 'IOPS' ? 0 : 1)} ${w.unit} (p99 ${r.latP99us.toFixed(0)} µs)`)
    return r
  }
  for (const w of workloads) {
    o.log(`workload ${w.id} (${w.label})`)
    if (o.beforeWorkload !== undefined) await o.beforeWorkload(w)
    // One unmeasured run per target first: the UKAI node's JIT compiles
    // its hot paths, every server opens its files, before any figure counts.
    const involved = new Set(['local', ...pairs.flatMap((p) => [p.a, p.b])])
    for (const id of involved) {
      const t = o.targets[id]
      if (t === undefined) continue
      await runFio(w, t.fio, { runtime: o.warmup, ramp: 0 }, join(o.rawDir, `warmup-${w.id}-${id}.json`)).catch((err) => o.log(`  warm-up on ${id}: ${err.message}`))
    }
    const limit = { runs: [] }
    result.limit[w.id] = limit
    try {
      for (let i = 1; i <= o.rounds; i++) limit.runs.push(await once(w, 'local', i))
    } catch (err) {
      limit.error = err.message
      o.log(`  local: ${err.message}`)
    }
    for (const p of pairs) {
      const entry = { a: [], b: [], ratios: [] }
      result.pairs[p.id] ??= {}
      result.pairs[p.id][w.id] = entry
      try {
        for (let i = 1; i <= o.rounds; i++) {
          const a = await once(w, p.a, i)
          const b = await once(w, p.b, i)
          entry.a.push(a)
          entry.b.push(b)
          entry.ratios.push(a.value / b.value)
        }
      } catch (err) {
        entry.error = err.message
        o.log(`  ${p.id}: ${err.message}`)
      }
    }
  }
  return result
}
