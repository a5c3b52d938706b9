/**
 * Runs qemu-system-x86_64 (TCG) for tests: the test guest of guest.ts on
 * one disk (an NBD export over a unix socket, or a raw file such as one on
 * a UKAI FUSE mount), its serial console read through a pipe, a QMP client
 * on a unix socket, and live migration over TCP on 127.0.0.1.
 *
 * Every process started here is ended by its PID: by quit()/stop(), and,
 * as a last resort, when the test process exits.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { EventEmitter } from 'node:events'
import { mkdtemp, rm } from 'node:fs/promises'
import { connect, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'

/** `p`, or undefined after `ms`; the timer is cleared either way (a pending timer would keep the test process alive). */
async function within<T> (p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined
  const expired = new Promise<undefined>((resolve) => { timer = setTimeout(() => resolve(undefined), ms) })
  try {
    return await Promise.race([p, expired])
  } finally { clearTimeout(timer) }
}

// ---------------------------------------------------------------------------
// QMP

export interface QmpEvent { event: string, data?: unknown, timestamp?: { seconds: number, microseconds: number } }

export class QmpError extends Error {
  readonly errorClass: string
  constructor (command: string, errorClass: string, desc: string) {
    super(`QMP ${command}: ${errorClass}: ${desc}`)
    this.errorClass = errorClass
  }
}

/** A minimal QMP client: JSON objects, one per line, over a unix socket. */
export class QmpClient extends EventEmitter {
  readonly events: QmpEvent[] = []
  greeting: unknown
  private readonly socket: Socket
  private buf = ''
  private nextId = 1
  private readonly pending = new Map<string, { command: string, resolve: (v: unknown) => void, reject: (e: Error) => void }>()
  private closedError: Error | undefined
  private greeted: ((v: unknown) => void) | undefined

  private constructor (socket: Socket) {
    super()
    this.socket = socket
    socket.setEncoding('utf8')
    socket.on('data', (chunk: string) => this.onData(chunk))
    const onClose = (err?: Error): void => {
      this.closedError ??= err ?? new Error('QMP connection closed')
      for (const p of this.pending.values()) p.reject(new Error(`QMP ${p.command}: ${this.closedError.message}`))
      this.pending.clear()
      this.emit('close')
    }
    socket.on('error', (err) => onClose(err))
    socket.on('close', () => onClose())
  }

