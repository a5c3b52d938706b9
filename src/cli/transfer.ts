/**
 * `ukai image import FILE NAME` and `ukai image export NAME FILE`: a raw
 * disk file into a new image and back, through the node's control API
 * (data-routes.ts), so it works wherever the other commands do (HTTPS and
 * the cluster token included) and the data takes the image's own write
 * path: replicated, under the writer lease, flushed at the end.
 *
 * Both stream: the file is read (or written) in CHUNK pieces with at most
 * IN_FLIGHT requests running, so memory stays bounded whatever the size.
 * Both keep holes: a new image is all holes, so import sends only the
 * pages of the file that are not all zeros; export asks the image's
 * extents, reads only the data ones, and writes only the pages that are
 * not all zeros into a file cut to the image's size.
 */
import { randomBytes } from 'node:crypto'
import { link, lstat, open, rename, unlink, type FileHandle } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import type { ControlClient } from '../control/client.js'
import { MAX_EXTENT_BLOCKS } from '../control/data-routes.js'
import { CODES, UkaiError, invalidArgument, toUkaiError, type ErrorCode } from '../errors.js'
import { MIN_BLOCK_SIZE } from '../metadata/image.js'
import type { SessionInfo } from '../node/data-sessions.js'
import type { ImageSummary } from '../node/images.js'
import { formatSize } from '../util/size.js'
import type { Extent } from '../volume/volume.js'
import { progressReporter } from './progress.js'

/** Bytes per data request (the node takes up to MAX_DATA). */
export const CHUNK = 4 * 2 ** 20
/** Data requests running at once. */
export const IN_FLIGHT = 4
/** The unit of zero detection: a page. */
const PAGE = 4096
/** Bytes of the image whose extents one request asks for, at most (and no more than the node looks at in detail). */
const EXTENT_WINDOW = 2 ** 30
const ZERO_PAGE = Buffer.alloc(PAGE)

export interface ImportOptions {
  file: string
  name: string
  blockSize?: number
  locations?: string[]
  hypervisors?: string[]
  /** Into the existing image of that name (an import that stopped), rather than a new one. */
  resume: boolean
  json: boolean
}

export interface ExportOptions {
  name: string
  file: string
  force: boolean
  json: boolean
}

const print = (s: string): void => { process.stdout.write(s + '\n') }

/** Runs of pages of `buf` that are not all zeros, as [start, end) byte offsets, each at most `max` long. */
export function dataRuns (buf: Buffer, max = CHUNK): Array<[number, number]> {
  const runs: Array<[number, number]> = []
  let start = -1
  for (let at = 0; at < buf.length; at += PAGE) {
    const end = Math.min(at + PAGE, buf.length)
    const zero = buf.subarray(at, end).equals(end - at === PAGE ? ZERO_PAGE : ZERO_PAGE.subarray(0, end - at))
    if (!zero && start < 0) start = at
    if (start >= 0 && (zero || end - start >= max)) {
      runs.push([start, zero ? at : end])
      start = -1
    }
  }
  if (start >= 0) runs.push([start, buf.length])
  return runs
}

