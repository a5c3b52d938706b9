/**
 * Moving a running image (`ukai image move`): a 2 GiB image (its data on
 * one node) moves to the other node while a guest-like writer writes it
 * through the destination's NBD export: fio, random 4 KiB writes, one at
 * a time, 200 a second (a VM's steady writes, not a flood). Per round:
 *
 * - the writer alone for 10 s (its latency without a move), then the
 *   writer again during the move (fio is stopped with SIGINT when the
 *   move ends, and reports what it saw);
 * - the move's rate: the bytes it copied over its duration, beside cp(1)
 *   of the same bytes (warm reference file to a new file);
 * - the added stall: the slowest write during the move less the slowest
 *   without (target: 100 ms at most), and the 99th percentiles.
 *
 * Rounds alternate the direction (A -> B with the writer on B, then back),
 * so each moves the image to where its writer runs.
 */
import { spawn } from 'node:child_process'
import { access, unlink } from 'node:fs/promises'
import { join } from 'node:path'
import { run } from './proc.mjs'
import { populateBlocks } from './data.mjs'
import { readFioJson } from './fio.mjs'
import { httpCall } from './ukai.mjs'

const WRITER = ['--rw=randwrite', '--bs=4k', '--iodepth=1', '--rate_iops=200', '--randrepeat=0']

/** Latency of the writer's writes: max and p99 in ms. */
function latency (job) {
  const lat = job.write.lat_ns ?? job.write.clat_ns
  const p99 = job.write.clat_ns?.percentile?.['99.000000']
  return { maxMs: lat.max / 1e6, p99Ms: (p99 ?? lat.max) / 1e6, writes: job.write.total_ios }
}

/** Waits until `dir` is gone (a node's reclaim removes it), at most 30 s. */
export async function waitGone (dir) {
  const end = Date.now() + 30_000
  while (await access(dir).then(() => true, () => false)) {
    if (Date.now() > end) throw new Error(`${dir} is still there 30 s after its blocks moved away`)
    await new Promise((resolve) => setTimeout(resolve, 200))
  }
}

async function fio (args, json, untilDone) {
  const child = spawn('fio', [...args, '--output-format=json', `--output=${json}`], { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (c) => { stderr += c })
  const exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)))
  if (untilDone !== undefined) {
    try { await untilDone() } finally { child.kill('SIGINT') }
  }
  const code = await exited
  const job = (await readFioJson(json)).jobs[0]
  if (job === undefined || job.error !== 0) throw new Error(`fio failed (${code}): ${stderr}`)
  return job
}

/**
 * @param {{ a: import('./ukai.mjs').UkaiNode, b: import('./ukai.mjs').UkaiNode, reference: string, size: number,
 *   blockSize: number, rounds: number, dir: string, rawDir: string, log: (s: string) => void }} o
 */
export async function moveWhileWriting (o) {
  const image = 'move'
  await o.a.api('POST', '/v1/images', { name: image, size: o.size, block_size: o.blockSize, locations: [o.a.id] })
  await populateBlocks(o.reference, o.a.imageRoot, image, o.blockSize)
  const copy = join(o.dir, 'move-cp-target.img')
  const rounds = []
  let from = o.a
  let to = o.b
  for (let i = 1; i <= o.rounds; i++) {
    const uri = `nbd+unix:///${image}?socket=${to.nbdSocket}`
    const writer = ['--name=guest', '--ioengine=nbd', `--uri=${uri}`, `--size=${o.size}`, ...WRITER]
    await run('sync', [])
    const alone = latency(await fio([...writer, '--time_based', '--runtime=10'], join(o.rawDir, `move-${i}-alone.json`)))
    await run('sync', [])
    let result
    let ms = 0
    const during = latency(await fio([...writer, '--time_based', '--runtime=3600'], join(o.rawDir, `move-${i}-during.json`), async () => {
      // The writer is running (and holds the image's writer lease) first.
      await new Promise((resolve) => setTimeout(resolve, 2000))
      const t0 = performance.now()
      const { status, text } = await httpCall(from.controlPort, 'POST', `/v1/images/${image}/move`, { to: to.id, from: from.id }, await from.controlToken())
      ms = performance.now() - t0
      const lines = text.split('\n').filter((l) => l.trim() !== '').map((l) => JSON.parse(l))
      const last = lines[lines.length - 1]
      if (status >= 400 || last?.result === undefined || last.result.failed.length > 0) throw new Error(`move failed: ${status} ${JSON.stringify(last?.error ?? last?.result?.failed?.[0] ?? last)}`)
      result = last.result
    }))
    // The old node reclaims its files once it has seen the change (5 s later).
    await waitGone(join(from.imageRoot, image))
    await unlink(copy).catch(() => {})
    await run('sync', [])
    const c0 = performance.now()
    await run('cp', ['--sparse=never', o.reference, copy])
    const cpMs = performance.now() - c0
    await unlink(copy)
    const r = {
      direction: `${from.name} -> ${to.name}`,
      bytes: result.bytes,
      ms,
      moveMiBps: result.bytes / 2 ** 20 / (ms / 1000),
      cpMiBps: o.size / 2 ** 20 / (cpMs / 1000),
      alone,
      during,
      addedStallMs: during.maxMs - alone.maxMs
    }
    rounds.push(r)
    o.log(`  move #${i} ${r.direction}: ${r.moveMiBps.toFixed(0)} MiB/s (${result.bytes} bytes in ${ms.toFixed(0)} ms; cp ${r.cpMiBps.toFixed(0)} MiB/s); ` +
      `slowest write ${during.maxMs.toFixed(1)} ms during, ${alone.maxMs.toFixed(1)} ms without (p99 ${during.p99Ms.toFixed(1)} / ${alone.p99Ms.toFixed(1)} ms)`)
    ;[from, to] = [to, from]
  }
  await o.a.api('DELETE', `/v1/images/${image}`)
  return { rounds }
}
