/**
 * The power-loss layer (test/tools/powerloss-fs.ts) from a test: a
 * process of its own serving a FUSE mount over a backing directory that
 * keeps whatever was not fsynced in memory. `cut()` is the power going:
 * everything not durable is thrown away and the mount goes; `restart()`
 * mounts the durable state again. The test process only ever touches the
 * mount asynchronously, and never serves it.
 *
 * Everything started here is ended by its PID, every mount is unmounted
 * (fusermount -uz) and the directory removed by `destroy()`, also after a
 * failure.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { access, constants as fsConstants, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { run, type TestNode } from './node-process.js'

/** dist/test/helpers/ -> dist/test/tools/powerloss-fs.js */
export const POWERLOSS_TOOL = fileURLToPath(new URL('../tools/powerloss-fs.js', import.meta.url))

export interface LayerStatus {
  frozen: boolean
  stats: { writes: number, bytesWritten: number, fsyncs: number, fsyncdirs: number, syncs: number }
  /** What a cut would throw away now. */
  volatile: string[]
}

/** Resolves when `p` settles or after `ms`, whichever comes first; the timer never holds the process. */
async function within (p: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined
  await Promise.race([p.catch(() => {}), new Promise((resolve) => { timer = setTimeout(resolve, ms) })])
  clearTimeout(timer)
}

async function isMounted (path: string): Promise<boolean> {
  const mounts = await readFile('/proc/self/mounts', 'utf8')
  return mounts.split('\n').some((l) => l.split(' ')[1] === path)
}

/** Layers of this process still running: ended (by PID) and unmounted if the process exits without destroying them. */
const live = new Set<PowerLossFs>()
process.once('exit', () => {
  for (const l of live) {
    try { l.proc?.kill('SIGKILL') } catch {}
    // This process never serves the mount, so a synchronous unmount is safe here.
    spawnSync('fusermount', ['-uz', l.mountpoint], { stdio: 'ignore' })
  }
})

export class PowerLossFs {
  readonly dir: string
  /** Holds the durable state, and only that. */
  readonly backing: string
  readonly mountpoint: string
  readonly control: string
  proc: ChildProcess | undefined
  output = ''
  /** What the last cut threw away. */
  lastDiscarded: string[] = []

  private constructor (dir: string) {
    this.dir = dir
    this.backing = join(dir, 'backing')
    this.mountpoint = join(dir, 'mnt')
    this.control = join(dir, 'control.sock')
  }

  /** A new layer over an empty backing directory, mounted. */
  static async start (prefix = 'ukai-powerloss-'): Promise<PowerLossFs> {
    const dir = await mkdtemp(join(tmpdir(), prefix))
    const fs = new PowerLossFs(dir)
    try {
      await mkdir(fs.backing)
      await fs.launch()
    } catch (err) {
      await fs.destroy()
      throw err
    }
    return fs
  }

  /** A path inside the mount. */
  path (...parts: string[]): string { return join(this.mountpoint, ...parts) }

  get running (): boolean {
    const p = this.proc
    return p !== undefined && p.exitCode === null && p.signalCode === null
  }

