/**
 * Data sessions: an image kept open on this node for a client of the
 * control API that moves its data (`ukai image import` and `export`), so
 * that many requests, several in flight, share one open, and so one
 * writer lease, instead of opening and closing the image per request.
 *
 * A session is an ordinary open (UkaiNode.openImage): a writing session
 * is refused while another node writes the image (the writer lease rules
 * apply), is recorded as this node's writer in the metadata store, and
 * `image destroy` is refused while it lasts. Its end flushes (the data is
 * durable when the close answers). A session nobody uses for
 * SESSION_IDLE_MS ends by itself, so a client that died does not hold the
 * image for ever.
 */
import { randomBytes } from 'node:crypto'
import { UkaiError, toUkaiError } from '../errors.js'
import type { Volume } from '../volume/volume.js'
import type { ImageOpen, UkaiNode } from './node.js'

/** How long a session may go without a request before it ends (flushed). */
export const SESSION_IDLE_MS = 60_000

export interface SessionInfo {
  session: string
  image: string
  write: boolean
  size: number
  used_size: number
  block_size: number
}

interface Session {
  id: string
  image: string
  open: ImageOpen
  /** Requests running in it: it is never ended under them. */
  busy: number
  timer: NodeJS.Timeout | undefined
  closing: Promise<void> | undefined
}

export class DataSessions {
  private readonly node: UkaiNode
  private readonly sessions = new Map<string, Session>()

  constructor (node: UkaiNode) {
    this.node = node
  }

  /** Opens `image` for a session (for writing: refused, UKAI_ERR_BUSY, while someone else writes it). */
  async open (image: string, write: boolean, who: string): Promise<SessionInfo> {
    const id = randomBytes(12).toString('hex')
    const open = await this.node.openImage(image, write, `${who}, control API session ${id.slice(0, 8)}`)
    const s: Session = { id, image, open, busy: 0, timer: undefined, closing: undefined }
    this.sessions.set(id, s)
    this.arm(s)
    return describeSession(s)
  }

  /**
   * Runs `fn` on the image's volume: in session `id`, or (without one) in
   * an open of its own that a write flushes before it ends.
   */
  async use<T> (image: string, id: string | undefined, write: boolean, who: string, fn: (v: Volume) => Promise<T>): Promise<T> {
    if (id === undefined) {
      const o = await this.node.openImage(image, write, `${who}, control API`)
      try {
        const r = await fn(o.volume)
        if (write) await o.volume.flush()
        return r
      } finally {
        await o.close()
      }
    }
    const s = this.get(image, id)
    if (write && !s.open.write) throw new UkaiError('UKAI_ERR_READ_ONLY', `session ${id} of image '${image}' is open for reading only`)
    s.busy++
    if (s.timer !== undefined) clearTimeout(s.timer)
    s.timer = undefined
    try {
      return await fn(s.open.volume)
    } finally {
      s.busy--
      this.arm(s)
    }
  }

  /** Ends session `id`: a writing one is flushed first, and a failed flush is the answer. */
  async close (image: string, id: string): Promise<{ closed: string }> {
    const s = this.get(image, id)
    await this.end(s, true)
    return { closed: id }
  }

  /** Ends every session (the node stops); flush errors are only reported. */
  async closeAll (): Promise<void> {
    await Promise.all([...this.sessions.values()].map(async (s) => await this.end(s, false).catch(() => {})))
  }

  private get (image: string, id: string): Session {
    const s = this.sessions.get(id)
    if (s === undefined || s.image !== image || s.closing !== undefined) {
      throw new UkaiError('UKAI_ERR_NOT_FOUND', `image '${image}' has no data session ${id} on this node (ended, or idle for more than ${SESSION_IDLE_MS / 1000} s)`, { image, session: id })
    }
    return s
  }

  private arm (s: Session): void {
    if (s.busy > 0 || s.closing !== undefined) return
    if (s.timer !== undefined) clearTimeout(s.timer)
    s.timer = setTimeout(() => {
      s.timer = undefined
      void this.end(s, false).catch((err) => this.node.emit('warning', `image '${s.image}': ending idle data session ${s.id.slice(0, 8)}: ${toUkaiError(err).message}`))
    }, SESSION_IDLE_MS)
    s.timer.unref()
  }

  private async end (s: Session, strict: boolean): Promise<void> {
    if (s.closing !== undefined) return await s.closing
    if (s.timer !== undefined) clearTimeout(s.timer)
    s.timer = undefined
    s.closing = (async () => {
      // Requests already inside finish first.
      while (s.busy > 0) await new Promise((resolve) => setTimeout(resolve, 5))
      try {
        if (s.open.write) await s.open.volume.flush()
      } catch (err) {
        if (strict) throw err
      } finally {
        this.sessions.delete(s.id)
        await s.open.close()
      }
    })()
    await s.closing
  }
}

function describeSession (s: Session): SessionInfo {
  const v = s.open.volume
  return { session: s.id, image: s.image, write: s.open.write, size: v.size, used_size: v.usedSize, block_size: v.blockSize }
}
