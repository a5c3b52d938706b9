/**
 * Progress of a long CLI command (`ukai sync`, `image move`, `image
 * import` and `image export`), shown the way its reader can use it:
 *
 * - on a terminal (stderr a TTY): a bar (cli-progress) with blocks
 *   done/total, bytes, rate and ETA, redrawn in place;
 * - stderr not a terminal (a log, a pipe): a plain line now and then, at
 *   each tenth of the work or every PLAIN_INTERVAL_MS, and one at the end;
 * - with --json: one JSON object per line on stdout, `{"progress": {...}}`
 *   per update and `{"result": ...}` (or `{"error": ...}`) at the end,
 *   the same lines the control API streams; nothing on stderr.
 *
 * start(blocks, bytes?) once, update({done, bytes}) as often as the work
 * reports, then end(result) or fail(error). With unit 'bytes' (an image
 * import or export), done and total count bytes of the image gone
 * through, and bytes the data moved (holes and zeros are not).
 */
import { SingleBar } from 'cli-progress'
import type { Writable } from 'node:stream'
import { toUkaiError } from '../errors.js'
import { formatSize } from '../util/size.js'

export interface ProgressUpdate {
  /** Blocks done so far. */
  done: number
  /** Bytes copied (or moved) so far. */
  bytes: number
}

/** One progress line of --json output. */
export interface ProgressLine {
  done: number
  total: number
  bytes: number
  total_bytes?: number
  elapsed_s: number
  /** Bytes per second since start. */
  rate: number
  /** Seconds left at that rate, when it can be told. */
  eta_s?: number
}

export interface ProgressReporter {
  start: (totalBlocks: number, totalBytes?: number) => void
  update: (p: ProgressUpdate) => void
  /** The work is done: the bar is finished, or the JSON result line is written. */
  end: (result: unknown) => void
  /** The work failed: the bar stops; with --json an error line is written. */
  fail: (err: unknown) => void
}

export interface ProgressOptions {
  /** What is in progress ("sync vm01"). */
  label: string
  json?: boolean
  /** Defaults: process.stdout and process.stderr. */
  stdout?: Writable
  stderr?: Writable & { isTTY?: boolean }
  /** Longest pause between two plain lines. */
  plainIntervalMs?: number
  /** What done and total count (default: blocks). */
  unit?: 'blocks' | 'bytes'
}

export const PLAIN_INTERVAL_MS = 30_000

export function progressReporter (options: ProgressOptions): ProgressReporter {
  const stdout = options.stdout ?? process.stdout
  const stderr = options.stderr ?? process.stderr
  const unit = options.unit ?? 'blocks'
  if (options.json === true) return new JsonProgress(stdout, unit)
  if (stderr.isTTY === true) return new BarProgress(options.label, stderr, unit)
  return new PlainProgress(options.label, stderr, options.plainIntervalMs ?? PLAIN_INTERVAL_MS, unit)
}

/** Totals and the rate and ETA every form shows. */
class Tally {
  constructor (readonly unit: 'blocks' | 'bytes') {}

  total = 0
  totalBytes: number | undefined
  done = 0
  bytes = 0
  private started = performance.now()

  start (total: number, totalBytes?: number): void {
    this.total = total
    this.totalBytes = totalBytes
    this.started = performance.now()
  }

  update (p: ProgressUpdate): void {
    this.done = p.done
    this.bytes = p.bytes
  }

  get elapsed (): number { return (performance.now() - this.started) / 1000 }

  get rate (): number { return this.elapsed > 0 ? this.bytes / this.elapsed : 0 }

  /** Seconds left: by bytes when their total is known, else by blocks. */
  get eta (): number | undefined {
    if (this.done >= this.total) return 0
    if (this.totalBytes !== undefined && this.rate > 0) return Math.max(0, (this.totalBytes - this.bytes) / this.rate)
    if (this.done === 0) return undefined
    return this.elapsed * (this.total - this.done) / this.done
  }

  line (): ProgressLine {
    const eta = this.eta
    return {
      done: this.done,
      total: this.total,
      bytes: this.bytes,
      ...(this.totalBytes !== undefined ? { total_bytes: this.totalBytes } : {}),
      elapsed_s: round(this.elapsed),
      rate: Math.round(this.rate),
      ...(eta !== undefined ? { eta_s: round(eta) } : {})
    }
  }

  /** "12/64 blocks" or "768 MiB of 4 GiB" */
  count (): string {
    return this.unit === 'bytes' ? `${formatSize(this.done)} of ${formatSize(this.total)}` : `${this.done}/${this.total} blocks`
  }