  /** Connects to `path`, retrying until it exists (or `deadline`, or `alive()` says the server is gone), and negotiates capabilities. */
  static async connect (path: string, timeoutMs = 15_000, alive: () => boolean = () => true): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs
    let lastErr: unknown
    for (;;) {
      if (!alive()) throw new Error(`QMP ${path}: the process exited before its QMP socket accepted a connection`)
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path)
          s.once('connect', () => { s.off('error', reject); resolve(s) })
          s.once('error', reject)
        })
        const client = new QmpClient(socket)
        const greeting = new Promise<unknown>((resolve) => { client.greeted = resolve })
        const closed = new Promise<undefined>((resolve) => client.once('close', () => resolve(undefined)))
        client.greeting = await within(Promise.race([greeting, closed]), Math.max(1, deadline - Date.now()))
        if (client.greeting === undefined) { client.close(); throw new Error(`QMP ${path}: no greeting`) }
        await client.execute('qmp_capabilities')
        return client
      } catch (err) {
        lastErr = err
        if (Date.now() > deadline) throw new Error(`QMP ${path}: cannot connect: ${String(lastErr)}`)
        await sleep(50)
      }
    }
  }

  private onData (chunk: string): void {
    this.buf += chunk
    let nl: number
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim()
      this.buf = this.buf.slice(nl + 1)
      if (line === '') continue
      let msg: Record<string, unknown>
      try { msg = JSON.parse(line) } catch { continue }
      if ('QMP' in msg) { this.greeted?.(msg.QMP); this.greeted = undefined; continue }
      if (typeof msg.event === 'string') {
        const ev = msg as unknown as QmpEvent
        this.events.push(ev)
        this.emit('event', ev)
        continue
      }
      const id = typeof msg.id === 'string' ? msg.id : undefined
      const p = id === undefined ? undefined : this.pending.get(id)
      if (p === undefined) continue
      this.pending.delete(id!)
      if ('error' in msg) {
        const e = msg.error as { class?: string, desc?: string }
        p.reject(new QmpError(p.command, e.class ?? 'Error', e.desc ?? JSON.stringify(e)))
      } else p.resolve(msg.return)
    }
  }

  /** Runs a command; resolves with its `return`, rejects with QmpError. */
  async execute<T = unknown> (command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedError !== undefined) throw new Error(`QMP ${command}: ${this.closedError.message}`)
    const id = `t${this.nextId++}`
    const result = new Promise<unknown>((resolve, reject) => this.pending.set(id, { command, resolve, reject }))
    this.socket.write(JSON.stringify(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id }) + '\n')
    return await result as T
  }

  /** Resolves with the first event named `name` from now on (or already seen after `since`, an index into events). */
  async waitForEvent (name: string, timeoutMs: number, since = this.events.length): Promise<QmpEvent> {
    const seen = this.events.slice(since).find((e) => e.event === name)
    if (seen !== undefined) return seen
    return await new Promise<QmpEvent>((resolve, reject) => {
      const timer = setTimeout(() => { this.off('event', onEvent); reject(new Error(`no QMP event ${name} in ${timeoutMs} ms`)) }, timeoutMs)
      const onEvent = (e: QmpEvent): void => {
        if (e.event !== name) return
        clearTimeout(timer)
        this.off('event', onEvent)
        resolve(e)
      }
      this.on('event', onEvent)
    })
  }

  close (): void { this.socket.destroy() }
}

// ---------------------------------------------------------------------------
// QEMU processes

export type QemuDisk =
  | { nbd: { socket: string, export: string } }
  | { file: string }
  /**
   * A writable all-zeros stand-in of `sizeBytes` (null-co under a raw node)
   * for a migration destination that may not open the real disk until the
   * source has let go of it; attachDisk() swaps the real one in.
   */
  | { placeholder: { sizeBytes: number } }

/** node-name of the raw node a placeholder disk sits under. */
const FORMAT_NODE = 'ukai-fmt'
/** node-name of the disk attachDisk adds. */
const ATTACHED_NODE = 'ukai-disk'

export interface QemuOptions {
  kernel: string
  initrd: string
  append: string
  disk: QemuDisk
  /** Start as a migration destination: listen on tcp:127.0.0.1:PORT, or `defer` (migrate-incoming later). */
  incoming?: { port: number } | 'defer'
  /** -S: do not start the CPUs (after an incoming migration too) until resume(). */
  startPaused?: boolean
  memoryMiB?: number
  /** Appended to the -drive value (",key=value..."; a later key overrides an earlier one). */
  driveExtra?: string
  /** A label in messages. */
  name?: string
  extraArgs?: string[]
}

export interface MigrationResult {
  status: string
  /** QEMU's total-time, ms. */
  totalTimeMs: number
  /** QEMU's downtime (guest stopped), ms. */
  downtimeMs: number
  setupTimeMs: number | undefined
  /** Wall clock of migrateTo from the migrate command to completed, ms. */
  wallMs: number
  ramTransferredBytes: number | undefined
  /** The last query-migrate answer. */
  info: Record<string, unknown>
}

const live = new Set<ChildProcess>()
let exitHookInstalled = false
function track (proc: ChildProcess): void {
  live.add(proc)
  proc.once('exit', () => live.delete(proc))
  if (!exitHookInstalled) {
    exitHookInstalled = true
    // Last resort: a test that failed before its cleanup must not leave a VM behind.
    process.once('exit', () => {
      for (const p of live) { try { if (p.pid !== undefined) process.kill(p.pid, 'SIGKILL') } catch {} }
    })
  }
}

