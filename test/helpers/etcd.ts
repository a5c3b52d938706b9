/**
 * A real etcd (Debian's etcd-server) for tests: one member on 127.0.0.1
 * with free ports and a temp data directory, ended by its PID. It can be
 * stopped and started again on the same data (an etcd outage), or killed.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { freePort } from './node-process.js'

export const ETCD = '/usr/bin/etcd'

/** Why etcd cannot run here, or undefined when it can. */
export function etcdMissing (): string | undefined {
  const r = spawnSync(ETCD, ['--version'], { encoding: 'utf8' })
  return r.status === 0 ? undefined : `etcd is not installed (${ETCD}; Debian package etcd-server)`
}

export class TestEtcd {
  readonly dir: string
  readonly clientPort: number
  readonly peerPort: number
  proc: ChildProcess | undefined
  output = ''

  private constructor (dir: string, clientPort: number, peerPort: number) {
    this.dir = dir
    this.clientPort = clientPort
    this.peerPort = peerPort
  }

  static async start (): Promise<TestEtcd> {
    const dir = await mkdtemp(join(tmpdir(), 'ukai-etcd-'))
    const e = new TestEtcd(dir, await freePort(), await freePort())
    try {
      await e.launch()
    } catch (err) {
      await rm(dir, { recursive: true, force: true })
      throw err
    }
    return e
  }

  get url (): string { return `http://127.0.0.1:${this.clientPort}` }
  get servers (): string[] { return [this.url] }
  get pid (): number | undefined { return this.proc?.pid }

  /** Starts etcd (again, on the same data) and waits until it serves. */
  async launch (): Promise<void> {
    const peer = `http://127.0.0.1:${this.peerPort}`
    const proc = spawn(ETCD, [
      '--name', 'test',
      '--data-dir', join(this.dir, 'data'),
      '--listen-client-urls', this.url,
      '--advertise-client-urls', this.url,
      '--listen-peer-urls', peer,
      '--initial-advertise-peer-urls', peer,
      '--initial-cluster', `test=${peer}`,
      '--initial-cluster-state', 'new',
      // Tests run many short leases; etcd's own default would be fine too.
      '--heartbeat-interval', '100',
      '--election-timeout', '1000'
    ], { stdio: ['ignore', 'pipe', 'pipe'] })
    this.proc = proc
    this.output = ''
    proc.stdout!.on('data', (c: Buffer) => { this.output += c.toString() })
    proc.stderr!.on('data', (c: Buffer) => { this.output += c.toString() })
    const deadline = Date.now() + 20_000
    for (;;) {
      if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`etcd exited before it served:\n${this.output}`)
      try {
        const res = await fetch(`${this.url}/health`)
        const body = await res.json() as { health?: string }
        if (body.health === 'true') return
      } catch {}
      if (Date.now() > deadline) throw new Error(`etcd did not become healthy in 20 s:\n${this.output}`)
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }

  /** Ends the process (SIGTERM, or `signal`) and waits for it. */
  async stop (signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const proc = this.proc
    if (proc === undefined || proc.exitCode !== null || proc.signalCode !== null) return
    const exited = once(proc, 'exit')
    proc.kill(signal)
    const timer = setTimeout(() => proc.kill('SIGKILL'), 10_000)
    await exited
    clearTimeout(timer)
    this.proc = undefined
  }

  async destroy (): Promise<void> {
    await this.stop().catch(() => {})
    await rm(this.dir, { recursive: true, force: true })
  }
}