  /** "768 MiB of 4 GiB" (blocks), "100 MiB of data" (bytes) */
  size (): string {
    if (this.unit === 'bytes') return `${formatSize(this.bytes)} of data`
    return this.totalBytes !== undefined ? `${formatSize(this.bytes)} of ${formatSize(this.totalBytes)}` : formatSize(this.bytes)
  }

  /** "12/64 blocks, 768 MiB of 4 GiB, 240 MiB/s, ETA 14 s" */
  text (): string {
    return `${this.count()}, ${this.size()}, ${formatSize(Math.round(this.rate))}/s, ETA ${duration(this.eta)}`
  }
}

const round = (s: number): number => Math.round(s * 1000) / 1000

/** "14 s", "3 min 05 s", "2 h 01 min"; "?" when it cannot be told. */
export function duration (s: number | undefined): string {
  if (s === undefined || !Number.isFinite(s)) return '?'
  const t = Math.round(s)
  if (t < 60) return `${t} s`
  if (t < 3600) return `${Math.floor(t / 60)} min ${String(t % 60).padStart(2, '0')} s`
  return `${Math.floor(t / 3600)} h ${String(Math.floor(t / 60) % 60).padStart(2, '0')} min`
}

class JsonProgress implements ProgressReporter {
  private readonly tally: Tally
  constructor (private readonly out: Writable, unit: 'blocks' | 'bytes') { this.tally = new Tally(unit) }

  private write (v: unknown): void { this.out.write(JSON.stringify(v) + '\n') }

  start (total: number, totalBytes?: number): void {
    this.tally.start(total, totalBytes)
    this.write({ progress: this.tally.line() })
  }

  update (p: ProgressUpdate): void {
    this.tally.update(p)
    this.write({ progress: this.tally.line() })
  }

  end (result: unknown): void { this.write({ result }) }

  fail (err: unknown): void {
    const e = toUkaiError(err)
    this.write({ error: { code: e.code, message: e.message } })
  }
}

class BarProgress implements ProgressReporter {
  private readonly tally: Tally
  private readonly bar: SingleBar
  private running = false

  constructor (label: string, stream: Writable, unit: 'blocks' | 'bytes') {
    this.tally = new Tally(unit)
    this.bar = new SingleBar({
      stream,
      format: `${label} [{bar}] {count}, {size}, {speed}/s, ETA {left}`,
      barsize: 30,
      hideCursor: true,
      clearOnComplete: false,
      stopOnComplete: false,
      fps: 5
    })
  }

  private payload (): Record<string, string> {
    return { count: this.tally.count(), size: this.tally.size(), speed: formatSize(Math.round(this.tally.rate)), left: duration(this.tally.eta) }
  }

  start (total: number, totalBytes?: number): void {
    this.tally.start(total, totalBytes)
    this.bar.start(total, 0, this.payload())
    this.running = true
  }

  update (p: ProgressUpdate): void {
    this.tally.update(p)
    if (this.running) this.bar.update(p.done, this.payload())
  }

  end (): void { this.stop() }
  fail (): void { this.stop() }

  private stop (): void {
    if (!this.running) return
    this.running = false
    this.bar.update(this.tally.done, this.payload())
    this.bar.stop()
  }
}

class PlainProgress implements ProgressReporter {
  private readonly tally: Tally
  private lastTenth = -1
  private lastLine = 0

  constructor (private readonly label: string, private readonly err: Writable, private readonly intervalMs: number, unit: 'blocks' | 'bytes') {
    this.tally = new Tally(unit)
  }

  private write (): void {
    this.lastLine = performance.now()
    this.err.write(`${this.label}: ${this.tally.text()}\n`)
  }

  start (total: number, totalBytes?: number): void {
    this.tally.start(total, totalBytes)
    this.lastTenth = 0
    this.write()
  }

  update (p: ProgressUpdate): void {
    this.tally.update(p)
    const tenth = this.tally.total === 0 ? 10 : Math.floor(10 * p.done / this.tally.total)
    if (tenth > this.lastTenth || performance.now() - this.lastLine >= this.intervalMs) {
      this.lastTenth = Math.max(this.lastTenth, tenth)
      // The last tenth is the end's line.
      if (p.done < this.tally.total) this.write()
    }
  }

  end (): void {
    const size = this.tally.unit === 'bytes' ? this.tally.size() : formatSize(this.tally.bytes)
    this.err.write(`${this.label}: done, ${this.tally.count()}, ${size} in ${duration(this.tally.elapsed)}\n`)
  }

  fail (): void {}
}
