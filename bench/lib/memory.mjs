/**
 * Memory of a node serving 100 open images: a fresh node (its own
 * metadata_root, FUSE mount and NBD socket) gets 100 images of 1 GiB
 * (64 MiB blocks, sparse); fio then drives all of them at once through
 * NBD (one connection per image, random 4 KiB reads and writes, queue
 * depth 4), so every image is open with I/O in flight. Reported: the
 * resident set before any image exists, with the images created but
 * closed, and the peak (VmHWM) while serving, read from /proc.
 */
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { readFioJson } from './fio.mjs'
import { run } from './proc.mjs'

/**
 * @param {{ node: import('./ukai.mjs').UkaiNode, images: number, runtime: number, rawDir: string, log: (s: string) => void }} o
 */
export async function peakRss (o) {
  const idle = await o.node.memory()
  const names = []
  for (let i = 0; i < o.images; i++) {
    const name = `vm${String(i).padStart(3, '0')}`
    await o.node.api('POST', '/v1/images', { name, size: 2 ** 30, block_size: 64 * 2 ** 20 })
    names.push(name)
  }
  const created = await o.node.memory()
  const jobFile = join(o.rawDir, 'rss-100-images.fio')
  const lines = [
    '[global]', 'ioengine=nbd', 'thread=1', 'rw=randrw', 'bs=4k', 'iodepth=4', 'time_based=1', `runtime=${o.runtime}`,
    'norandommap=1', ''
  ]
  for (const n of names) lines.push(`[${n}]`, `uri=nbd+unix:///${n}?socket=${o.node.nbdSocket}`, '')
  await writeFile(jobFile, lines.join('\n'))
  const json = join(o.rawDir, 'rss-100-images.json')
  const fio = run('fio', [jobFile, '--output-format=json', `--output=${json}`], { allowFail: true })
  // Samples while fio runs: the open images as the node reports them, and its RSS.
  let openMax = 0
  let rssMax = 0
  let done = false
  void fio.finally(() => { done = true })
  while (!done) {
    await sleep(250)
    try {
      const info = await o.node.api('GET', '/v1/node')
      openMax = Math.max(openMax, info.open_images.length)
      rssMax = Math.max(rssMax, (await o.node.memory()).current)
    } catch {}
  }
  const r = await fio
  const doc = await readFioJson(json)
  const failed = doc.jobs.filter((j) => j.error !== 0).length
  if (r.code !== 0 || failed > 0) throw new Error(`fio on ${o.images} images failed (${failed} job(s)): ${r.stderr.slice(0, 500)}`)
  const iops = doc.jobs.reduce((s, j) => s + j.read.iops + j.write.iops, 0)
  const after = await o.node.memory()
  const out = { images: o.images, idleRss: idle.current, createdRss: created.current, peakRss: after.peak, sampledMaxRss: rssMax, openMax, iops }
  o.log(`  ${o.images} open images: peak RSS ${(after.peak / 2 ** 20).toFixed(0)} MiB (idle ${(idle.current / 2 ** 20).toFixed(0)} MiB), ${openMax} open at once, ${iops.toFixed(0)} IOPS in all`)
  return out
}