/** The -drive value for `disk` (id d0). Errors are reported to the guest, never pause the VM. */
export function driveArg (disk: QemuDisk): string {
  const common = 'if=none,id=d0,werror=report,rerror=report,read-only=off,auto-read-only=off'
  if ('placeholder' in disk) {
    return `driver=raw,node-name=${FORMAT_NODE},file.driver=null-co,file.size=${disk.placeholder.sizeBytes},file.read-zeroes=on,${common}`
  }
  if ('nbd' in disk) {
    const esc = (s: string): string => s.replace(/,/g, ',,')
    return `driver=nbd,server.type=unix,server.path=${esc(disk.nbd.socket)},export=${esc(disk.nbd.export)},cache.direct=on,${common}`
  }
  return `file=${disk.file.replace(/,/g, ',,')},format=raw,cache=none,file.locking=off,${common}`
}

/** A complete line of the serial console and when it reached the host (Date.now()). */
export interface SerialLine { at: number, line: string }

export class Qemu {
  readonly name: string
  readonly dir: string
  readonly qmpPath: string
  readonly args: string[]
  readonly proc: ChildProcess
  readonly startedAt: number
  readonly incomingPort: number | undefined
  qmp!: QmpClient
  /** Everything the guest wrote on its serial console so far. */
  serial = ''
  /** The serial console's complete lines, each with the time it arrived on the host ("\r" removed). */
  readonly serialLines: SerialLine[] = []
  private partialLine = ''
  /** QEMU's own stderr. */
  stderr = ''
  exitCode: number | null | undefined
  exitSignal: NodeJS.Signals | null | undefined
  readonly exited: Promise<void>
  private readonly serialListeners = new Set<() => void>()

  private constructor (name: string, dir: string, args: string[], proc: ChildProcess, incomingPort: number | undefined) {
    this.name = name
    this.dir = dir
    this.qmpPath = join(dir, 'qmp.sock')
    this.args = args
    this.proc = proc
    this.startedAt = Date.now()
    this.incomingPort = incomingPort
    proc.stdout!.setEncoding('utf8')
    proc.stdout!.on('data', (c: string) => {
      const at = Date.now()
      this.serial += c
      const parts = (this.partialLine + c).split('\n')
      this.partialLine = parts.pop()!
      for (const line of parts) this.serialLines.push({ at, line: line.replace(/\r$/, '') })
      for (const l of this.serialListeners) l()
    })
    proc.stderr!.setEncoding('utf8')
    proc.stderr!.on('data', (c: string) => { this.stderr += c })
    this.exited = new Promise((resolve) => {
      // 'close', not 'exit': the serial pipe has been read to its end.
      proc.once('close', (code, signal) => {
        this.exitCode = code
        this.exitSignal = signal
        for (const l of this.serialListeners) l()
        resolve()
      })
    })
  }

  get pid (): number | undefined { return this.proc.pid }
  get running (): boolean { return this.exitCode === undefined }