export async function importImage (client: ControlClient, o: ImportOptions): Promise<void> {
  let fh: FileHandle
  try {
    fh = await open(o.file, 'r')
  } catch (err) {
    throw fileError(err, `cannot read ${o.file}`)
  }
  const path = `/v1/images/${encodeURIComponent(o.name)}`
  let created = false
  let session: SessionInfo | undefined
  try {
    const st = await fh.stat()
    if (!st.isFile()) throw invalidArgument(`${o.file} is not a regular file (import takes a raw disk image file; 'qemu-img convert -O raw' makes one)`)
    if (st.size === 0) throw invalidArgument(`${o.file} is empty: an image needs at least one byte`)
    // The smallest image is one block of the smallest block size.
    const size = Math.max(st.size, MIN_BLOCK_SIZE)
    if (o.resume) {
      const info = await client.call<ImageSummary>('GET', path)
      if (info.size !== size) throw invalidArgument(`image '${o.name}' is ${info.size} bytes and ${o.file} makes ${size}: --resume continues an import of this file into this image only`)
      if (o.blockSize !== undefined && info.block_size !== o.blockSize) throw invalidArgument(`image '${o.name}' has blocks of ${info.block_size} bytes, not ${o.blockSize}`)
      if (o.locations !== undefined || o.hypervisors !== undefined) throw invalidArgument('--resume takes the image as it is: give no -l or -h')
    } else {
      await client.call('POST', '/v1/images', {
        name: o.name,
        size,
        ...(o.blockSize !== undefined ? { block_size: o.blockSize } : {}),
        ...(o.locations !== undefined ? { locations: o.locations } : {}),
        ...(o.hypervisors !== undefined ? { hypervisors: o.hypervisors } : {})
      })
      created = true
    }
    try {
      session = await client.call<SessionInfo>('POST', `${path}/sessions`, { write: true })
    } catch (err) {
      // Nothing was written: the image made a moment ago goes again.
      if (created) await client.call('DELETE', path).catch(() => {})
      created = false
      throw err
    }
  } catch (err) {
    await fh.close()
    throw err
  }

  const total = session.size
  const fileSize = (await fh.stat()).size
  // Signals are caught before the first progress line is out: a Ctrl-C
  // from then on ends the import between requests, with its report.
  const stop = new Interrupt()
  const progress = progressReporter({ label: `import ${o.name}`, json: o.json, unit: 'bytes' })
  progress.start(total)
  const pipe = new Pipeline(IN_FLIGHT)
  const query = `session=${session.session}`
  let read = 0
  let sent = 0
  try {
    while (read < fileSize) {
      stop.check()
      const n = Math.min(CHUNK, fileSize - read)
      // A buffer per chunk: requests in flight hold views of it.
      const buf = Buffer.allocUnsafe(n)
      await readFully(fh, buf, read)
      for (const [s, e] of dataRuns(buf)) {
        const at = read + s
        const data = buf.subarray(s, e)
        await pipe.add(async () => {
          await rawCall(client, 'PUT', `${path}/data?offset=${at}&${query}`, data)
          sent += data.length
        })
      }
      read += n
      progress.update({ done: read, bytes: sent })
    }
    await pipe.drain()
    // The end of the session flushes: the data is durable once it answers.
    await client.call('DELETE', `${path}/sessions/${session.session}`)
  } catch (err) {
    await pipe.settle()
    await client.call('DELETE', `${path}/sessions/${session.session}`).catch(() => {})
    const e = toUkaiError(err)
    const stopped = new UkaiError(e.code,
      `import of ${o.file} into image '${o.name}' stopped after ${formatSize(read)} of ${formatSize(fileSize)} (${e.message}); ` +
      `the image is incomplete: run the same import again with --resume, or remove it with 'ukai image destroy ${o.name}'`, e.details)
    progress.fail(stopped)
    throw stopped
  } finally {
    stop.dispose()
    await fh.close()
  }
  progress.update({ done: total, bytes: sent })
  const result = { image: o.name, file: o.file, size: total, data_bytes: sent }
  progress.end(result)
  if (!o.json) print(`imported ${o.file} into image '${o.name}': ${formatSize(total)}, ${formatSize(sent)} of data written (holes and zeros skipped)${total > fileSize ? ` (size rounded up from ${fileSize} bytes to the smallest image)` : ''}`)
}

export async function exportImage (client: ControlClient, o: ExportOptions): Promise<void> {
  const path = `/v1/images/${encodeURIComponent(o.name)}`
  // The target is checked before anything is opened, and written under a
  // temporary name next to it: a failed export leaves FILE as it was.
  const existing = await lstat(o.file).catch((err: NodeJS.ErrnoException) => { if (err.code === 'ENOENT') return undefined; throw fileError(err, `cannot write ${o.file}`) })
  if (existing !== undefined) {
    if (!o.force) throw new UkaiError('UKAI_ERR_EXISTS', `${o.file} already exists; give --force to replace it`)
    if (!existing.isFile()) throw invalidArgument(`${o.file} is not a regular file; export writes a raw file`)
  }
  const session = await client.call<SessionInfo>('POST', `${path}/sessions`, { write: false })
  const query = `session=${session.session}`
  const tmp = join(dirname(o.file), `.${basename(o.file)}.ukai-export-${randomBytes(4).toString('hex')}`)
  const stop = new Interrupt()
  const progress = progressReporter({ label: `export ${o.name}`, json: o.json, unit: 'bytes' })
  progress.start(session.size)
  const pipe = new Pipeline(IN_FLIGHT)
  let fh: FileHandle | undefined
  let written = 0
  try {
    try {
      fh = await open(tmp, 'wx', 0o644)
    } catch (err) {
      throw fileError(err, `cannot write ${o.file}`)
    }
    const out = fh
    const size = session.size
    await out.truncate(size)
    // Past MAX_EXTENT_BLOCKS blocks a node answers "data" without looking: a window of at most that many keeps holes holes.
    const step = Math.min(EXTENT_WINDOW, MAX_EXTENT_BLOCKS * session.block_size)
    for (let window = 0; window < size; window += step) {
      const length = Math.min(step, size - window)
      const extents = JSON.parse((await rawCall(client, 'GET', `${path}/extents?offset=${window}&length=${length}&${query}`)).toString('utf8')) as Extent[]
      for (const ext of extents) {
        if (ext.hole || ext.zero) continue
        for (let at = ext.offset; at < ext.offset + ext.length; at += CHUNK) {
          stop.check()
          const n = Math.min(CHUNK, ext.offset + ext.length - at)
          const from = at
          await pipe.add(async () => {
            const data = await rawCall(client, 'GET', `${path}/data?offset=${from}&length=${n}&${query}`)
            if (data.length !== n) throw new UkaiError('UKAI_ERR_IO', `the node answered ${data.length} bytes for ${n} at ${from}`)
            for (const [s, e] of dataRuns(data)) {
              await writeFully(out, data.subarray(s, e), from + s)
              written += e - s
            }
          })
          progress.update({ done: at + n, bytes: written })
        }
      }
      progress.update({ done: window + length, bytes: written })
    }
    await pipe.drain()
    await out.sync()
    await out.close()
    fh = undefined
    // Without --force, link: refused if FILE appeared meanwhile.
    if (o.force) await rename(tmp, o.file)
    else {
      await link(tmp, o.file).catch((err) => { throw fileError(err, `cannot write ${o.file}`) })
      await unlink(tmp)
    }
    await syncDir(dirname(o.file))
  } catch (err) {
    await pipe.settle()
    await fh?.close().catch(() => {})
    await unlink(tmp).catch(() => {})
    const e = toUkaiError(err)
    const failed = new UkaiError(e.code, `export of image '${o.name}' to ${o.file} failed (${e.message}); ${o.file} was not ${existing !== undefined ? 'changed' : 'made'}`, e.details)
    progress.fail(failed)
    throw failed
  } finally {
    stop.dispose()
    await client.call('DELETE', `${path}/sessions/${session.session}`).catch(() => {})
  }
  const result = { image: o.name, file: o.file, size: session.size, data_bytes: written }
  progress.end(result)
  if (!o.json) print(`exported image '${o.name}' to ${o.file}: ${formatSize(session.size)}, ${formatSize(written)} of data written (holes left as holes)`)
}

