/**
 * The four fio workloads and how one run is made and read.
 *
 * Files (the local file, FUSE mounts) use `ioengine=libaio`; NBD targets
 * use fio's `nbd` engine (libnbd), one connection per run. The local file
 * is read and written through the page cache (`direct=0`, `invalidate=0`:
 * the warm cache is the point, it is the limit). FUSE files are opened
 * with O_DIRECT (`direct=1`), as a hypervisor does with `cache=none`, so
 * every request reaches the FUSE daemon and is served from the warm cache
 * of its backing files; without it the kernel's page cache of the FUSE
 * file would answer repeated reads and hide the daemon being measured.
 * RBD images use fio's `rbd` engine (librbd in fio's process, no kernel
 * device and no NBD hop), with the cluster's config through CEPH_CONF.
 */
import { readFile } from 'node:fs/promises'
import { run } from './proc.mjs'

/**
 * @typedef {{ id: string, label: string, rw: string, bs: string, iodepth: number, write: boolean, unit: 'MiB/s' | 'IOPS' }} Workload
 */

/** @type {Workload[]} */
export const WORKLOADS = [
  { id: 'seqread', label: 'sequential read, 1 MiB', rw: 'read', bs: '1M', iodepth: 4, write: false, unit: 'MiB/s' },
  { id: 'seqwrite', label: 'sequential write, 1 MiB', rw: 'write', bs: '1M', iodepth: 4, write: true, unit: 'MiB/s' },
  { id: 'randread', label: 'random read, 4 KiB, QD16', rw: 'randread', bs: '4k', iodepth: 16, write: false, unit: 'IOPS' },
  { id: 'randwrite', label: 'random write, 4 KiB, QD16', rw: 'randwrite', bs: '4k', iodepth: 16, write: true, unit: 'IOPS' }
]

/**
 * What fio is pointed at.
 * @typedef {{ kind: 'file', filename: string, direct: boolean } | { kind: 'nbd', uri: string } | { kind: 'rbd', conf: string, client: string, pool: string, image: string }} FioTarget
 */

/**
 * The parsed result of one run.
 * @typedef {{ mibps: number, iops: number, latP50us: number, latP99us: number, value: number, ioBytes: number, file: string }} FioResult
 */

/**
 * fio's options for a workload on a target, as command-line arguments.
 * @param {Workload} w
 * @param {FioTarget} t
 * @param {{ runtime: number, ramp: number }} timing
 */
export function fioArgs (w, t, timing) {
  const args = [
    `--name=${w.id}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.iodepth}`,
    '--numjobs=1',
    '--time_based=1',
    `--runtime=${timing.runtime}`,
    `--ramp_time=${timing.ramp}`,
    // Random offsets need not cover every block once per pass: the
    // tracking map would cost fio CPU that the targets should get.
    '--norandommap=1',
    // The same offsets in every run, so the two sides of a pair see
    // identical request streams.
    '--randrepeat=1',
    '--output-format=json'
  ]
  if (t.kind === 'file') {
    args.push('--ioengine=libaio', `--filename=${t.filename}`, `--direct=${t.direct ? 1 : 0}`, '--invalidate=0')
  } else if (t.kind === 'rbd') {
    args.push('--ioengine=rbd', `--clientname=${t.client}`, `--pool=${t.pool}`, `--rbdname=${t.image}`)
  } else {
    args.push('--ioengine=nbd', `--uri=${t.uri}`)
  }
  return args
}

/**
 * Runs fio once and keeps its JSON at `jsonPath`.
 * @param {Workload} w
 * @param {FioTarget} t
 * @returns {Promise<FioResult>}
 */
export async function runFio (w, t, timing, jsonPath) {
  // --output keeps the JSON apart from what the nbd engine prints.
  const r = await run('fio', [...fioArgs(w, t, timing), `--output=${jsonPath}`], {
    allowFail: true,
    timeoutMs: (timing.runtime + timing.ramp + 120) * 1000,
    ...(t.kind === 'rbd' ? { env: { ...process.env, CEPH_CONF: t.conf } } : {})
  })
  let doc
  try {
    doc = await readFioJson(jsonPath)
  } catch {
    throw new Error(`fio ${w.id} on ${describeTarget(t)} gave no JSON (exit ${r.code}): ${r.stderr.trim() || r.stdout.trim()}`)
  }
  const job = doc.jobs?.[0]
  if (r.code !== 0 || job === undefined || job.error !== 0) {
    throw new Error(`fio ${w.id} on ${describeTarget(t)} failed (exit ${r.code}, job error ${job?.error}): ${r.stderr.trim()}`)
  }
  const side = w.write ? job.write : job.read
  const pct = side.clat_ns?.percentile ?? {}
  const result = {
    mibps: side.bw_bytes / 2 ** 20,
    iops: side.iops,
    latP50us: (pct['50.000000'] ?? NaN) / 1000,
    latP99us: (pct['99.000000'] ?? NaN) / 1000,
    ioBytes: side.io_bytes,
    value: 0,
    file: jsonPath
  }
  result.value = w.unit === 'IOPS' ? result.iops : result.mibps
  return result
}

/**
 * fio's JSON output. The nbd engine prints "fio: connected to NBD server"
 * into the output file too (once per job): the JSON starts at the first
 * line that opens an object.
 */
export async function readFioJson (path) {
  const text = await readFile(path, 'utf8')
  const start = text.search(/^\{/m)
  if (start < 0) throw new Error(`no JSON in ${path}`)
  return JSON.parse(text.slice(start))
}

export function describeTarget (t) {
  if (t.kind === 'rbd') return `rbd:${t.pool}/${t.image}`
  return t.kind === 'file' ? `${t.filename}${t.direct ? ' (O_DIRECT)' : ''}` : t.uri
}
