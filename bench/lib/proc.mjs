/**
 * Processes the benchmark starts: commands run to completion, and daemons
 * (UKAI nodes, qemu-nbd, nbdkit, bindfs) that serve while the workloads
 * run. Every daemon is remembered by its PID and ended by that PID only;
 * mounts are remembered too, so an interrupted run still unmounts and
 * stops what it started (see `cleanup`).
 */
import { spawn } from 'node:child_process'
import { createWriteStream } from 'node:fs'
import { setTimeout as sleep } from 'node:timers/promises'

/** @typedef {{ code: number, stdout: string, stderr: string, ms: number }} RunResult */

/**
 * Runs a command to completion. Rejects when it exits non-zero, unless
 * `allowFail`; the error message carries the command's stderr.
 * @param {string} cmd
 * @param {string[]} args
 * @param {{ allowFail?: boolean, env?: NodeJS.ProcessEnv, input?: string, timeoutMs?: number }} [opts]
 * @returns {Promise<RunResult>}
 */
export async function run (cmd, args, opts = {}) {
  const t0 = performance.now()
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env })
  const out = []
  const err = []
  child.stdout.on('data', (c) => out.push(c))
  child.stderr.on('data', (c) => err.push(c))
  child.stdin.on('error', () => {})
  child.stdin.end(opts.input)
  let timer
  if (opts.timeoutMs !== undefined) timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs)
  const code = await new Promise((resolve, reject) => {
    child.on('error', reject)
    child.on('close', (c, sig) => resolve(c ?? (sig !== null ? 128 : 1)))
  })
  clearTimeout(timer)
  const r = { code, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString(), ms: performance.now() - t0 }
  if (code !== 0 && opts.allowFail !== true) {
    throw new Error(`${cmd} ${args.join(' ')} exited with ${code}: ${r.stderr.trim() || r.stdout.trim()}`)
  }
  return r
}

/** Daemons and mounts to undo, newest first. */
const daemons = new Set()
const mounts = new Set()

/**
 * A long-running process started by the benchmark. Its output goes to a
 * log file; `ready` resolves when a line matches `readyLine` (or at once
 * when there is none), and rejects if the process exits first.
 */
export class Daemon {
  /**
   * @param {string} name
   * @param {string} cmd
   * @param {string[]} args
   * @param {{ log: string, readyLine?: RegExp, env?: NodeJS.ProcessEnv, readyTimeoutMs?: number }} opts
   */
  constructor (name, cmd, args, opts) {
    this.name = name
    this.cmd = cmd
    this.args = args
    this.opts = opts
    /** @type {import('node:child_process').ChildProcess | undefined} */
    this.child = undefined
    this.exited = undefined
  }

  get pid () { return this.child?.pid }

  /** Starts the process and waits until it says it is ready. */
  async start () {
    const log = createWriteStream(this.opts.log, { flags: 'a' })
    await new Promise((resolve) => log.once('open', resolve))
    const child = spawn(this.cmd, this.args, { stdio: ['ignore', 'pipe', 'pipe'], env: this.opts.env ?? process.env })
    this.child = child
    daemons.add(this)
    this.exited = new Promise((resolve) => child.on('exit', (code, sig) => { daemons.delete(this); resolve({ code, sig }) }))
    let seen = ''
    const ready = new Promise((resolve, reject) => {
      const re = this.opts.readyLine
      if (re === undefined) resolve()
      const onData = (c) => {
        log.write(c)
        if (re === undefined) return
        seen = (seen + c.toString()).slice(-4096)
        if (re.test(seen)) resolve()
      }
      child.stdout.on('data', onData)
      child.stderr.on('data', onData)
      child.on('error', reject)
      this.exited.then(({ code, sig }) => reject(new Error(`${this.name} exited (${code ?? sig}) before it was ready; see ${this.opts.log}: ${seen.trim().slice(-600)}`)))
    })
    const timeout = this.opts.readyTimeoutMs ?? 60_000
    let timer
    try {
      await Promise.race([ready, new Promise((_resolve, reject) => {
        timer = setTimeout(() => reject(new Error(`${this.name} not ready after ${timeout} ms; see ${this.opts.log}`)), timeout)
      })])
    } catch (err) {
      await this.stop()
      throw err
    } finally {
      clearTimeout(timer)
    }
    child.on('exit', () => log.end())
  }

  /** SIGTERM by PID, then SIGKILL if it has not exited after `graceMs`. */
  async stop (graceMs = 20_000) {
    const child = this.child
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) return
    try { process.kill(child.pid, 'SIGTERM') } catch { return }
    const done = await Promise.race([this.exited.then(() => true), sleep(graceMs).then(() => false)])
    if (!done) {
      try { process.kill(child.pid, 'SIGKILL') } catch {}
      await this.exited
    }
  }
}

/** Remembers a mount point so that cleanup unmounts it even if its daemon died. */
export function trackMount (dir) { mounts.add(dir) }
export function untrackMount (dir) { mounts.delete(dir) }

/** Lazily unmounts a FUSE mount point (no error when it is not mounted). */
export async function unmount (dir) {
  await run('fusermount', ['-uz', dir], { allowFail: true })
  mounts.delete(dir)
}

/** Stops every daemon still running (by PID) and unmounts every mount left. */
export async function cleanup () {
  for (const d of [...daemons].reverse()) await d.stop(10_000).catch(() => {})
  for (const m of [...mounts]) await unmount(m)
}

/** Polls `check` until it returns true or `timeoutMs` passes. */
export async function waitFor (what, check, timeoutMs = 30_000, everyMs = 50) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (await check()) return
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(everyMs)
  }
}
