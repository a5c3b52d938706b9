/**
 * Progress of an import or export: a line on stderr, redrawn in place,
 * when stderr is a terminal; with --json, `{"progress": {...}}` lines on
 * stdout (the result follows as `{"result": {...}}`). Kept apart so a
 * shared progress reporter can replace it.
 */
import { formatSize } from '../util/size.js'

/** Least time between two progress lines. */
const EVERY_MS = 250

export class TransferProgress {
  private readonly tty = process.stderr.isTTY === true
  private last = 0
  private shown = ''
  private drawn = false

  constructor (private readonly label: string, private readonly total: number, private readonly json: boolean) {}

  /** `done`: bytes of the image gone through; `data`: bytes of data moved (holes and zeros are not). */
  update (done: number, data: number): void {
    const now = Date.now()
    if (done < this.total && now - this.last < EVERY_MS) return
    if (this.shown === `${done} ${data}`) return
    this.shown = `${done} ${data}`
    this.last = now
    if (this.json) {
      process.stdout.write(JSON.stringify({ progress: { done, total: this.total, data } }) + '\n')
      return
    }
    if (!this.tty) return
    const pct = this.total === 0 ? 100 : Math.floor(done / this.total * 100)
    process.stderr.write(`\r\x1b[K${this.label}: ${formatSize(done)} of ${formatSize(this.total)} (${pct}%), ${formatSize(data)} of data`)
    this.drawn = true
  }

  end (): void {
    if (this.drawn) process.stderr.write('\n')
    this.drawn = false
  }
}
