/**
 * A throwaway one-host Ceph cluster for the benchmark's RBD peer (Debian's
 * ceph-mon, ceph-mgr, ceph-osd and ceph-common): one monitor, one manager
 * and two BlueStore OSDs, everything on 127.0.0.1 and in a directory of
 * its own inside the benchmark's temporary directory, with cephx on.
 *
 * Every daemon runs in the foreground (`-f`) with the cluster's private
 * config file (`-c DIR/ceph.conf`: its keyrings, admin sockets, logs, run
 * and data directories all under DIR), so nothing under /etc/ceph or
 * /var/lib/ceph is read or written, and each is a tracked Daemon (proc.mjs),
 * ended by its PID, also on Ctrl-C (cleanup). `stop` ends them and removes DIR.
 *
 * Settings for one host: CRUSH places replicas on OSDs, not hosts
 * (`osd_crush_chooseleaf_type = 0`), `mon_allow_pool_size_one` for the
 * size-1 pool, pools with a fixed 32 PGs (no autoscaler).
 *
 * Each OSD's BlueStore sits on a preallocated file (`bluestore_block_path`),
 * opened with O_DIRECT as BlueStore always does: its data never sits in the
 * kernel's page cache. Its warm cache is its own buffer cache, so that is
 * given the room to hold every byte the OSD stores (no autotuning, 95% of
 * it for data, written data kept there: `bluestore_default_buffered_write`),
 * and the OSD runs with its SSD settings (the file's disk may report itself
 * rotational). The client (fio's rbd engine, librbd) has its RBD cache on
 * in writeback mode from the first write, as qemu-nbd `--cache=writeback`.
 */
import { randomUUID } from 'node:crypto'
import { rmSync } from 'node:fs'
import { mkdir, mkdtemp, rm, statfs, writeFile, open } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { Daemon, run } from './proc.mjs'
import { freePort } from './ukai.mjs'

const MIB = 2 ** 20
const TMPFS_MAGIC = 0x01021994
/** Placement groups per pool: enough to spread 2 OSDs' data evenly, few enough for 2 CPUs. */
const PG_NUM = 32

/** Debian commands the cluster needs, with the package that ships each. */
export const CEPH_COMMANDS = {
  'ceph-mon': 'ceph-mon',
  'ceph-mgr': 'ceph-mgr',
  'ceph-osd': 'ceph-osd',
  ceph: 'ceph-common',
  rbd: 'ceph-common',
  'ceph-authtool': 'ceph-common',
  monmaptool: 'ceph-base'
}

export class BenchCeph {
  /**
   * @param {string} dir a directory of its own (created; removed by `stop`)
   * @param {{ dataBytes: number, blockDir?: string, log?: (s: string) => void }} o
   *   dataBytes: the most bytes one OSD will store (sizes its cache and block file);
   *   blockDir: where the OSDs' block files go (default: `dir`; a directory of its
   *   own, created and removed with the cluster)
   */
  constructor (dir, o) {
    this.dir = dir
    this.blockDir = o.blockDir ?? dir
    this.conf = join(dir, 'ceph.conf')
    this.dataBytes = o.dataBytes
    this.log = o.log ?? (() => {})
    this.fsid = randomUUID()
    /** @type {Daemon[]} */
    this.daemons = []
    this.osds = [0, 1]
    // The block files may live outside the benchmark's temporary directory
    // (on /dev/shm): removed however the process ends, also after Ctrl-C,
    // once proc.mjs cleanup has ended the OSDs.
    this.onExit = () => { rmSync(this.blockDir, { recursive: true, force: true }) }
  }

  /** `ceph --version` as "16.2.15 pacific (stable)", or undefined when it is not installed. */
  static async version () {
    const r = await run('ceph', ['--version'], { allowFail: true }).catch(() => undefined)
    return r?.code === 0 ? r.stdout.trim().replace(/^ceph version /, '').replace(/ \([0-9a-f]+\)/, '') : undefined
  }