  /** Starts the layer process over the backing directory and waits until the mount answers. */
  async launch (): Promise<void> {
    if (this.running) throw new Error('the power-loss layer is already running')
    const proc = spawn(process.execPath, [POWERLOSS_TOOL, this.backing, this.mountpoint, this.control], { stdio: ['ignore', 'pipe', 'pipe'] })
    this.proc = proc
    live.add(this)
    this.output = ''
    proc.stdout.on('data', (c: Buffer) => { this.output += c.toString() })
    proc.stderr.on('data', (c: Buffer) => { this.output += c.toString() })
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        proc.kill('SIGKILL')
        reject(new Error(`powerloss-fs did not mount in 20 s:\n${this.output}`))
      }, 20_000)
      const onData = (): void => {
        if (!this.output.includes('powerloss-fs: ready')) return
        clearTimeout(timer)
        proc.stdout.off('data', onData)
        proc.off('exit', onExit)
        resolve()
      }
      const onExit = (code: number | null): void => {
        clearTimeout(timer)
        reject(new Error(`powerloss-fs exited (${code ?? 'signal'}) before it mounted:\n${this.output}`))
      }
      proc.stdout.on('data', onData)
      proc.once('exit', onExit)
    })
  }

  /** One request on the control socket. */
  async request<T = Record<string, unknown>> (cmd: string): Promise<T & { ok: boolean, error?: string }> {
    const sock = connect({ path: this.control })
    sock.setEncoding('utf8')
    let data = ''
    return await new Promise((resolve, reject) => {
      sock.once('error', reject)
      sock.on('data', (c: string) => {
        data += c
        const i = data.indexOf('\n')
        if (i === -1) return
        sock.end()
        const reply = JSON.parse(data.slice(0, i)) as T & { ok: boolean, error?: string }
        if (!reply.ok) reject(new Error(`powerloss-fs ${cmd}: ${reply.error ?? 'failed'}`))
        else resolve(reply)
      })
      sock.write(JSON.stringify({ cmd }) + '\n')
    })
  }

  async status (): Promise<LayerStatus> {
    return await this.request<LayerStatus>('status')
  }

  /** sync(2): everything durable now (a state a test starts from). */
  async sync (): Promise<void> {
    await this.request('sync')
  }

  /**
   * The power goes: from the moment the layer takes the request nothing
   * more becomes durable and every operation fails with EIO; then the
   * mount goes and the process exits. `alsoKill` (the processes that die
   * with the power) get SIGKILL right after the cut took effect. Returns
   * what was thrown away.
   */
  async cut (alsoKill: TestNode[] = []): Promise<string[]> {
    const exited = this.proc === undefined ? Promise.resolve() : once(this.proc, 'exit').then(() => {})
    const reply = await this.request<{ discarded: string[] }>('cut')
    await Promise.all(alsoKill.map(async (n) => await n.stop('SIGKILL')))
    await within(exited, 15_000)
    await this.kill()
    this.lastDiscarded = reply.discarded
    return reply.discarded
  }

  /** Mounts the durable state again after a cut. */
  async restart (): Promise<void> {
    await this.launch()
  }

  /** A clean unmount: everything made durable first. */
  async unmount (): Promise<void> {
    if (!this.running) return
    const exited = once(this.proc!, 'exit')
    await this.request('unmount')
    await within(exited, 15_000)
    await this.kill()
  }

  /** Ends the process (by its PID) if it still runs and clears the mount if it is still there. */
  private async kill (): Promise<void> {
    const proc = this.proc
    if (proc !== undefined && proc.exitCode === null && proc.signalCode === null) {
      const exited = once(proc, 'exit')
      proc.kill('SIGKILL')
      await exited
    }
    this.proc = undefined
    if (await isMounted(this.mountpoint)) await run('fusermount', ['-uz', this.mountpoint])
  }

  /** Ends everything and removes the directory; safe to call twice, and after a failure. */
  async destroy (): Promise<void> {
    if (this.running) {
      // SIGTERM is a cut too; SIGKILL if it does not go.
      const proc = this.proc!
      const exited = once(proc, 'exit')
      proc.kill('SIGTERM')
      const timer = setTimeout(() => proc.kill('SIGKILL'), 5_000)
      await exited
      clearTimeout(timer)
    }
    await this.kill()
    live.delete(this)
    await rm(this.dir, { recursive: true, force: true })
  }
}

let availability: Promise<string | undefined> | undefined

/**
 * Why the power-loss layer cannot run here (no /dev/fuse, no mount(8) or
 * fusermount, mounting not permitted: the layer mounts with mount(8) and
 * needs root or CAP_SYS_ADMIN), or undefined when it can: a layer is
 * mounted, written, synced, cut and mounted again once to find out.
 */
export async function powerLossUnavailable (): Promise<string | undefined> {
  availability ??= (async () => {
    try {
      await access('/dev/fuse', fsConstants.R_OK | fsConstants.W_OK)
    } catch {
      return 'FUSE is not available: /dev/fuse cannot be opened'
    }
    for (const cmd of ['mount', 'umount', 'fusermount']) {
      if ((await run('sh', ['-c', `command -v ${cmd}`])).code !== 0) return `FUSE is not available: ${cmd} is not installed`
    }
    let layer: PowerLossFs | undefined
    try {
      layer = await PowerLossFs.start('ukai-powerloss-probe-')
      await writeFile(layer.path('probe'), 'probe')
      await layer.sync()
      await layer.cut()
      await layer.restart()
      if (await readFile(layer.path('probe'), 'utf8') !== 'probe') return 'the power-loss layer does not keep synced data'
      return undefined
    } catch (err) {
      return `FUSE is not available: the power-loss layer could not be mounted (${(err as Error).message.split('\n').slice(0, 3).join(' ')})`
    } finally {
      await layer?.destroy()
    }
  })()
  return await availability
}