/**
 * One control API call with a raw body and a raw answer; an error answer
 * (JSON) becomes the node's UkaiError.
 */
async function rawCall (client: ControlClient, method: string, path: string, payload?: Buffer): Promise<Buffer> {
  return await new Promise<Buffer>((resolve, reject) => {
    const headers = {
      ...client.headers(undefined),
      ...(payload !== undefined ? { 'content-type': 'application/octet-stream', 'content-length': payload.length } : {})
    }
    const req = client.request({ method, path, headers }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('error', reject)
      res.on('end', () => {
        const body = Buffer.concat(chunks)
        const status = res.statusCode ?? 500
        if (status < 400) return resolve(body)
        let e: { code?: string, message?: string, details?: Record<string, unknown> } | undefined
        try { e = (JSON.parse(body.toString('utf8')) as { error?: typeof e }).error } catch {}
        const code = (e?.code !== undefined && e.code in CODES ? e.code : 'UKAI_ERR_INTERNAL') as ErrorCode
        reject(new UkaiError(code, e?.message ?? `control API error ${status}`, e?.details))
      })
    })
    req.on('error', reject)
    req.end(payload)
  })
}

/** At most `limit` jobs at once; the first failure stops new ones and is what drain throws. */
class Pipeline {
  private readonly running = new Set<Promise<void>>()
  private failure: { err: unknown } | undefined

  constructor (private readonly limit: number) {}

  async add (job: () => Promise<void>): Promise<void> {
    while (this.running.size >= this.limit && this.failure === undefined) await Promise.race(this.running)
    if (this.failure !== undefined) throw this.failure.err
    const p: Promise<void> = job()
      .catch((err) => { this.failure ??= { err } })
      .finally(() => { this.running.delete(p) })
    this.running.add(p)
  }

  async drain (): Promise<void> {
    await this.settle()
    if (this.failure !== undefined) throw this.failure.err
  }

  /** Waits for every job still running; their failures are already recorded. */
  async settle (): Promise<void> {
    await Promise.all([...this.running])
  }
}

/** Ctrl-C or SIGTERM stops a transfer between requests, so it ends cleanly and says where it stopped. */
class Interrupt {
  private signal: string | undefined
  private readonly onSignal = (s: NodeJS.Signals): void => { this.signal = s }

  constructor () {
    process.on('SIGINT', this.onSignal)
    process.on('SIGTERM', this.onSignal)
  }

  check (): void {
    if (this.signal !== undefined) throw new UkaiError('UKAI_ERR_SHUTDOWN', `interrupted (${this.signal})`)
  }

  dispose (): void {
    process.off('SIGINT', this.onSignal)
    process.off('SIGTERM', this.onSignal)
  }
}

async function readFully (fh: FileHandle, buf: Buffer, position: number): Promise<void> {
  let done = 0
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done)
    if (bytesRead === 0) {
      // The file shrank under the import: the rest reads as zeros, as a hole would.
      buf.fill(0, done)
      return
    }
    done += bytesRead
  }
}

async function writeFully (fh: FileHandle, data: Buffer, position: number): Promise<void> {
  let done = 0
  while (done < data.length) {
    const { bytesWritten } = await fh.write(data, done, data.length - done, position + done)
    done += bytesWritten
  }
}

async function syncDir (dir: string): Promise<void> {
  const d = await open(dir, 'r').catch(() => undefined)
  if (d === undefined) return
  try { await d.sync() } catch {} finally { await d.close() }
}

/** A file system error about `what`, keeping its meaning (ENOENT stays "not found"). */
function fileError (err: unknown, what: string): UkaiError {
  const e = err as NodeJS.ErrnoException
  const base = toUkaiError(err)
  const reason = e.code === 'ENOENT' ? 'no such file or directory' : e.code === 'EEXIST' ? 'it already exists' : e.code === 'EACCES' ? 'permission denied' : (e.message ?? String(err))
  return new UkaiError(base.code, `${what}: ${reason}`)
}