  /** The commands that are missing, with their packages (empty: the cluster can be made). */
  static async missing () {
    const out = []
    for (const [cmd, pkg] of Object.entries(CEPH_COMMANDS)) {
      const r = await run('sh', ['-c', `command -v ${cmd}`], { allowFail: true })
      if (r.code !== 0) out.push(`${cmd} (Debian ${pkg})`)
    }
    return out
  }

  /** BlueStore cache of one OSD: what it stores, a quarter more, and 256 MiB for RocksDB and onodes. */
  get cacheBytes () { return Math.ceil(this.dataBytes * 1.25 / MIB) * MIB + 256 * MIB }

  async #config (monAddr) {
    const d = this.dir
    const lines = [
      '[global]',
      `fsid = ${this.fsid}`,
      `mon host = ${monAddr}`,
      'mon initial members = a',
      'public addr = 127.0.0.1',
      'public network = 127.0.0.0/8',
      'auth cluster required = cephx',
      'auth service required = cephx',
      'auth client required = cephx',
      `run dir = ${d}/run`,
      `admin socket = ${d}/run/$cluster-$name.asok`,
      `pid file = ${d}/run/$cluster-$name.pid`,
      `log file = ${d}/log/$cluster-$name.log`,
      `crash dir = ${d}/crash`,
      'log to stderr = false',
      'err to stderr = true',
      // One host: replicas go to different OSDs, not hosts.
      'osd crush chooseleaf type = 0',
      'osd pool default size = 2',
      'osd pool default min size = 1',
      'osd pool default pg autoscale mode = off',
      'mon allow pool size one = true',
      'mon warn on pool no redundancy = false',
      'mon allow pool delete = true',
      // The benchmark's disk is shared; the monitor should not stop on it.
      'mon data avail warn = 1',
      'mon data avail crit = 0',
      // No manager module beyond the always-on ones.
      'mgr initial modules = ',
      // Logging off on the data path (Ceph's defaults log at 1/5 and keep
      // a memory ring of recent entries, which costs CPU on every op).
      ...['ms', 'osd', 'bluestore', 'bluefs', 'bdev', 'rocksdb', 'objecter', 'rados', 'rbd', 'objectcacher',
        'auth', 'monc', 'filestore', 'journal', 'mon', 'paxos', 'mgr', 'mgrc', 'finisher', 'throttle', 'optracker']
        .map((s) => `debug ${s} = 0/0`),
      '',
      '[client]',
      `keyring = ${d}/ceph.client.admin.keyring`,
      // librbd's cache in writeback mode from the first write (by default
      // it stays writethrough until the guest's first flush, which fio's
      // runs never send): writes are acknowledged from client memory, as
      // qemu-nbd --cache=writeback acknowledges them from the page cache.
      'rbd cache = true',
      'rbd cache policy = writeback',
      'rbd cache writethrough until flush = false',
      '',
      '[mon]',
      `mon data = ${d}/mon.$id`,
      `keyring = ${d}/mon.$id/keyring`,
      '',
      '[mgr]',
      `mgr data = ${d}/mgr.$id`,
      `keyring = ${d}/mgr.$id/keyring`,
      '',
      '[osd]',
      `osd data = ${d}/osd.$id`,
      `keyring = ${d}/osd.$id/keyring`,
      'osd objectstore = bluestore',
      `bluestore block path = ${this.blockDir}/osd.$id.block`,
      // The warm cache: room for everything the OSD stores, nearly all of it for data.
      'bluestore cache autotune = false',
      // LRU: BlueStore's default 2Q cache keeps only half of what was written once.
      'bluestore cache type = lru',
      `bluestore cache size = ${this.cacheBytes}`,
      'bluestore cache meta ratio = 0.02',
      'bluestore cache kv ratio = 0.02',
      'bluestore cache kv onode ratio = 0.01',
      'bluestore default buffered read = true',
      'bluestore default buffered write = true',
      // The block file's disk may say it is rotational; it is not what is measured.
      'bluestore debug enforce settings = ssd',
      `osd memory target = ${this.cacheBytes + 1024 * MIB}`,
      ''
    ]
    await writeFile(this.conf, lines.join('\n'))
  }

  /** `ceph -c CONF ARGS...`, with a connect timeout (a dead monitor fails, never hangs). */
  async ceph (...args) {
    return await run('ceph', ['-c', this.conf, '--connect-timeout', '30', ...args], { timeoutMs: 120_000 })
  }

  async rbd (...args) {
    return await run('rbd', ['-c', this.conf, ...args], { timeoutMs: 600_000 })
  }

  async #daemon (name, cmd, args) {
    const dm = new Daemon(name, cmd, ['-f', '-c', this.conf, ...args], { log: join(this.dir, 'log', `${name.replace(/\W+/g, '-')}.out`) })
    await dm.start()
    this.daemons.push(dm)
    return dm
  }

  /** Makes and starts the cluster; resolves when both OSDs are up and in. */
  async start () {
    const d = this.dir
    await mkdir(this.blockDir, { recursive: true })
    process.once('exit', this.onExit)
    for (const sub of ['run', 'log', 'crash', 'mgr.x', ...this.osds.map((i) => `osd.${i}`)]) await mkdir(join(d, sub), { recursive: true })
    const monAddr = `[v2:127.0.0.1:${await freePort()},v1:127.0.0.1:${await freePort()}]`
    await this.#config(monAddr)
    // ceph-mon --mkfs copies this into its data directory (the `keyring` of [mon]).
    const monKeyring = join(d, 'ceph.mon.keyring')
    const admin = join(d, 'ceph.client.admin.keyring')
    await run('ceph-authtool', ['--create-keyring', monKeyring, '--gen-key', '-n', 'mon.', '--cap', 'mon', 'allow *'])
    await run('ceph-authtool', ['--create-keyring', admin, '--gen-key', '-n', 'client.admin',
      '--cap', 'mon', 'allow *', '--cap', 'osd', 'allow *', '--cap', 'mgr', 'allow *', '--cap', 'mds', 'allow *'])
    await run('ceph-authtool', [monKeyring, '--import-keyring', admin])
    const monmap = join(d, 'monmap')
    await run('monmaptool', ['--create', '--addv', 'a', monAddr, '--fsid', this.fsid, monmap])
    await run('ceph-mon', ['-c', this.conf, '--mkfs', '-i', 'a', '--monmap', monmap, '--keyring', monKeyring])
    await this.#daemon('ceph-mon.a', 'ceph-mon', ['-i', 'a'])
    await this.#until('the monitor answers', async () => (await this.ceph('mon', 'stat').catch(() => undefined)) !== undefined)
    // No client still asking for the old insecure global_id reclaim here.
    await this.ceph('config', 'set', 'mon', 'auth_allow_insecure_global_id_reclaim', 'false')

    await this.ceph('auth', 'get-or-create', 'mgr.x', 'mon', 'allow profile mgr', 'osd', 'allow *', 'mds', 'allow *', '-o', join(d, 'mgr.x', 'keyring'))
    await this.#daemon('ceph-mgr.x', 'ceph-mgr', ['-i', 'x'])

    for (const i of this.osds) {
      const uuid = randomUUID()
      const id = (await this.ceph('osd', 'new', uuid)).stdout.trim()
      if (id !== String(i)) throw new Error(`ceph osd new gave id ${id}, expected ${i}`)
      const keyring = join(d, `osd.${i}`, 'keyring')
      await run('ceph-authtool', ['--create-keyring', keyring, '--gen-key', '-n', `osd.${i}`])
      await this.ceph('auth', 'add', `osd.${i}`, 'osd', 'allow *', 'mon', 'allow profile osd', 'mgr', 'allow profile osd', '-i', keyring)
      // The block file: what it stores, a quarter more, and 2 GiB for BlueFS;
      // preallocated on a disk, sparse on tmpfs (whose preallocation is memory).
      const block = join(this.blockDir, `osd.${i}.block`)
      const bytes = Math.ceil((this.dataBytes * 1.25 + 2 * 2 ** 30) / MIB) * MIB
      const fh = await open(block, 'w')
      await fh.truncate(bytes)
      await fh.close()
      if (!await onTmpfs(this.blockDir)) await run('fallocate', ['-l', String(bytes), block])
      await run('ceph-osd', ['-c', this.conf, '-i', String(i), '--mkfs', '--osd-uuid', uuid], { timeoutMs: 300_000 })
      await this.#daemon(`ceph-osd.${i}`, 'ceph-osd', ['-i', String(i)])
    }
    await this.#until('both OSDs up and in', async () => {
      const st = JSON.parse((await this.ceph('osd', 'stat', '-f', 'json')).stdout)
      return st.num_up_osds === this.osds.length && st.num_in_osds === this.osds.length
    }, 120_000)
  }

  /** A replicated pool of `size` copies for RBD, its PGs active+clean. */
  async createPool (name, size) {
    await this.ceph('osd', 'pool', 'create', name, String(PG_NUM), String(PG_NUM), 'replicated')
    await this.ceph('osd', 'pool', 'set', name, 'size', String(size), ...(size === 1 ? ['--yes-i-really-mean-it'] : []))
    await this.ceph('osd', 'pool', 'set', name, 'min_size', '1')
    await this.rbd('pool', 'init', name)
    await this.#until(`pool ${name} active+clean`, async () => await this.#clean(), 120_000)
  }

  async #clean () {
    const st = JSON.parse((await this.ceph('pg', 'stat', '-f', 'json')).stdout)
    const states = st.pg_summary?.num_pg_by_state ?? st.num_pg_by_state ?? []
    const total = st.pg_summary?.num_pgs ?? st.num_pgs ?? 0
    const clean = states.filter((s) => s.name === 'active+clean').reduce((n, s) => n + s.num, 0)
    return total > 0 && clean === total
  }

  /**
   * An image `pool/name` with the bytes of `file` (`rbd import`, format 2,
   * 4 MiB objects, the default features). BlueStore writes it with
   * O_DIRECT and keeps what it wrote in its buffer cache (see the top).
   */
  async importImage (pool, name, file) {
    await this.rbd('import', '--no-progress', '--image-format', '2', file, `${pool}/${name}`)
  }

  /** Bytes in the OSDs' BlueStore data caches (their mempools), summed. */
  async cachedBytes () {
    let n = 0
    for (const i of this.osds) {
      const r = await run('ceph', ['-c', this.conf, 'daemon', `osd.${i}`, 'dump_mempools'], { allowFail: true, timeoutMs: 30_000 })
      if (r.code !== 0) return NaN
      n += JSON.parse(r.stdout).mempool.by_pool.bluestore_cache_data.bytes
    }
    return n
  }

  /** What fio's rbd engine is pointed at (the client reads this cluster's config through CEPH_CONF). */
  fioTarget (pool, image) {
    return { kind: 'rbd', conf: this.conf, client: 'admin', pool, image }
  }

  async #until (what, check, timeoutMs = 60_000) {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      let ok = false
      try { ok = await check() } catch {}
      if (ok) return
      for (const dm of this.daemons) {
        if (dm.child.exitCode !== null || dm.child.signalCode !== null) throw new Error(`${dm.name} exited while waiting for ${what}; see ${this.dir}/log`)
      }
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; see ${this.dir}/log`)
      await sleep(500)
    }
  }

  /** Ends the OSDs, the manager and the monitor by their PIDs, then removes the directory. */
  async stop () {
    for (const dm of this.daemons.reverse()) await dm.stop(20_000)
    this.daemons = []
    await rm(this.dir, { recursive: true, force: true })
    await rm(this.blockDir, { recursive: true, force: true })
    process.removeListener('exit', this.onExit)
  }
}

async function onTmpfs (dir) {
  return (await statfs(dir)).type === TMPFS_MAGIC
}

/** The RBD targets: an image in a pool of size 2 and one in a pool of size 1. */
export const RBD_IMAGES = {
  'rbd-2': { pool: 'bench-size-2', size: 2, label: 'Ceph RBD, pool size 2 (fio rbd engine)' },
  'rbd-1': { pool: 'bench-size-1', size: 1, label: 'Ceph RBD, pool size 1 (fio rbd engine)' }
}

/**
 * Where the OSDs' block files go by default: a directory of their own on
 * /dev/shm (tmpfs) when it has room for them, so that BlueStore's O_DIRECT
 * writes and WAL fsyncs cost no disk, as every other target's writes land
 * in the page cache unsynced; otherwise under `fallback`.
 */
export async function defaultBlockDir (need, fallback) {
  const st = await statfs('/dev/shm').catch(() => undefined)
  if (st !== undefined && st.type === TMPFS_MAGIC && st.bavail * st.bsize > need * 1.2) {
    return await mkdtemp('/dev/shm/ukai-bench-ceph-')
  }
  return fallback
}

/**
 * Starts the cluster and makes the benchmark's two RBD images (`wanted`
 * of RBD_IMAGES' ids), each of `size` bytes holding the reference file's
 * bytes. Returns the cluster (to stop), the fio targets and what the
 * report says of it. On failure, stops what it started and rejects.
 * @param {{ dir: string, blockDir?: string, reference: string, size: number, wanted: string[], log: (s: string) => void }} o
 */
export async function startRbdPeer (o) {
  const missing = await BenchCeph.missing()
  if (missing.length > 0) throw new Error(`Ceph is not installed: missing ${missing.join(', ')}`)
  // What one OSD stores: every copy of the size-2 image, half of the size-1 one.
  const dataBytes = o.wanted.reduce((n, id) => n + o.size * (RBD_IMAGES[id].size === 2 ? 1 : 0.5), 0)
  const blockNeed = 2 * (dataBytes * 1.25 + 2 * 2 ** 30)
  const blockDir = o.blockDir ?? await defaultBlockDir(dataBytes * 2, join(o.dir, 'blocks'))
  await mkdir(blockDir, { recursive: true })
  if (!await onTmpfs(blockDir)) {
    // Preallocated on a disk: check the room first (on tmpfs only what is written counts, checked above).
    const st = await statfs(blockDir)
    if (st.bavail * st.bsize < blockNeed) throw new Error(`${blockDir} has ${(st.bavail * st.bsize / 2 ** 30).toFixed(1)} GiB free; the OSDs' block files need ${(blockNeed / 2 ** 30).toFixed(1)} GiB`)
  }
  const ceph = new BenchCeph(o.dir, { dataBytes, blockDir, log: o.log })
  try {
    const t0 = Date.now()
    await ceph.start()
    const targets = {}
    for (const id of o.wanted) {
      const { pool, size, label } = RBD_IMAGES[id]
      await ceph.createPool(pool, size)
      await ceph.importImage(pool, 'bench', o.reference)
      targets[id] = { id, label, fio: ceph.fioTarget(pool, 'bench') }
    }
    const fs = await run('findmnt', ['-n', '-o', 'FSTYPE,SOURCE', '-T', blockDir], { allowFail: true })
    const meta = {
      version: await BenchCeph.version(),
      dir: o.dir,
      blockDir,
      blockFs: fs.stdout.trim().split('\n')[0].replace(/\s+/, ' on '),
      blockBytes: blockNeed,
      cacheBytes: ceph.cacheBytes,
      storedPerOsd: dataBytes,
      pools: o.wanted.map((id) => ({ id, pool: RBD_IMAGES[id].pool, size: RBD_IMAGES[id].size })),
      startMs: Date.now() - t0
    }
    return { ceph, targets, meta }
  } catch (err) {
    await ceph.stop().catch(() => {})
    throw err
  }
}
