/**
 * Metadata: what a large image costs, and how fast a change reaches the
 * other node, on either metadata backend: the embedded store (FileCore,
 * one file per shard under `<metadata_root>/shards/`) or etcd (EtcdCore).
 * Nodes A and B of a pair share one backend; the benchmark process opens
 * the same backend with the node's own store code (`MetadataStore` from
 * the compiled tree under test) to make changes exactly as a node does.
 *
 * Cost of a 1 TiB image with 1 MiB blocks (1,048,576 blocks), replicas on
 * nodes A and B:
 * - creation time: `POST /v1/images` to node A, until it answers;
 * - bytes stored: the image's keys (`core.range('images/NAME/')`: their
 *   number, the sum of key + value sizes and the largest key + value)
 *   and, on the embedded store, the size of the image's shard file; for
 *   scale, the same metadata in the original's per-block JSON (`GET
 *   /v1/images/NAME?format=seed`);
 * - one sync-state change: `MetadataStore.update` marking one block of B
 *   out of sync (or back in sync), the call the data path makes before
 *   it acknowledges a write that missed a replica, while both nodes watch
 *   the store, after 10 unmeasured changes (the JIT compiles the store's
 *   code first). Measured on a uniform image and on one already holding
 *   10,000 scattered out-of-sync blocks; back to back (each change starts
 *   when the last returned, while nodes A and B still re-read the last
 *   one: a burst of writes missing a replica), and spaced (each change
 *   20 ms after the last, the nodes idle: a lone change);
 * - cross-checks, simpler measurements of the same cost: the same
 *   changes of the same image where no node watches (another
 *   metadata_prefix on the same etcd, another metadata_root on the same
 *   disk), which leaves out the nodes' re-reads of every change; one bare put
 *   through the core (no read, no compare); on the embedded store a raw
 *   loop of write + fsync + rename + directory fsync of a file of the
 *   same size in the same directory (the disk's floor); on etcd, etcd's
 *   own WAL fsync histogram over the timed changes (one fsync per change
 *   expected), a put loop through etcd's JSON gateway (plain HTTP from
 *   this process, no UKAI code, no gRPC client) beside a read loop, and
 *   an `etcdctl put` loop against the same etcd, with an `etcdctl get`
 *   loop (process start and connection, no commit) beside it: their
 *   difference is what a commit costs etcdctl.
 *
 * Propagation:
 * - an image created (then destroyed) through node A's API, and the time
 *   until node B serves (then stops serving) it: B's FUSE mount answers
 *   lookups from B's in-memory metadata (entry and negative timeouts are
 *   0), so a `stat` there shows what B's data path sees;
 * - a sync-state change made through the store (as the writer does),
 *   until node B's data path uses it: an image with replicas on A and B,
 *   one block whose block file holds 'A' bytes on A and 'B' bytes on B,
 *   open on B's mount (O_DIRECT, so every read reaches B's volume). B
 *   reads its own replica while it is in sync and A's once it is out of
 *   sync, so the first byte read through B tells which metadata B's
 *   volume holds. Polled back to back until it flips. Two checks after
 *   each flip: one more read, which B's own I/O statistics (`GET
 *   /v1/images/NAME/stats`, reads per location) must count against the
 *   replica the marker names; and B's `POST /v1/images/NAME/refresh
 *   {revision}`, which must answer with the change's revision or a later
 *   one (it re-reads only when B is behind, so it changes nothing here).
 *   (B's `GET /v1/images/NAME` would not do: it reads the store, not B's
 *   in-memory view.)
 */
