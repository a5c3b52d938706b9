/**
 * Resynchronisation, measured two ways.
 *
 * Full resync rate: an image whose only in-sync replica is on node A gets
 * a fully out-of-sync replica on node B (`image add-location`), and
 * `ukai sync` copies every block over the peer protocol. Its peer is
 * cp(1) of the same bytes from the warm reference file to a new file on
 * the same file system, timed alone and with an fsync of the copy
 * (`sync FILE`): UKAI's sync makes each block durable on the target
 * before it marks it in sync, plain cp leaves the bytes in the page cache.
 * The two alternate (UKAI, cp, UKAI, cp, ...), each run after sync(1),
 * into fresh files (the target's block files are removed between runs);
 * a first, uncounted pair warms both up.
 *
 * Delta resync: an image with replicas on A and B, in sync; B is stopped
 * (SIGTERM), a workload writes through A's NBD export during the outage,
 * B is started again and `ukai sync` runs. Reported: bytes the sync
 * copied against bytes written during the outage.
 */
import { unlink } from 'node:fs/promises'
import { waitGone } from './move.mjs'
import { join } from 'node:path'
import { run } from './proc.mjs'
import { populateBlocks } from './data.mjs'
import { readFioJson } from './fio.mjs'

/**
 * @param {{ a: import('./ukai.mjs').UkaiNode, b: import('./ukai.mjs').UkaiNode, reference: string, size: number,
 *   blockSize: number, rounds: number, dir: string, log: (s: string) => void }} o
 */
export async function resyncRate (o) {
  const image = 'resync'
  await o.a.api('POST', '/v1/images', { name: image, size: o.size, block_size: o.blockSize, locations: [o.a.id] })
  await populateBlocks(o.reference, o.a.imageRoot, image, o.blockSize)
  const copy = join(o.dir, 'cp-target.img')
  const rounds = []
  // Round 0 is a warm-up, not counted: the first sync opens the peer
  // connections and compiles the copy path.
  for (let i = 0; i <= o.rounds; i++) {
    // UKAI: a replica on B, out of sync for every block, into fresh files
    // (B reclaimed the last round's when the location was removed).
    await waitGone(join(o.b.imageRoot, image))
    await o.a.api('POST', `/v1/images/${image}/locations`, { location: o.b.id })
    await run('sync', [])
    const t0 = performance.now()
    const res = await o.a.sync(image)
    const ukaiMs = performance.now() - t0
    await o.a.api('DELETE', `/v1/images/${image}/locations`, { location: o.b.id })
    if (res.failed.length > 0) throw new Error(`sync failed for ${res.failed.length} block(s): ${res.failed[0].reason}`)

    // cp: the same bytes, warm source, new file; then fsync of the copy.
    await unlink(copy).catch(() => {})
    await run('sync', [])
    const c0 = performance.now()
    await run('cp', ['--sparse=never', o.reference, copy])
    const cpMs = performance.now() - c0
    await run('sync', [copy])
    const cpSyncMs = performance.now() - c0
    await unlink(copy)

    const r = {
      bytes: res.bytes,
      ukaiMs,
      cpMs,
      cpSyncMs,
      ukaiMiBps: res.bytes / 2 ** 20 / (ukaiMs / 1000),
      cpMiBps: o.size / 2 ** 20 / (cpMs / 1000),
      cpSyncMiBps: o.size / 2 ** 20 / (cpSyncMs / 1000)
    }
    if (i > 0) rounds.push(r)
    o.log(`  resync ${i === 0 ? 'warm-up' : `#${i}`}: UKAI ${r.ukaiMiBps.toFixed(0)} MiB/s (${res.bytes} bytes in ${ukaiMs.toFixed(0)} ms), cp ${r.cpMiBps.toFixed(0)} MiB/s, cp+fsync ${r.cpSyncMiBps.toFixed(0)} MiB/s`)
  }
  await o.a.api('DELETE', `/v1/images/${image}`)
  return { rounds }
}

/**
 * @param {{ a: import('./ukai.mjs').UkaiNode, b: import('./ukai.mjs').UkaiNode, reference: string, size: number,
 *   blockSize: number, rawDir: string, log: (s: string) => void }} o
 */
export async function deltaResync (o) {
  const image = 'delta'
  await o.a.api('POST', '/v1/images', { name: image, size: o.size, block_size: o.blockSize, locations: [o.a.id, o.b.id] })
  await populateBlocks(o.reference, o.a.imageRoot, image, o.blockSize)
  await populateBlocks(o.reference, o.b.imageRoot, image, o.blockSize)
  const uri = `nbd+unix:///${image}?socket=${o.a.nbdSocket}`
  const seqBlocks = Math.min(4, Math.floor(o.size / o.blockSize))
  const scenarios = [
    {
      id: 'seq',
      label: `sequential 1 MiB writes over ${seqBlocks} whole blocks`,
      args: ['--rw=write', '--bs=1M', '--offset=0', `--size=${seqBlocks * o.blockSize}`]
    },
    {
      id: 'rand',
      label: 'random 4 KiB writes, 16 MiB in all, over the whole image',
      args: ['--rw=randwrite', '--bs=4k', `--size=${o.size}`, `--io_size=${16 * 2 ** 20}`, '--randrepeat=1']
    }
  ]
  const out = []
  for (const s of scenarios) {
    // Start from a fully in-sync image.
    const before = await o.a.sync(image)
    if (before.failed.length > 0) throw new Error(`could not bring '${image}' in sync before the outage`)
    await o.b.stop()
    const json = join(o.rawDir, `delta-${s.id}.json`)
    const r = await run('fio', ['--name=outage', '--ioengine=nbd', `--uri=${uri}`, '--iodepth=16', ...s.args, '--output-format=json', `--output=${json}`], { allowFail: true })
    const job = (await readFioJson(json)).jobs[0]
    if (r.code !== 0 || job.error !== 0) throw new Error(`fio during the outage failed: ${r.stderr}`)
    const written = job.write.io_bytes
    await o.b.start()
    const info = await o.a.api('GET', `/v1/images/${image}`)
    const outOfSync = (info.locations?.[o.b.id]?.out_of_sync ?? []).reduce((n, [x, y]) => n + y - x, 0)
    const t0 = performance.now()
    const res = await o.a.sync(image)
    const ms = performance.now() - t0
    if (res.failed.length > 0) throw new Error(`delta sync failed: ${res.failed[0].reason}`)
    const e = { id: s.id, label: s.label, written, copied: res.bytes, blocksOutOfSync: outOfSync, ratio: res.bytes / written, ms }
    out.push(e)
    o.log(`  delta ${s.id}: wrote ${written} bytes during the outage, sync copied ${res.bytes} bytes (${e.ratio.toFixed(2)}×, ${outOfSync} block(s) out of sync)`)
  }
  await o.a.api('DELETE', `/v1/images/${image}`)
  return { blockSize: o.blockSize, scenarios: out }
}
