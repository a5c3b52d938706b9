/**
 * A real etcd for the benchmark (Debian's etcd-server, /usr/bin/etcd): one
 * member on 127.0.0.1 with free client and peer ports, its data directory
 * inside the benchmark's temporary directory (the same disk as the block
 * files and the embedded store's metadata_root), started as a tracked
 * Daemon so that it is ended by its PID, also on Ctrl-C (proc.mjs
 * cleanup), and its directory removed when it stops.
 *
 * etcd runs with its defaults (fsync of the WAL on every commit, 100 ms
 * heartbeat, 1 s election timeout): what a deployment gets.
 */
import { mkdir, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { Daemon, run } from './proc.mjs'
import { freePort } from './ukai.mjs'

export const ETCD = '/usr/bin/etcd'
export const ETCDCTL = '/usr/bin/etcdctl'

export class BenchEtcd {
  /**
   * @param {string} dir a directory of its own (created; removed by `stop`)
   * @param {string} [logFile] where etcd's output goes (default: in `dir`)
   */
  constructor (dir, logFile) {
    this.dir = dir
    this.logFile = logFile ?? join(dir, 'etcd.log')
    this.dataDir = join(dir, 'data')
    this.clientPort = 0
    this.peerPort = 0
    /** @type {Daemon | undefined} */
    this.daemon = undefined
  }

  get url () { return `http://127.0.0.1:${this.clientPort}` }
  get servers () { return [this.url] }
  get pid () { return this.daemon?.pid }

  /** First line of `etcd --version` ("etcd Version: 3.4.23"). */
  static async version () {
    const r = await run(ETCD, ['--version'], { allowFail: true })
    return r.code === 0 ? r.stdout.split('\n')[0].replace(/^etcd Version:\s*/, '') : undefined
  }

  /** Starts etcd and waits until /health says it serves. */
  async start () {
    await mkdir(this.dir, { recursive: true })
    this.clientPort = await freePort()
    this.peerPort = await freePort()
    const peer = `http://127.0.0.1:${this.peerPort}`
    this.daemon = new Daemon('etcd', ETCD, [
      '--name', 'bench',
      '--data-dir', this.dataDir,
      '--listen-client-urls', this.url,
      '--advertise-client-urls', this.url,
      '--listen-peer-urls', peer,
      '--initial-advertise-peer-urls', peer,
      '--initial-cluster', `bench=${peer}`,
      '--initial-cluster-state', 'new',
      '--initial-cluster-token', `ukai-bench-${process.pid}`
    ], { log: this.logFile })
    await this.daemon.start()
    const deadline = Date.now() + 20_000
    for (;;) {
      if (this.daemon.child.exitCode !== null || this.daemon.child.signalCode !== null) {
        throw new Error(`etcd exited before it served; see ${this.logFile}`)
      }
      try {
        const res = await fetch(`${this.url}/health`)
        const body = await res.json()
        if (body.health === 'true') return
      } catch {}
      if (Date.now() > deadline) {
        await this.stop()
        throw new Error('etcd did not become healthy in 20 s')
      }
      await sleep(100)
    }
  }

  /** `etcdctl --endpoints URL ARGS...` (API v3), with its wall-clock time. */
  async etcdctl (...args) {
    return await run(ETCDCTL, ['--endpoints', this.url, ...args], { env: { ...process.env, ETCDCTL_API: '3' }, input: '' })
  }

  /**
   * One put or one read through etcd's JSON gateway (`POST /v3/kv/put`,
   * `/v3/kv/range`, HTTP/1.1 with keep-alive): a client that shares no
   * code with UKAI's store or its etcd3 (gRPC) client.
   */
  async gateway (op, key, value) {
    const b64 = (x) => Buffer.from(x).toString('base64')
    const body = op === 'put' ? { key: b64(key), value: b64(value) } : { key: b64(key) }
    const res = await fetch(`${this.url}/v3/kv/${op}`, { method: 'POST', body: JSON.stringify(body), headers: { 'content-type': 'application/json' } })
    const doc = await res.json()
    if (res.status !== 200 || doc.header === undefined) throw new Error(`etcd gateway ${op}: ${res.status} ${JSON.stringify(doc).slice(0, 200)}`)
    return doc
  }

  /**
   * etcd's own account of its disk: the WAL fsync and backend commit
   * histograms from /metrics (sums in seconds, counts).
   */
  async diskMetrics () {
    const text = await (await fetch(`${this.url}/metrics`)).text()
    const num = (name) => Number(new RegExp(`^${name} ([0-9.e+-]+)$`, 'm').exec(text)?.[1] ?? NaN)
    return {
      walFsyncSum: num('etcd_disk_wal_fsync_duration_seconds_sum'),
      walFsyncCount: num('etcd_disk_wal_fsync_duration_seconds_count'),
      commitSum: num('etcd_disk_backend_commit_duration_seconds_sum'),
      commitCount: num('etcd_disk_backend_commit_duration_seconds_count'),
      dbSize: num('etcd_mvcc_db_total_size_in_bytes')
    }
  }

  /** Ends etcd by its PID (SIGTERM, SIGKILL after 10 s) and removes its directory. */
  async stop () {
    await this.daemon?.stop(10_000)
    this.daemon = undefined
    await rm(this.dir, { recursive: true, force: true })
  }
}