  /** Launches QEMU and connects QMP. Throws (with QEMU's stderr) if it exits first. */
  static async start (opts: QemuOptions): Promise<Qemu> {
    const dir = await mkdtemp(join(tmpdir(), 'ukai-qemu-'))
    const qmpPath = join(dir, 'qmp.sock')
    const args = [
      '-accel', 'tcg', '-machine', 'pc', '-cpu', 'qemu64', '-smp', '1', '-m', String(opts.memoryMiB ?? 256),
      '-nographic', '-nodefaults', '-no-user-config', '-no-reboot',
      '-serial', 'stdio',
      '-qmp', `unix:${qmpPath},server=on,wait=off`,
      '-kernel', opts.kernel, '-initrd', opts.initrd, '-append', opts.append,
      '-drive', driveArg(opts.disk) + (opts.driveExtra ?? ''),
      '-device', 'virtio-blk-pci,drive=d0,id=vd0'
    ]
    let incomingPort: number | undefined
    if (opts.startPaused === true) args.push('-S')
    if (opts.incoming === 'defer') args.push('-incoming', 'defer')
    else if (opts.incoming !== undefined) { incomingPort = opts.incoming.port; args.push('-incoming', `tcp:127.0.0.1:${incomingPort}`) }
    args.push(...(opts.extraArgs ?? []))
    const proc = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] })
    track(proc)
    const vm = new Qemu(opts.name ?? 'qemu', dir, args, proc, incomingPort)
    const spawnError = new Promise<never>((_resolve, reject) => proc.once('error', reject))
    try {
      vm.qmp = await Promise.race([QmpClient.connect(qmpPath, 15_000, () => vm.running), spawnError])
    } catch (err) {
      await vm.stop()
      throw new Error(`${vm.name}: QEMU did not start (${String(err)}); exit ${String(vm.exitCode)}; stderr:\n${vm.stderr}`)
    }
    return vm
  }

  /**
   * Resolves with the first match of `re` in the serial output at or after
   * character `from` (default 0). Rejects after `timeoutMs`, or when QEMU exits.
   */
  async waitForSerial (re: RegExp, timeoutMs: number, from = 0): Promise<RegExpExecArray> {
    const flags = re.flags.includes('g') ? re.flags : re.flags + 'g'
    const find = (): RegExpExecArray | null => {
      const g = new RegExp(re.source, flags)
      g.lastIndex = from
      return g.exec(this.serial)
    }
    const now = find()
    if (now !== null) return now
    return await new Promise<RegExpExecArray>((resolve, reject) => {
      const done = (): void => { clearTimeout(timer); this.serialListeners.delete(check) }
      const timer = setTimeout(() => {
        done()
        reject(new Error(`${this.name}: no ${String(re)} on the serial console in ${timeoutMs} ms; last output:\n${this.serial.slice(-2000)}\nstderr:\n${this.stderr}`))
      }, timeoutMs)
      const check = (): void => {
        const m = find()
        if (m !== null) { done(); resolve(m); return }
        if (!this.running) {
          done()
          reject(new Error(`${this.name}: QEMU exited (${String(this.exitCode ?? this.exitSignal)}) before ${String(re)}; last output:\n${this.serial.slice(-2000)}\nstderr:\n${this.stderr}`))
        }
      }
      this.serialListeners.add(check)
    })
  }

  /** query-status: { status: 'running' | 'paused' | 'inmigrate' | 'postmigrate' | ..., running }. */
  async status (): Promise<{ status: string, running: boolean }> {
    return await this.qmp.execute('query-status')
  }

  /**
   * Runs an HMP command (QMP human-monitor-command); resolves with its
   * monitor output. qemu-io prints on QEMU's stdout instead, which is the
   * serial console here (in `serial`).
   */
  async hmp (commandLine: string): Promise<string> {
    return await this.qmp.execute<string>('human-monitor-command', { 'command-line': commandLine })
  }

  /** Pauses the guest's CPUs (QMP stop). */
  async pause (): Promise<void> { await this.qmp.execute('stop') }
  /** Resumes the guest's CPUs (QMP cont). */
  async resume (): Promise<void> { await this.qmp.execute('cont') }

  /**
   * Live-migrates this VM to `dest` (started with `incoming`) over TCP on
   * 127.0.0.1; resolves when QEMU reports completed and the destination
   * runs. Rejects with QEMU's error when the migration fails.
   */
  async migrateTo (dest: Qemu, opts: { timeoutMs?: number, port?: number, downtimeLimitMs?: number } = {}): Promise<MigrationResult> {
    const timeoutMs = opts.timeoutMs ?? 60_000
    let port = dest.incomingPort
    if (port === undefined) {
      if (opts.port === undefined) throw new Error(`${dest.name} was started without -incoming tcp:...; give migrateTo a port for -incoming defer`)
      port = opts.port
      await dest.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` })
    }
    await this.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 8 * 2 ** 30, 'downtime-limit': opts.downtimeLimitMs ?? 300 })
    const t0 = Date.now()
    await this.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` })
    let info: Record<string, unknown> = {}
    for (;;) {
      info = await this.qmp.execute<Record<string, unknown>>('query-migrate')
      const status = String(info.status)
      if (status === 'completed') break
      if (status === 'failed' || status === 'cancelled') {
        throw new Error(`${this.name} -> ${dest.name}: migration ${status}: ${String(info['error-desc'] ?? '')}\n${dest.name} stderr:\n${dest.stderr}\n${this.name} stderr:\n${this.stderr}`)
      }
      if (!dest.running) throw new Error(`${dest.name} exited during migration (${String(dest.exitCode ?? dest.exitSignal)}): ${dest.stderr}`)
      if (Date.now() - t0 > timeoutMs) {
        await this.qmp.execute('migrate_cancel').catch(() => {})
        throw new Error(`${this.name} -> ${dest.name}: migration not done in ${timeoutMs} ms: ${JSON.stringify(info)}`)
      }
      await sleep(20)
    }
    const wallMs = Date.now() - t0
    // The destination runs the guest (or, with -S, stays paused) once it has loaded the state.
    for (;;) {
      const s = await dest.status()
      if (s.status !== 'inmigrate') break
      if (Date.now() - t0 > timeoutMs) throw new Error(`${dest.name}: not running after migration: ${s.status}\n${dest.stderr}`)
      await sleep(20)
    }
    const ram = info.ram as { transferred?: number } | undefined
    return {
      status: String(info.status),
      totalTimeMs: Number(info['total-time']),
      downtimeMs: Number(info.downtime),
      setupTimeMs: info['setup-time'] === undefined ? undefined : Number(info['setup-time']),
      wallMs,
      ramTransferredBytes: ram?.transferred,
      info
    }
  }

  /**
   * Puts the real disk under a placeholder's raw node (blockdev-add, then
   * blockdev-reopen with the new file child), retrying for `retryMs` while
   * the open is refused (a previous user may still be letting go of it).
   */
  async attachDisk (disk: QemuDisk, retryMs = 10_000): Promise<void> {
    let node: Record<string, unknown>
    if ('nbd' in disk) {
      node = { driver: 'nbd', server: { type: 'unix', path: disk.nbd.socket }, export: disk.nbd.export }
    } else if ('file' in disk) {
      node = { driver: 'file', filename: disk.file, locking: 'off', cache: { direct: true } }
    } else throw new Error('attachDisk: a placeholder cannot be attached')
    const deadline = Date.now() + retryMs
    for (;;) {
      try {
        await this.qmp.execute('blockdev-add', { ...node, 'node-name': ATTACHED_NODE, 'read-only': false, 'auto-read-only': false })
        break
      } catch (err) {
        if (!(err instanceof QmpError) || Date.now() > deadline) throw err
        await sleep(100)
      }
    }
    await this.qmp.execute('blockdev-reopen', { options: [{ 'node-name': FORMAT_NODE, driver: 'raw', file: ATTACHED_NODE }] })
  }

  /** QMP quit, then waits for the exit (ends the process by PID if it does not). */
  async quit (timeoutMs = 10_000): Promise<void> {
    if (!this.running) { await this.cleanup(); return }
    await this.qmp.execute('quit').catch(() => {})
    await within(this.exited, timeoutMs)
    await this.stop()
  }

  /** Ends the process by PID (SIGTERM, then SIGKILL), waits for it and removes its directory. */
  async stop (): Promise<void> {
    if (this.running && this.proc.pid !== undefined) {
      try { process.kill(this.proc.pid, 'SIGTERM') } catch {}
      const killed = await within(this.exited.then(() => true), 5_000) ?? false
      if (!killed) {
        try { process.kill(this.proc.pid, 'SIGKILL') } catch {}
        await this.exited
      }
    }
    await this.cleanup()
  }

  private async cleanup (): Promise<void> {
    this.qmp?.close()
    await rm(this.dir, { recursive: true, force: true })
  }
}
