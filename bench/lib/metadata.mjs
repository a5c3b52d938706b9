/**
 * Metadata: what a large image costs, and how fast a change reaches the
 * other node.
 *
 * Cost of a 1 TiB image with 1 MiB blocks (1,048,576 blocks), replicas on
 * nodes A and B:
 * - creation time: `POST /v1/images` to node A, until it answers;
 * - bytes stored: the image's file in metadata_root (the stored format),
 *   and for scale the same metadata in the original's per-block JSON;
 * - one sync-state change: `MetadataStore.update` marking one block of
 *   B out of sync (or back in sync), the call the data path makes before
 *   it acknowledges a write that missed a replica; timed in this process
 *   with the node's own store code, on the cluster's metadata_root, while
 *   both nodes watch it. Measured on a uniform image and on one already
 *   holding 10,000 scattered out-of-sync blocks.
 * The etcd backend does not exist yet: reported as not available.
 *
 * Propagation: an image created (then destroyed) through node A's API,
 * and the time until node B serves (then stops serving) it: B's FUSE
 * mount answers lookups from B's in-memory metadata (entry and negative
 * timeouts are 0), so a `stat` there shows what B's data path sees.
 */
import { stat } from 'node:fs/promises'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { httpCall } from './ukai.mjs'
import { median, max } from './stats.mjs'

const TIB = 2 ** 40
const MIB = 2 ** 20

/**
 * @param {{ a: import('./ukai.mjs').UkaiNode, b: import('./ukai.mjs').UkaiNode, dist: string, changes: number, creations: number, log: (s: string) => void }} o
 */
export async function metadataCost (o) {
  const name = 'meta-1t'
  const body = { name, size: TIB, block_size: MIB, locations: [o.a.id, o.b.id] }
  const createMs = []
  for (let i = 0; i < o.creations; i++) {
    const t0 = performance.now()
    await o.a.api('POST', '/v1/images', body)
    createMs.push(performance.now() - t0)
    if (i < o.creations - 1) await o.a.api('DELETE', `/v1/images/${name}`)
  }
  const storedBytes = (await stat(join(o.a.metadataRoot, `${name}.json`))).size
  const t0 = performance.now()
  const seed = await httpCall(o.a.controlPort, 'GET', `/v1/images/${name}?format=seed`)
  const seedMs = performance.now() - t0
  const seedBytes = seed.status === 200 ? Buffer.byteLength(seed.text) : NaN

  const { FileMetadataStore } = await import(pathToFileURL(join(o.dist, 'src/metadata/file-store.js')).href)
  const store = await FileMetadataStore.open(o.a.metadataRoot, o.a.proxyPort)
  const blocks = TIB / MIB
  let seedRand = 12345
  const rand = () => { seedRand = (seedRand * 1103515245 + 12345) % 2 ** 31; return seedRand % blocks }
  const timeChanges = async (n) => {
    const ms = []
    for (let i = 0; i < n; i++) {
      const b = rand()
      // Out of sync, then back in sync: the image's shape stays the same.
      for (const inSync of [false, true]) {
        const c0 = performance.now()
        await store.update(name, (m) => { m.setSync(o.b.id, b, b + 1, inSync); return m })
        ms.push(performance.now() - c0)
      }
    }
    return ms
  }
  let uniform, fragmented, fragmentedBytes
  try {
    uniform = await timeChanges(o.changes)
    // 10,000 scattered out-of-sync blocks on B (every 100th block).
    await store.update(name, (m) => { for (let b = 0; b < 1_000_000; b += 100) m.setSync(o.b.id, b, b + 1, false); return m })
    fragmentedBytes = (await stat(join(o.a.metadataRoot, `${name}.json`))).size
    fragmented = await timeChanges(Math.max(5, Math.floor(o.changes / 2)))
  } finally {
    await store.close()
  }
  await o.a.api('DELETE', `/v1/images/${name}`)
  const r = {
    blocks,
    createMs,
    storedBytes,
    seedBytes,
    seedMs,
    changeMs: uniform,
    fragmentedChangeMs: fragmented,
    fragmentedBytes,
    etcd: 'not available (no etcd backend yet)'
  }
  o.log(`  1 TiB / 1 MiB blocks: create ${median(createMs).toFixed(1)} ms, stored ${storedBytes} bytes (seed format ${seedBytes} bytes), sync-state change ${median(uniform).toFixed(2)} ms median, ${max(uniform).toFixed(2)} ms max; with 10,000 out-of-sync ranges ${median(fragmented).toFixed(2)} ms (${fragmentedBytes} bytes)`)
  return r
}

/**
 * @param {{ a: import('./ukai.mjs').UkaiNode, b: import('./ukai.mjs').UkaiNode, repeats: number, log: (s: string) => void }} o
 */
export async function propagation (o) {
  const appear = []
  const vanish = []
  const exists = async (p) => await stat(p).then(() => true, () => false)
  const until = async (p, want) => {
    const deadline = performance.now() + 30_000
    for (;;) {
      if (await exists(p) === want) return performance.now()
      if (performance.now() > deadline) throw new Error(`${p} did not ${want ? 'appear' : 'disappear'} on node B within 30 s`)
    }
  }
  for (let i = 0; i < o.repeats; i++) {
    const name = `prop-${i}`
    const onB = join(o.b.mountpoint, name)
    let t0 = performance.now()
    await o.a.api('POST', '/v1/images', { name, size: MIB, block_size: MIB })
    let ack = performance.now()
    let seen = await until(onB, true)
    appear.push({ afterAckMs: seen - ack, afterRequestMs: seen - t0, apiMs: ack - t0 })
    t0 = performance.now()
    await o.a.api('DELETE', `/v1/images/${name}`)
    ack = performance.now()
    seen = await until(onB, false)
    vanish.push({ afterAckMs: seen - ack, afterRequestMs: seen - t0, apiMs: ack - t0 })
  }
  const r = { appear, vanish }
  o.log(`  propagation A -> B: creation seen ${median(appear.map((x) => x.afterRequestMs)).toFixed(2)} ms after the request (median), removal ${median(vanish.map((x) => x.afterRequestMs)).toFixed(2)} ms`)
  return r
}
