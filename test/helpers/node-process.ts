/**
 * Starts real `ukai server` processes for tests: each with its own temp
 * directory, config, ports and (optionally) FUSE mount and NBD socket.
 * Processes are ended by PID, mounts left by a killed node are unmounted,
 * and the directory is removed.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { request as httpRequest, type IncomingHttpHeaders, type IncomingMessage } from 'node:http'
import { request as httpsRequest } from 'node:https'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'

export const CLI = resolve('dist/src/cli/main.js')

export async function freePort (): Promise<number> {
  const srv = createServer()
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()))
  const port = (srv.address() as { port: number }).port
  await new Promise<void>((r) => srv.close(() => r()))
  return port
}

export interface RunResult { code: number, stdout: string, stderr: string }

/** Runs a command to completion without blocking the event loop. */
export async function run (cmd: string, args: string[], opts: { input?: string | Buffer, env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env })
  const out: Buffer[] = []
  const err: Buffer[] = []
  child.stdout.on('data', (c: Buffer) => out.push(c))
  child.stderr.on('data', (c: Buffer) => err.push(c))
  child.stdin.end(opts.input)
  const [code, signal] = await once(child, 'close') as [number | null, string | null]
  return { code: code ?? (signal !== null ? 128 : 1), stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() }
}

export interface TestNodeOptions {
  mount?: boolean
  nbd?: boolean
  /** Extra config keys. */
  config?: Record<string, unknown>
  /** Reuse a directory (a restart of the same node). */
  dir?: string
  /**
   * A cluster CA directory (ukai cert ca): the node gets its own
   * certificate from it (in <dir>/tls, config key tls_dir) and speaks
   * only TLS on its peer port and TCP NBD listeners.
   */
  tlsCa?: string
}

/** Issues node `id`'s certificate from the CA in `caDir` into `outDir` with the project's own CLI. */
export async function issueNodeCert (caDir: string, id: string, outDir: string): Promise<void> {
  const r = await run(process.execPath, [CLI, 'cert', 'node', id, '--ca', caDir, '--out', outDir])
  if (r.code !== 0) throw new Error(`ukai cert node ${id}: ${r.stderr}`)
}

export class TestNode {
  readonly dir: string
  readonly configPath: string
  readonly config: Record<string, unknown>
  readonly mountpoint: string | undefined
  readonly nbdSocket: string | undefined
  proc: ChildProcess | undefined
  output = ''
  /** More `ukai server` arguments for the next launch (a TCP --nbd listener, ...). */
  extraArgs: string[] = []

  private constructor (dir: string, config: Record<string, unknown>, mount: boolean, nbd: boolean) {
    this.dir = dir
    this.configPath = join(dir, 'config.json')
    this.config = config
    this.mountpoint = mount ? join(dir, 'mnt') : undefined
    this.nbdSocket = nbd ? join(dir, 'nbd.sock') : undefined
  }

  static async start (opts: TestNodeOptions = {}): Promise<TestNode> {
    const dir = opts.dir ?? await mkdtemp(join(tmpdir(), 'ukai-test-'))
    let config: Record<string, unknown>
    try {
      config = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8'))
    } catch {
      const proxy = await freePort()
      config = {
        image_root: 'images',
        metadata_root: 'metadata',
        control_port: await freePort(),
        proxy_port: proxy,
        id: `127.0.0.1:${proxy}`,
        // UKAI_TEST_FUSE_ENGINE=fuse-native runs the FUSE tests on the fallback engine.
        ...(process.env.UKAI_TEST_FUSE_ENGINE !== undefined ? { fuse_engine: process.env.UKAI_TEST_FUSE_ENGINE } : {}),
        ...opts.config
      }
      if (opts.tlsCa !== undefined) {
        await issueNodeCert(opts.tlsCa, config.id as string, join(dir, 'tls'))
        config.tls_dir = 'tls'
      }
      await writeFile(join(dir, 'config.json'), JSON.stringify(config, null, 2))
    }
    const node = new TestNode(dir, config, opts.mount ?? false, opts.nbd ?? false)
    try {
      await node.launch()
    } catch (err) {
      // A directory made for this node goes with it; a reused one stays.
      if (opts.dir === undefined) await rm(dir, { recursive: true, force: true })
      throw err
    }
    return node
  }

  get id (): string { return this.config.id as string }
  get controlPort (): number { return this.config.control_port as number }
  get imageRoot (): string { return resolve(this.dir, this.config.image_root as string) }
  get metadataRoot (): string { return resolve(this.dir, this.config.metadata_root as string) }
  get pid (): number | undefined { return this.proc?.pid }

  /** Starts (or restarts) the server process and waits for its ready line. */
  async launch (): Promise<void> {
    const args = [CLI, 'server', '--config', this.configPath]
    if (this.mountpoint !== undefined) args.push('--mount', this.mountpoint)
    if (this.nbdSocket !== undefined) args.push('--nbd', this.nbdSocket)
    args.push(...this.extraArgs)
    const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    this.proc = proc
    this.output = ''
    proc.stdout.on('data', (c: Buffer) => { this.output += c.toString() })
    proc.stderr.on('data', (c: Buffer) => { this.output += c.toString() })
    await new Promise<void>((resolveReady, reject) => {
      const timer = setTimeout(() => {
        // Not ready: it is ended here, by its PID, not left running.
        proc.kill('SIGKILL')
        reject(new Error(`node did not become ready in 30 s:\n${this.output}`))
      }, 30_000)
      const onData = (): void => {
        if (this.output.includes('ukai: ready')) {
          clearTimeout(timer)
          proc.stdout.off('data', onData)
          resolveReady()
        }
      }
      proc.stdout.on('data', onData)
      proc.once('exit', (code) => {
        clearTimeout(timer)
        reject(new Error(`node exited (${code ?? 'signal'}) before it was ready:\n${this.output}`))
      })
    })
  }

