/**
 * Positional reads and writes of block files, gathered per event-loop
 * turn: the requests that reach the block store in one turn (the NBD
 * requests of one socket read, the pieces of one large request) go to
 * libuv's thread pool as a few jobs of the native addon (readMany,
 * writeMany in native/ukai-fs.c), not one job each. One `fs.read` per
 * 4 KiB request cost a thread hand-off and a completion callback each,
 * and each completion left in its own turn, so every reply took its own
 * socket write; a batch's replies leave together.
 *
 * A job holds at most JOB_BYTES of data (or one larger request) and
 * JOB_ENTRIES requests, so large reads still run on several threads at
 * once. A read gives the bytes up to the file's end (the caller fills the
 * rest with zeros); a write is done whole or fails.
 *
 * A read of at most NOW_BYTES is first tried at once on this thread with
 * RWF_NOWAIT (readNow): one the page cache holds costs a copy of its
 * bytes, a few microseconds, and no trip to the pool at all; one that
 * would wait (not cached, a locked page) is queued as above. Larger reads
 * always go to the pool, so the event loop never copies much at once.
 */
import { constants } from 'node:os'
import { load } from './sparse.js'

const JOB_BYTES = 256 * 1024
const JOB_ENTRIES = 64
const NOW_BYTES = 64 * 1024
const EAGAIN = -constants.errno.EAGAIN
/** False once readNow proved unsupported here (EOPNOTSUPP, EINVAL). */
let readNowWorks = true

interface Pending { fd: number, buf: Buffer, pos: number, resolve: (n: number) => void, reject: (err: Error) => void }

const errnoNames = new Map<number, string>(Object.entries(constants.errno).map(([name, n]) => [n, name]))

/** An error like the fs module's, for `-errno` of a call. */
function errnoError (negative: number, syscall: 'read' | 'write'): NodeJS.ErrnoException {
  const code = errnoNames.get(-negative) ?? 'EIO'
  const err: NodeJS.ErrnoException = new Error(`${code}: ${syscall} of a block file failed (errno ${-negative})`)
  err.code = code
  err.errno = negative
  err.syscall = syscall
  return err
}

class Queue {
  private pending: Pending[] = []
  private readonly writing: boolean

  constructor (writing: boolean) {
    this.writing = writing
  }

  add (fd: number, buf: Buffer, pos: number): Promise<number> {
    return new Promise((resolve, reject) => {
      if (this.pending.length === 0) process.nextTick(this.flush)
      this.pending.push({ fd, buf, pos, resolve, reject })
    })
  }

  private readonly flush = (): void => {
    const all = this.pending
    this.pending = []
    let from = 0
    let bytes = 0
    for (let i = 0; i < all.length; i++) {
      bytes += all[i]!.buf.length
      const full = bytes >= JOB_BYTES || i + 1 - from >= JOB_ENTRIES
      if (full || i === all.length - 1) {
        this.run(all.slice(from, i + 1))
        from = i + 1
        bytes = 0
      }
    }
  }

  private run (job: Pending[]): void {
    const fds = new Int32Array(job.length)
    const positions = new Float64Array(job.length)
    const buffers: Buffer[] = []
    for (let i = 0; i < job.length; i++) {
      fds[i] = job[i]!.fd
      positions[i] = job[i]!.pos
      buffers.push(job[i]!.buf)
    }
    let done: Promise<Int32Array>
    try {
      const addon = load()
      done = this.writing ? addon.writeMany(fds, positions, buffers) : addon.readMany(fds, positions, buffers)
    } catch (err) {
      for (const p of job) p.reject(err as Error)
      return
    }
    done.then((results) => {
      for (let i = 0; i < job.length; i++) {
        const n = results[i]!
        if (n < 0) job[i]!.reject(errnoError(n, this.writing ? 'write' : 'read'))
        else job[i]!.resolve(n)
      }
    }, (err: Error) => { for (const p of job) p.reject(err) })
  }
}

const reads = new Queue(false)
const writes = new Queue(true)

/** Reads `buf.length` bytes of `fd` at `pos`, up to the file's end: the bytes read. */
export async function readAt (fd: number, buf: Buffer, pos: number): Promise<number> {
  if (buf.length === 0) return 0
  if (buf.length <= NOW_BYTES && readNowWorks) {
    const n = load().readNow(fd, buf, pos)
    if (n >= 0) return n
    if (n === -constants.errno.EOPNOTSUPP || n === -constants.errno.EINVAL) readNowWorks = false
    else if (n !== EAGAIN) throw errnoError(n, 'read')
  }
  return await reads.add(fd, buf, pos)
}

/** Writes all of `data` to `fd` at `pos`. */
export async function writeAt (fd: number, data: Buffer, pos: number): Promise<void> {
  if (data.length === 0) return
  await writes.add(fd, data, pos)
}
