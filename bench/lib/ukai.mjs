/**
 * UKAI nodes for the benchmark: real `ukai server` processes on loopback,
 * each with its own config, image_root, ports, FUSE mount and NBD socket,
 * sharing one metadata_root (how the embedded store forms a cluster on
 * one machine) or, with `metadataServers`, one etcd (`metadata_servers`,
 * `metadata_prefix`). Images are created with the `ukai` command and
 * driven through the control API, as an operator would.
 */
import { cp, mkdir, symlink, writeFile, readFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { request } from 'node:http'
import { join } from 'node:path'
import { Daemon, run, trackMount, unmount, untrackMount } from './proc.mjs'

/**
 * Copies the compiled node (dist/) to `dir`, so that engineers rebuilding
 * the work tree during a long run cannot change the code under test
 * half-way, with the native file addon (build/Release). node_modules is
 * linked, not copied.
 * @returns {Promise<string>} the path of the snapshot's `ukai` entry point
 */
export async function snapshotBuild (repo, dir, dist = join(repo, 'dist')) {
  await mkdir(dir, { recursive: true })
  await cp(dist, join(dir, 'dist'), { recursive: true })
  await cp(join(repo, 'package.json'), join(dir, 'package.json'))
  // The native addons, where dist/ looks for them (the FUSE engine's only when it was built:
  // without it the mount is fuse-native's).
  await cp(join(repo, 'build', 'Release', 'ukai_fs.node'), join(dir, 'build', 'Release', 'ukai_fs.node'))
  await cp(join(repo, 'build', 'Release', 'ukai_fuse.node'), join(dir, 'build', 'Release', 'ukai_fuse.node')).catch((err) => { if (err.code !== 'ENOENT') throw err })
  await symlink(join(repo, 'node_modules'), join(dir, 'node_modules'))
  return join(dir, 'dist', 'src', 'cli', 'main.js')
}

export async function freePort () {
  const srv = createServer()
  await new Promise((resolve) => srv.listen(0, '127.0.0.1', resolve))
  const port = srv.address().port
  await new Promise((resolve) => srv.close(resolve))
  return port
}

export class UkaiNode {
  /**
   * @param {{ name: string, dir: string, metadataRoot: string, cli: string, mount?: boolean, tlsCa?: string, env?: Record<string, string>, metadataServers?: string[], metadataPrefix?: string }} o
   */
  constructor (o) {
    this.name = o.name
    /** A cluster CA directory: the node gets a certificate from it and speaks mutual TLS to its peers. */
    this.tlsCa = o.tlsCa
    /** etcd client URLs; empty: the embedded store under metadataRoot. */
    this.metadataServers = o.metadataServers ?? []
    this.metadataPrefix = o.metadataPrefix ?? 'ukai'
    /** Extra environment of the server process (experiments: UV_USE_IO_URING, UV_THREADPOOL_SIZE). */
    this.env = o.env ?? {}
    this.dir = o.dir
    this.cli = o.cli
    this.metadataRoot = o.metadataRoot
    this.imageRoot = join(o.dir, 'images')
    this.mountpoint = o.mount === false ? undefined : join(o.dir, 'mnt')
    this.nbdSocket = join(o.dir, 'nbd.sock')
    this.configPath = join(o.dir, 'config.json')
    this.controlPort = 0
    this.proxyPort = 0
    /** @type {Daemon | undefined} */
    this.daemon = undefined
  }

  get id () { return `127.0.0.1:${this.proxyPort}` }
  /** 'etcd' or 'file': the metadata backend the node's config names. */
  get backend () { return this.metadataServers.length > 0 ? 'etcd' : 'file' }
  get pid () { return this.daemon?.pid }

  /** Writes the node's config (ports chosen once, kept across restarts). */
  async configure () {
    await mkdir(this.dir, { recursive: true })
    this.controlPort = await freePort()
    this.proxyPort = await freePort()
    if (this.tlsCa !== undefined) {
      const r = await run(process.execPath, [this.cli, 'cert', 'node', this.id, '--ca', this.tlsCa, '--out', join(this.dir, 'tls')])
      if (r.code !== 0) throw new Error(`ukai cert node ${this.id}: ${r.stderr}`)
    }
    await writeFile(this.configPath, JSON.stringify({
      ...(this.tlsCa !== undefined ? { tls_dir: join(this.dir, 'tls') } : {}),
      image_root: this.imageRoot,
      metadata_root: this.metadataRoot,
      control_port: this.controlPort,
      proxy_port: this.proxyPort,
      id: this.id,
      ...(this.metadataServers.length > 0 ? { metadata_servers: this.metadataServers, metadata_prefix: this.metadataPrefix } : {}),
      // A node stopped on purpose (the outage test) is tried again soon.
      retry_after: 1
    }, null, 2) + '\n')
  }

  /** The `ukai` command with this node's config (offline when the node is stopped). */
  async ukai (...args) {
    return await run(process.execPath, [this.cli, '--config', this.configPath, ...args])
  }

  /**
   * Starts `ukai server`; with `cpuProfDir` under `node --cpu-prof` (the
   * profile is written when the process exits after SIGTERM).
   * @param {{ cpuProfDir?: string, log?: string }} [opts]
   */
  async start (opts = {}) {
    const args = []
    if (opts.cpuProfDir !== undefined) args.push('--cpu-prof', `--cpu-prof-dir=${opts.cpuProfDir}`)
    args.push(this.cli, '--config', this.configPath, 'server', '--nbd', this.nbdSocket)
    if (this.mountpoint !== undefined) {
      args.push('--mount', this.mountpoint)
      trackMount(this.mountpoint)
    }
    this.daemon = new Daemon(`ukai node ${this.name}`, process.execPath, args, {
      log: opts.log ?? join(this.dir, 'server.log'),
      readyLine: /ukai: ready/,
      env: { ...process.env, ...this.env }
    })
    await this.daemon.start()
    // Read now, so that no measured call waits for it.
    await this.controlToken()
  }

  async stop () {
    await this.daemon?.stop()
    this.daemon = undefined
    if (this.mountpoint !== undefined) {
      // A node that stopped cleanly has unmounted already; this only
      // catches one that did not.
      await unmount(this.mountpoint)
      untrackMount(this.mountpoint)
    }
  }

  /** Peak and current resident set size of the server process, in bytes. */
  async memory () {
    const text = await readFile(`/proc/${this.pid}/status`, 'utf8')
    const kb = (key) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN) * 1024
    return { peak: kb('VmHWM'), current: kb('VmRSS') }
  }

  /** The cluster's control API token (`ukai control-token`), read once. */
  async controlToken () {
    if (this.token === undefined) {
      const r = await this.ukai('control-token')
      if (r.code !== 0) throw new Error(`ukai control-token: ${r.stderr}`)
      this.token = r.stdout.trim()
    }
    return this.token
  }

  /** A control API call; resolves with the parsed JSON, rejects with the node's error. */
  async api (method, path, body) {
    const { status, text } = await httpCall(this.controlPort, method, path, body, await this.controlToken())
    const doc = text === '' ? undefined : JSON.parse(text)
    if (status >= 400) throw new Error(`${method} ${path}: ${status} ${doc?.error?.code ?? ''} ${doc?.error?.message ?? text}`)
    return doc
  }

  /**
   * `ukai sync` through the API: the answer is NDJSON progress lines and a
   * final `{"result": ...}`. Resolves with the result (blocks, bytes copied).
   */
  async sync (image, body = {}) {
    const { status, text } = await httpCall(this.controlPort, 'POST', `/v1/images/${encodeURIComponent(image)}/sync`, body, await this.controlToken())
    const lines = text.split('\n').filter((l) => l.trim() !== '').map((l) => JSON.parse(l))
    const last = lines[lines.length - 1]
    if (status >= 400 || last?.error !== undefined || last?.result === undefined) {
      throw new Error(`sync of ${image} failed: ${status} ${JSON.stringify(last?.error ?? last)}`)
    }
    return last.result
  }
}

/** One HTTP request to a control API on 127.0.0.1, with the cluster's bearer token. */
export async function httpCall (port, method, path, body, token) {
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body))
  return await new Promise((resolve, reject) => {
    const req = request({
      host: '127.0.0.1',
      port,
      method,
      path,
      agent: false,
      headers: {
        authorization: `Bearer ${token}`,
        ...(payload === undefined ? {} : { 'content-type': 'application/json', 'content-length': payload.length })
      }
    }, (res) => {
      const chunks = []
      res.on('data', (c) => chunks.push(c))
      res.on('error', reject)
      res.on('end', () => resolve({ status: res.statusCode ?? 500, text: Buffer.concat(chunks).toString('utf8') }))
    })
    req.on('error', reject)
    req.end(payload)
  })
}

/** The block file name of the default blockname_format, `%016d`. */
export function blockFileName (index) {
  return String(index).padStart(16, '0')
}