  /** Runs the `ukai` CLI against this node's config. */
  async cli (...args: string[]): Promise<RunResult> {
    return await run(process.execPath, [CLI, '--config', this.configPath, ...args])
  }

  /** `ukai ARGS` with this node's config, which must succeed; its standard output. */
  async cliOk (...args: string[]): Promise<string> {
    const r = await this.cli(...args)
    if (r.code !== 0) throw new Error(`ukai ${args.join(' ')} exited ${r.code}: ${r.stderr}`)
    return r.stdout
  }

  private token: string | undefined

  /** The cluster's control token, as `ukai control-token` prints it. */
  async controlToken (): Promise<string> {
    if (this.token === undefined) {
      const r = await this.cli('control-token')
      if (r.code !== 0) throw new Error(`ukai control-token: ${r.stderr}`)
      this.token = r.stdout.trim()
    }
    return this.token
  }

  /**
   * A control API call with the cluster's token (`token: null`: none; a
   * string: that one instead); HTTPS trusting the cluster CA when the node
   * has a TLS identity. `headers` are sent as given, a `host` one included
   * (fetch cannot set Host); `timeoutMs` bounds the call.
   */
  async api<T = unknown> (method: string, path: string, body?: unknown,
    options: { token?: string | null, headers?: Record<string, string>, timeoutMs?: number, onLine?: (line: unknown) => void } = {}): Promise<{ status: number, headers: IncomingHttpHeaders, body: T }> {
    const r = await this.apiText(method, path, body, options)
    try {
      // A streamed answer (application/x-ndjson) is the list of its lines.
      const ndjson = r.headers['content-type'] === 'application/x-ndjson'
      const parsed: unknown = ndjson ? r.text.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l)) : JSON.parse(r.text)
      return { status: r.status, headers: r.headers, body: parsed as T }
    } catch {
      throw new Error(`${method} ${path}: ${r.status}: ${r.text.slice(0, 200)}`)
    }
  }

  /** The same call as api, its answer as text (GET /metrics); `onLine` gets each line of a streamed answer as it arrives. */
  async apiText (method: string, path: string, body?: unknown,
    options: { token?: string | null, headers?: Record<string, string>, timeoutMs?: number, onLine?: (line: unknown) => void } = {}): Promise<{ status: number, headers: IncomingHttpHeaders, text: string }> {
    const token = options.token === undefined ? await this.controlToken() : options.token
    const payload = body === undefined ? undefined : Buffer.from(typeof body === 'string' ? body : JSON.stringify(body))
    const headers = {
      host: `127.0.0.1:${this.controlPort}`,
      ...(token !== null ? { authorization: `Bearer ${token}` } : {}),
      ...(payload === undefined ? {} : { 'content-type': 'application/json', 'content-length': String(payload.length) }),
      ...options.headers
    }
    const tlsDir = this.config.tls_dir as string | undefined
    const ca = tlsDir === undefined ? undefined : await readFile(join(resolve(this.dir, tlsDir), 'ca-cert.pem'))
    return await new Promise((resolveCall, reject) => {
      const onResponse = (res: IncomingMessage): void => {
        const chunks: Buffer[] = []
        let partial = ''
        res.on('data', (c: Buffer) => {
          chunks.push(c)
          if (options.onLine === undefined) return
          // Each complete line of a streamed answer as it arrives.
          const lines = (partial + c.toString('utf8')).split('\n')
          partial = lines.pop()!
          for (const l of lines) if (l !== '') options.onLine(JSON.parse(l))
        })
        res.on('error', reject)
        res.on('end', () => {
          resolveCall({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') })
        })
      }
      const o = { host: '127.0.0.1', port: this.controlPort, method, path, headers, agent: false, setHost: false }
      const req = ca === undefined ? httpRequest(o, onResponse) : httpsRequest({ ...o, ca, checkServerIdentity: () => undefined }, onResponse)
      req.on('error', reject)
      if (options.timeoutMs !== undefined) req.setTimeout(options.timeoutMs, () => req.destroy(new Error(`no answer in ${options.timeoutMs!} ms`)))
      req.end(payload)
    })
  }

  /** Ends the process with `signal` and waits for it; returns its exit code. */
  async stop (signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    const proc = this.proc
    if (proc === undefined || proc.exitCode !== null || proc.signalCode !== null) return proc?.exitCode ?? null
    const exited = once(proc, 'exit')
    proc.kill(signal)
    const timer = setTimeout(() => proc.kill('SIGKILL'), 20_000)
    const [code] = await exited as [number | null]
    clearTimeout(timer)
    this.proc = undefined
    return code
  }

  /** True when the mount point is still in the kernel's mount table. */
  async isMounted (): Promise<boolean> {
    if (this.mountpoint === undefined) return false
    const mounts = await readFile('/proc/self/mounts', 'utf8')
    return mounts.split('\n').some((l) => l.split(' ')[1] === this.mountpoint)
  }

  /** Stops the node, clears a mount a killed node left, removes the directory. */
  async destroy (): Promise<void> {
    await this.stop('SIGTERM').catch(() => {})
    if (await this.isMounted()) await run('fusermount', ['-uz', this.mountpoint!])
    await rm(this.dir, { recursive: true, force: true })
  }
}