import { constants } from 'node:fs'
import { mkdir, open, readFile, rename, rm, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { setTimeout as sleep } from 'node:timers/promises'
import { blockFileName, httpCall } from './ukai.mjs'
import { median, max } from './stats.mjs'

/** Pause before each spaced change: nodes A and B have re-read the last one by then. */
const SPACING_MS = 20
/** Unmeasured changes (out of sync and back, so twice this many) before the timed ones. */
const WARMUP_CHANGES = 5
const TIB = 2 ** 40
const MIB = 2 ** 20

/**
 * A MetadataStore on the node's backend, built from the compiled tree
 * under test exactly as the node builds its own (node.ts openStore).
 * `elsewhere`: the same backend, in a namespace the node does not use
 * (another metadata_prefix on the same etcd, another metadata_root).
 * @param {import('./ukai.mjs').UkaiNode} node
 * @param {string} dist the build's dist/ directory
 * @param {{ prefix?: string, root?: string }} [elsewhere]
 */
export async function openStoreOf (node, dist, elsewhere = {}) {
  const { MetadataStore } = await metadataModule(dist, 'store.js')
  if (node.backend === 'etcd') {
    const { EtcdCore } = await metadataModule(dist, 'etcd-core.js')
    return new MetadataStore(new EtcdCore({ servers: node.metadataServers, prefix: elsewhere.prefix ?? node.metadataPrefix }), node.proxyPort)
  }
  const { FileCore } = await metadataModule(dist, 'file-core.js')
  return new MetadataStore(await FileCore.open(elsewhere.root ?? node.metadataRoot), node.proxyPort)
}

async function metadataModule (dist, file) {
  return await import(pathToFileURL(join(dist, 'src/metadata', file)).href)
}

/** The image's keys as the core holds them: number, sum of key + value bytes, the largest. */
async function keyStats (store, name) {
  const { kvs } = await store.core.range(`images/${name}/`)
  let bytes = 0
  let largest = 0
  let largestKey = ''
  for (const kv of kvs) {
    const n = Buffer.byteLength(kv.key) + Buffer.byteLength(kv.value)
    bytes += n
    if (n > largest) { largest = n; largestKey = kv.key }
  }
  return { count: kvs.length, bytes, largest, largestKey }
}

/** Size of the embedded store's shard file of an image (file-core.ts fileName). */
async function shardFileBytes (node, name) {
  if (node.backend !== 'file') return undefined
  return (await stat(join(node.metadataRoot, 'shards', `${encodeURIComponent(`images/${name}`)}.json`))).size
}

async function timeLoop (n, fn) {
  const ms = []
  for (let i = 0; i < n; i++) {
    const t0 = performance.now()
    await fn(i)
    ms.push(performance.now() - t0)
  }
  return ms
}

/**
 * @param {{ a: import('./ukai.mjs').UkaiNode, b: import('./ukai.mjs').UkaiNode, dist: string, changes: number, creations: number,
 *   crossChecks: number, etcd?: import('./etcd.mjs').BenchEtcd, log: (s: string) => void }} o
 */
export async function metadataCost (o) {
  const backend = o.a.backend
  const name = 'meta-1t'
  const body = { name, size: TIB, block_size: MIB, locations: [o.a.id, o.b.id] }
  const createMs = []
  for (let i = 0; i < o.creations; i++) {
    const t0 = performance.now()
    await o.a.api('POST', '/v1/images', body)
    createMs.push(performance.now() - t0)
    if (i < o.creations - 1) await o.a.api('DELETE', `/v1/images/${name}`)
  }
  const t0 = performance.now()
  const seed = await httpCall(o.a.controlPort, 'GET', `/v1/images/${name}?format=seed`, undefined, await o.a.controlToken())
  const seedMs = performance.now() - t0
  const seedBytes = seed.status === 200 ? Buffer.byteLength(seed.text) : NaN

  const store = await openStoreOf(o.a, o.dist)
  const blocks = TIB / MIB
  let seedRand = 12345
  const rand = () => { seedRand = (seedRand * 1103515245 + 12345) % 2 ** 31; return seedRand % blocks }
  const timeChanges = async (n, pauseMs = 0) => {
    const ms = []
    for (let i = 0; i < n; i++) {
      const blk = rand()
      // Out of sync, then back in sync: the image's shape stays the same.
      for (const inSync of [false, true]) {
        if (pauseMs > 0) await sleep(pauseMs)
        const c0 = performance.now()
        await store.update(name, (m) => { m.setSync(o.b.id, blk, blk + 1, inSync); return m })
        ms.push(performance.now() - c0)
      }
    }
    return ms
  }
  let r
  try {
    const keys = await keyStats(store, name)
    const shardBytes = await shardFileBytes(o.a, name)
    // Unmeasured changes first: the store's code is compiled by the JIT before it is timed.
    await timeChanges(WARMUP_CHANGES)
    const diskBefore = await o.etcd?.diskMetrics()
    const cpuBefore = await cpuTimes(o)
    const wall0 = performance.now()
    const uniform = await timeChanges(o.changes)
    const wallMs = performance.now() - wall0
    const cpuAfter = await cpuTimes(o)
    const diskAfter = await o.etcd?.diskMetrics()
    // CPU time each process spent per back-to-back change: who competes for the CPUs.
    const cpuPerChangeMs = Object.fromEntries(Object.keys(cpuAfter).map((k) => [k, (cpuAfter[k] - cpuBefore[k]) / uniform.length]))
    const spaced = await timeChanges(o.changes, SPACING_MS)
    // 10,000 scattered out-of-sync blocks on B (every 100th block).
    await store.update(name, (m) => { for (let blk = 0; blk < 1_000_000; blk += 100) m.setSync(o.b.id, blk, blk + 1, false); return m })
    const fragmentedKeys = await keyStats(store, name)
    const fragmentedShardBytes = await shardFileBytes(o.a, name)
    await timeChanges(WARMUP_CHANGES)
    const fragmented = await timeChanges(Math.max(5, Math.floor(o.changes / 2)))
    const fragmentedSpaced = await timeChanges(Math.max(5, Math.floor(o.changes / 2)), SPACING_MS)
    const crossCheck = await crossChecks({ ...o, store, valueBytes: keys.largest, diskBefore, diskAfter, changes: uniform.length })
    Object.assign(crossCheck, await unwatchedChanges(o, body, rand))
    r = {
      backend,
      where: store.core.description,
      blocks,
      createMs,
      keys,
      storedBytes: keys.bytes,
      shardFileBytes: shardBytes,
      seedBytes,
      seedMs,
      changeMs: uniform,
      cpuPerChangeMs,
      cpus: (await import('node:os')).cpus().length,
      wallPerChangeMs: wallMs / uniform.length,
      spacedChangeMs: spaced,
      spacingMs: SPACING_MS,
      fragmentedChangeMs: fragmented,
      fragmentedSpacedChangeMs: fragmentedSpaced,
      fragmentedKeys,
      fragmentedBytes: fragmentedKeys.bytes,
      fragmentedShardFileBytes: fragmentedShardBytes,
      crossCheck
    }
  } finally {
    await store.close()
  }
  await o.a.api('DELETE', `/v1/images/${name}`)
  o.log(`  [${backend}] 1 TiB / 1 MiB blocks: create ${median(createMs).toFixed(1)} ms; ${r.keys.count} keys, ${r.keys.bytes} bytes (largest ${r.keys.largest})` +
    `${r.shardFileBytes !== undefined ? `, shard file ${r.shardFileBytes} bytes` : ''}; seed format ${seedBytes} bytes`)
  o.log(`  [${backend}] sync-state change ${median(r.changeMs).toFixed(2)} ms median, ${max(r.changeMs).toFixed(2)} ms max (${r.changeMs.length}, back to back); ` +
    `spaced ${SPACING_MS} ms apart ${median(r.spacedChangeMs).toFixed(2)} ms median, ${max(r.spacedChangeMs).toFixed(2)} ms max`)
  o.log(`  [${backend}] with 10,000 out-of-sync blocks ${median(r.fragmentedChangeMs).toFixed(2)} ms median, ${max(r.fragmentedChangeMs).toFixed(2)} ms max back to back, ` +
    `${median(r.fragmentedSpacedChangeMs).toFixed(2)} ms median spaced ` +
    `(${r.fragmentedKeys.count} keys, ${r.fragmentedKeys.bytes} bytes, largest ${r.fragmentedKeys.largest})`)
  o.log(`  [${backend}] CPU time per back-to-back change (${r.wallPerChangeMs.toFixed(2)} ms of wall time each, ${r.cpus} CPUs): ${Object.entries(r.cpuPerChangeMs).map(([k, v]) => `${k} ${v.toFixed(2)} ms`).join(', ')}`)
  const c = r.crossCheck
  o.log(`  [${backend}] cross-check: the same changes where no node watches ${median(c.unwatchedChangeMs).toFixed(2)} ms median, ${max(c.unwatchedChangeMs).toFixed(2)} ms max (writer CPU ${c.unwatchedWriterCpuMs.toFixed(2)} ms per change); bare put through the core ${median(c.barePutMs).toFixed(2)} ms median` +
    (c.rawFsyncMs !== undefined ? `; raw write+fsync+rename+dir fsync ${median(c.rawFsyncMs).toFixed(2)} ms median` : '') +
    (c.gatewayPutMs !== undefined ? `; JSON gateway put ${median(c.gatewayPutMs).toFixed(2)} ms, range ${median(c.gatewayRangeMs).toFixed(2)} ms (median)` : '') +
    (c.etcdctlPutMs !== undefined ? `; etcdctl put ${median(c.etcdctlPutMs).toFixed(1)} ms, etcdctl get ${median(c.etcdctlGetMs).toFixed(1)} ms (median, process start included)` : '') +
    (c.walFsync !== undefined ? `; etcd WAL fsyncs during the changes: ${c.walFsync.count} for ${c.walFsync.changes} changes, mean ${c.walFsync.meanMs.toFixed(2)} ms` : ''))
  return r
}

/**
 * The same back-to-back changes of the same 1 TiB image with the same
 * store code on the same backend and disk, where no node watches: another
 * metadata_prefix on the same etcd, another metadata_root beside the
 * cluster's. What the nodes' re-reads of every change cost the writer.
 */
async function unwatchedChanges (o, body, rand) {
  const root = join(o.a.metadataRoot, '..', 'metadata-unwatched')
  const store = await openStoreOf(o.a, o.dist, { prefix: `${o.a.metadataPrefix}-unwatched`, root })
  const { ImageMeta } = await metadataModule(o.dist, 'image.js')
  const meta = new ImageMeta({ name: body.name, size: body.size, blockSize: body.block_size, hypervisors: [] })
  for (const loc of body.locations) meta.addLocation(loc, 0, meta.blockCount, true)
  try {
    await store.create(meta)
    const ms = []
    let cpu0
    for (let i = -WARMUP_CHANGES; i < o.changes; i++) {
      if (i === 0) cpu0 = process.cpuUsage()
      const blk = rand()
      for (const inSync of [false, true]) {
        const c0 = performance.now()
        await store.update(body.name, (m) => { m.setSync(o.b.id, blk, blk + 1, inSync); return m })
        if (i >= 0) ms.push(performance.now() - c0)
      }
    }
    const cpu = process.cpuUsage(cpu0)
    await store.delete(body.name)
    return { unwatchedChangeMs: ms, unwatchedWriterCpuMs: (cpu.user + cpu.system) / 1000 / ms.length }
  } finally {
    await store.close()
    await rm(root, { recursive: true, force: true })
  }
}

/** CPU time (user + system, ms) so far of this process, nodes A and B, and etcd, from /proc. */
async function cpuTimes (o) {
  const tick = 1000 / 100 // USER_HZ: Linux reports /proc/PID/stat times in 1/100 s
  const of = async (pid) => {
    const text = await readFile(`/proc/${pid}/stat`, 'utf8')
    const f = text.slice(text.lastIndexOf(')') + 2).split(' ')
    return (Number(f[11]) + Number(f[12])) * tick
  }
  const u = process.cpuUsage()
  const out = { 'this process (the writer)': (u.user + u.system) / 1000, 'node A': await of(o.a.pid), 'node B': await of(o.b.pid) }
  if (o.etcd?.pid !== undefined) out.etcd = await of(o.etcd.pid)
  return out
}

/** Simpler measurements of what one change costs on this backend (see the header). */
async function crossChecks (o) {
  const key = 'bench/crosscheck'
  const value = 'x'.repeat(Math.max(1, o.valueBytes))
  const out = { valueBytes: value.length }
  out.barePutMs = await timeLoop(o.crossChecks, async () => { await o.store.core.txn([], [{ type: 'put', key, value }]) })
  await o.store.core.txn([], [{ type: 'delete', key }])
  if (o.a.backend === 'file') {
    // The disk's floor for the embedded store's atomic replace, in the same directory.
    const dir = join(o.a.metadataRoot, 'fsync-probe')
    await mkdir(dir, { recursive: true })
    try {
      out.rawFsyncMs = await timeLoop(o.crossChecks, async (i) => {
        const tmp = join(dir, `.probe.${i}.tmp`)
        const fh = await open(tmp, 'w')
        try { await fh.writeFile(value); await fh.sync() } finally { await fh.close() }
        await rename(tmp, join(dir, 'probe.json'))
        const dh = await open(dir, 'r')
        try { await dh.sync() } finally { await dh.close() }
      })
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  }
  if (o.etcd !== undefined) {
    const fullKey = `${o.a.metadataPrefix}/bench/etcdctl-crosscheck`
    out.gatewayPutMs = await timeLoop(o.crossChecks, async () => { await o.etcd.gateway('put', fullKey, value) })
    out.gatewayRangeMs = await timeLoop(o.crossChecks, async () => { await o.etcd.gateway('range', fullKey) })
    out.etcdctlPutMs = await timeLoop(o.crossChecks, async () => { await o.etcd.etcdctl('put', fullKey, value) })
    out.etcdctlGetMs = await timeLoop(o.crossChecks, async () => { await o.etcd.etcdctl('get', fullKey) })
    await o.etcd.etcdctl('del', fullKey)
    const b = o.diskBefore
    const a = o.diskAfter
    out.walFsync = { count: a.walFsyncCount - b.walFsyncCount, meanMs: (a.walFsyncSum - b.walFsyncSum) / (a.walFsyncCount - b.walFsyncCount) * 1000, changes: o.changes }
    // bbolt's backend commits are batched and asynchronous to requests: kept for the record, not a request's cost.
    out.backendCommit = { count: a.commitCount - b.commitCount, meanMs: (a.commitSum - b.commitSum) / (a.commitCount - b.commitCount) * 1000 }
    out.dbSizeBytes = a.dbSize
  }
  return out
}

/**
 * @param {{ a: import('./ukai.mjs').UkaiNode, b: import('./ukai.mjs').UkaiNode, dist: string, repeats: number, log: (s: string) => void }} o
 */
export async function propagation (o) {
  const backend = o.a.backend
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
  o.log(`  [${backend}] propagation A -> B: creation seen ${median(appear.map((x) => x.afterRequestMs)).toFixed(2)} ms after the request (median), removal ${median(vanish.map((x) => x.afterRequestMs)).toFixed(2)} ms`)
  let syncState
  try {
    syncState = await syncStatePropagation({ ...o, until })
  } catch (err) {
    o.log(`  [${backend}] sync-state propagation failed: ${err.message}`)
    return { backend, appear, vanish, syncState: { error: err.message } }
  }
  const r = { backend, appear, vanish, syncState }
  const ss = syncState.changes
  const f = (xs) => `${median(xs).toFixed(2)} ms median, ${max(xs).toFixed(2)} ms max`
  o.log(`  [${backend}] sync-state change through the store until B's volume uses it: ${f(ss.map((x) => x.afterRequestMs))} from the update's start ` +
    `(update itself ${f(ss.map((x) => x.updateMs))}; after it returned ${f(ss.map((x) => x.afterAckMs))}; not before ${median(ss.map((x) => x.appliedAfterRequestMinMs)).toFixed(2)} ms median; ` +
    `one read through B ${median(ss.map((x) => x.readMs)).toFixed(2)} ms median, ${median(ss.map((x) => x.polls))} reads per change)`)
  o.log(`  [${backend}] checks: B's statistics counted the next read against the expected replica ${syncState.statsOk}/${ss.length}; ` +
    `B's refresh at the change's revision ${syncState.refreshOk}/${ss.length} (answered in ${median(ss.map((x) => x.refreshMs)).toFixed(2)} ms median)`)
  return r
}

const MARK_A = 0x41
const MARK_B = 0x42

/** See the header: a sync-state change of block BLOCK of B, until B's reads of it flip. */
async function syncStatePropagation (o) {
  const name = 'prop-sync'
  const BLOCK = 3
  await o.a.api('POST', '/v1/images', { name, size: 16 * MIB, block_size: MIB, locations: [o.a.id, o.b.id] })
  const store = await openStoreOf(o.a, o.dist)
  let fh
  const changes = []
  let refreshOk = 0
  let statsOkCount = 0
  try {
    for (const [node, mark] of [[o.a, MARK_A], [o.b, MARK_B]]) {
      const dir = join(node.imageRoot, name)
      await mkdir(dir, { recursive: true })
      await writeFile(join(dir, blockFileName(BLOCK)), Buffer.alloc(MIB, mark))
    }
    const onB = join(o.b.mountpoint, name)
    await o.until(onB, true)
    fh = await open(onB, constants.O_RDONLY | constants.O_DIRECT)
    const buf = Buffer.alloc(4096)
    const readMark = async () => {
      const { bytesRead } = await fh.read(buf, 0, buf.length, BLOCK * MIB)
      if (bytesRead !== buf.length) throw new Error(`short read of ${bytesRead} bytes from ${onB}`)
      return buf[0]
    }
    const first = await readMark()
    if (first !== MARK_B) throw new Error(`node B read ${first} from its own in-sync replica of block ${BLOCK}, not the 'B' marker: the measure cannot tell which replica B reads`)
    // Reads back to back from before the change starts until one shows it:
    // B applied the change after the last read showing the old state began
    // and before the first showing the new one ended.
    const pollUntil = async (want, started) => {
      const reads = []
      const deadline = performance.now() + 30_000
      await started
      for (;;) {
        const s = performance.now()
        const mark = await readMark()
        const e = performance.now()
        reads.push({ s, e, mark })
        if (mark === want) return reads
        if (e > deadline) throw new Error(`node B still read ${String.fromCharCode(mark)} from block ${BLOCK} 30 s after its sync state changed`)
      }
    }
    for (let i = 0; i < o.repeats; i++) {
      // Out of sync on B: B reads A's replica; back in sync: B's own.
      for (const inSync of [false, true]) {
        await sleep(SPACING_MS)
        let go
        const started = new Promise((resolve) => { go = resolve })
        const polling = pollUntil(inSync ? MARK_B : MARK_A, started)
        go()
        const t0 = performance.now()
        const meta = await store.update(name, (m) => { m.setSync(o.b.id, BLOCK, BLOCK + 1, inSync); return m })
        const ack = performance.now()
        const reads = await polling
        const first = reads[reads.length - 1]
        const lastOld = reads[reads.length - 2]
        const seen = { at: first.e, after: Math.max(t0, lastOld?.s ?? t0), polls: reads.length, readMs: reads.map((x) => x.e - x.s) }
        // The read after the flip, as B's own statistics count it.
        const expected = inSync ? o.b.id : o.a.id
        const before = await readsFrom(o.b, name)
        await readMark()
        const after = await readsFrom(o.b, name)
        const statsOk = (after[expected] ?? 0) - (before[expected] ?? 0) === 1
        if (statsOk) statsOkCount++
        const r0 = performance.now()
        const refresh = await httpCall(o.b.controlPort, 'POST', `/v1/images/${name}/refresh`, { revision: meta.revision }, await o.b.controlToken())
        const refreshMs = performance.now() - r0
        const bRevision = refresh.status === 200 ? JSON.parse(refresh.text).revision : NaN
        if (bRevision >= meta.revision) refreshOk++
        changes.push({
          inSync,
          updateMs: ack - t0,
          // Upper bounds: the end of the first read that showed the change.
          afterAckMs: seen.at - ack,
          afterRequestMs: seen.at - t0,
          // Lower bound: the start of the last read that did not.
          appliedAfterRequestMinMs: seen.after - t0,
          polls: seen.polls,
          readMs: median(seen.readMs),
          revision: meta.revision,
          bRevision,
          refreshMs,
          statsOk
        })
      }
    }
  } finally {
    await fh?.close()
    await store.close()
  }
  // B's open record goes once its FUSE release has run.
  const deadline = Date.now() + 15_000
  for (;;) {
    try {
      await o.a.api('DELETE', `/v1/images/${name}`)
      break
    } catch (err) {
      if (!/BUSY/.test(err.message) || Date.now() > deadline) throw err
      await sleep(100)
    }
  }
  return { block: BLOCK, changes, refreshOk, statsOk: statsOkCount }
}

/** B's reads of an image per location, from its own I/O statistics. */
async function readsFrom (node, name) {
  const { status, text } = await httpCall(node.controlPort, 'GET', `/v1/images/${name}/stats`, undefined, await node.controlToken())
  if (status !== 200) throw new Error(`GET /v1/images/${name}/stats on node ${node.name}: ${status} ${text.slice(0, 200)}`)
  return JSON.parse(text).readsFrom ?? {}
}
