/**
 * What mutual TLS on the peer port costs (the `tls` phase). Two pairs of
 * nodes, each pair with its own embedded metadata store: one pair speaks
 * plain text on loopback, the other TLS (a CA made for the run with
 * `ukai cert`, a certificate per node). On each pair:
 *
 *   two replicas   an image with replicas on both nodes, written through
 *                  the first node's NBD socket: every write also crosses
 *                  the peer port (the cost the target is about);
 *   remote only    an image whose only replica is on the second node,
 *                  read through the first: every read crosses the peer port.
 *
 * fio (the nbd engine on the first node's unix socket, as the throughput
 * phase) runs each workload on the plain pair and on the TLS pair back to
 * back, in alternating order, `rounds` times; the figure is the median
 * TLS / plain ratio of the pairs, with min and max. Target: ≥ 0.9× on
 * writes to two replicas.
 */
import { join } from 'node:path'
import { mkdir } from 'node:fs/promises'
import { WORKLOADS, runFio } from './fio.mjs'
import { run } from './proc.mjs'
import { UkaiNode } from './ukai.mjs'
import { median } from './stats.mjs'

export const TLS_TARGET = { min: 0.9, text: '≥ 0.9× on writes (2 replicas)' }

/**
 * @param {{ tmp: string, cli: string, quick: boolean, rawDir: string, size: number, blockSize: number, log: (m: string) => void }} o
 */
export async function tlsCost (o) {
  const ca = join(o.tmp, 'tls-ca')
  const made = await run(process.execPath, [o.cli, 'cert', 'ca', ca])
  if (made.code !== 0) throw new Error(`ukai cert ca: ${made.stderr}`)
  const pair = async (kind) => {
    const meta = join(o.tmp, `tls-${kind}-metadata`)
    const nodes = [1, 2].map((i) => new UkaiNode({ name: `${kind}${i}`, dir: join(o.tmp, `tls-${kind}-${i}`), metadataRoot: meta, cli: o.cli, mount: false, tlsCa: kind === 'tls' ? ca : undefined }))
    for (const n of nodes) await n.configure()
    return nodes
  }
  const pairs = { plain: await pair('plain'), tls: await pair('tls') }
  const started = []
  try {
    for (const [kind, [a, b]] of Object.entries(pairs)) {
      await a.start(); started.push(a)
      await b.start(); started.push(b)
      // Created through the running node A, which allocates B's replica over the control API.
      const sz = String(o.size)
      for (const [image, locs] of [['two', [a.id, b.id]], ['remote', [b.id]]]) {
        const r = await a.ukai('image', 'create', image, '-s', sz, '-b', String(o.blockSize), ...locs.flatMap((l) => ['-l', l]))
        if (r.code !== 0) throw new Error(`${kind}: image create ${image}: ${r.stderr}`)
      }
      // Fill the remote-only image once, so that its reads read data.
      const fill = await run('fio', ['--name=fill', '--rw=write', '--bs=1M', '--iodepth=4', '--ioengine=nbd', `--uri=nbd+unix:///remote?socket=${a.nbdSocket}`, `--size=${o.size}`], { allowFail: true, timeoutMs: 600_000 })
      if (fill.code !== 0) throw new Error(`${kind}: filling the remote image: ${fill.stderr}`)
    }
    const timing = { runtime: o.quick ? 3 : 10, ramp: 1 }
    const rounds = o.quick ? 2 : 3
    const cases = [
      ...WORKLOADS.filter((w) => w.write).map((w) => ({ w, image: 'two', label: `${w.label}, 2 replicas` })),
      ...WORKLOADS.filter((w) => !w.write).map((w) => ({ w, image: 'remote', label: `${w.label}, only replica on the peer` }))
    ]
    await mkdir(join(o.rawDir, 'tls'), { recursive: true })
    const rows = []
    for (const c of cases) {
      const runs = { plain: [], tls: [] }
      for (let r = 0; r < rounds; r++) {
        const order = r % 2 === 0 ? ['plain', 'tls'] : ['tls', 'plain']
        for (const kind of order) {
          const a = pairs[kind][0]
          const res = await runFio(c.w, { kind: 'nbd', uri: `nbd+unix:///${c.image}?socket=${a.nbdSocket}` }, timing, join(o.rawDir, 'tls', `${c.w.id}-${c.image}-${kind}-${r}.json`))
          runs[kind].push(res.value)
        }
      }
      const ratios = runs.tls.map((v, i) => v / runs.plain[i])
      rows.push({ id: `${c.w.id}-${c.image}`, label: c.label, unit: c.w.unit, write: c.w.write, plain: runs.plain, tls: runs.tls, ratios })
      o.log(`  tls ${c.label}: TLS ${median(runs.tls).toFixed(0)} vs plain ${median(runs.plain).toFixed(0)} ${c.w.unit} (${median(ratios).toFixed(2)}×)`)
    }
    return { rounds, runtime: timing.runtime, size: o.size, blockSize: o.blockSize, rows, target: TLS_TARGET }
  } finally {
    for (const n of started.reverse()) await n.stop().catch(() => {})
  }
}
