/**
 * The writer lease as one Volume holds it: its writer sessions
 * (writer-session.ts) over time. Taking the lease is where a takeover
 * happens, so this is where fencing and reconciliation are ordered:
 *
 * 1. the grant (store.acquireWriter: the writer key on this node's lease,
 *    the generation raised);
 * 2. this node's fence raised, then every other location's and the old
 *    holder's (ClusterContext.fenceOthers);
 * 3. the blocks the old holder cannot vouch for reconciled (all of the
 *    dirty-block log when it could not tell, which includes an old holder
 *    fenced before it had learnt what it inherited itself), before the
 *    session's first write.
 *
 * The session ends when the volume's last writer closes (the lease is
 * given back, after a flush) or when it is fenced (it stays fenced until
 * then: every later write through the volume's opens fails).
 */
import type { RangeSet } from '../metadata/range-set.js'
import type { MetadataStore, WriterGrant, WriterPurpose } from '../metadata/store.js'
import type { ImageMeta } from '../metadata/image.js'
import type { ClusterContext } from './volume.js'
import { WriterSession } from './writer-session.js'

/** What the lease needs of its volume. */
export interface LeaseHolder {
  readonly name: string
  readonly meta: ImageMeta
  /** No writer open and no resync running: the lease may go back. */
  idle: () => boolean
  refresh: (meta: ImageMeta) => void
  /** Takes the dirty-block log as the store holds it. */
  adoptLog: (log: RangeSet) => void
  /** Reconciles `blocks` as session `s`. */
  reconcile: (s: WriterSession, blocks: RangeSet) => Promise<void>
  /** Drops from the dirty-block log every block with no write in flight, as session `s`. */
  trimLog: (s: WriterSession) => Promise<void>
  flush: () => Promise<void>
}

export class WriterLease {
  private readonly holder: LeaseHolder
  private readonly store: MetadataStore
  private readonly cluster: ClusterContext
  private session: WriterSession | undefined
  /** The session before `session` (released or fenced). */
  private lastSession: WriterSession | undefined
  private acquiring: Promise<WriterSession> | undefined
  private releasing: Promise<void> | undefined

  constructor (holder: LeaseHolder, store: MetadataStore, cluster: ClusterContext) {
    this.holder = holder
    this.store = store
    this.cluster = cluster
  }

  /** The session writing now, if it holds the lease. */
  get current (): WriterSession | undefined { return this.session }
  get fenced (): boolean { return this.session?.state === 'fenced' }

  owns (session: string): boolean {
    return this.session?.id === session || this.lastSession?.id === session
  }

  /** The session to write with: the held one, or a new grant of the lease. */
  async use (purpose: WriterPurpose): Promise<WriterSession> {
    for (;;) {
      await this.releasing
      const s = this.session
      if (s?.state === 'fenced') s.check()
      if (s?.held === true) {
        await this.cluster.leaseValid()
        return s
      }
      if (this.acquiring === undefined) {
        this.acquiring = this.acquire(purpose).finally(() => { this.acquiring = undefined })
      }
      await this.acquiring
    }
  }

  private async acquire (purpose: WriterPurpose): Promise<WriterSession> {
    const c = this.cluster
    const name = this.holder.name
    const s = new WriterSession(name, purpose)
    const t0 = performance.now()
    this.session = s
    let grant: WriterGrant
    try {
      grant = await this.store.acquireWriter(name, {
        node: c.nodeId,
        session: s.id,
        purpose,
        lease: c.leaseId(),
        mayTakeOver: (holder, st) => c.mayTakeOver(holder, st)
      }, { until: c.changeDeadline() })
    } catch (err) {
      if (this.session === s) this.session = undefined
      throw err
    }
    s.hold(grant.generation, grant.guard)
    try {
      this.holder.refresh(grant.state.meta)
      await c.fences.raise(name, grant.generation)
      const prev = grant.previous
      const log = grant.state.dirty
      let unsafe: RangeSet | undefined
      if (prev !== undefined && this.lastSession?.id === prev.session) unsafe = this.lastSession.inherited ? this.lastSession.unsafe.clone() : undefined
      else if (prev !== undefined || !log.isEmpty) unsafe = await c.fenceOthers(name, grant, this.holder.meta)
      const reconcile = prev !== undefined && unsafe !== undefined ? unsafe : log
      s.unsafe.addSet(reconcile)
      s.inherited = true
      this.holder.adoptLog(log)
      if (!reconcile.isEmpty) await this.holder.reconcile(s, reconcile)
      // What the log held is reconciled now, or was vouched for by its writer.
      await this.holder.trimLog(s)
      if (prev !== undefined) {
        c.notice(`image '${name}': took the writer lease over from node ${prev.node} (generation ${prev.generation} -> ${grant.generation}) ` +
          `in ${(performance.now() - t0).toFixed(1)} ms, ${reconcile.size} block(s) reconciled`)
      }
      return s
    } catch (err) {
      // A session that could not reconcile must not write: it ends, and
      // what it could not vouch for stays for the next one.
      s.fence()
      await this.store.releaseWriter(name, s.guard).catch(() => {})
      this.retire(s)
      throw err
    }
  }

  private retire (s: WriterSession): void {
    if (this.session !== s) return
    this.lastSession = s
    this.session = undefined
  }

  /**
   * Ends the sessions older than `generation` (all of them without one:
   * this node lost its own lease): none of their writes lands from now on.
   * Returns each with the blocks it cannot vouch for (undefined: it
   * cannot vouch for any).
   */
  fence (generation?: number): Array<{ session: string, unsafe: RangeSet | undefined }> {
    const out: Array<{ session: string, unsafe: RangeSet | undefined }> = []
    for (const s of [this.lastSession, this.session]) {
      // A session still acquiring is fenced by the gates if it loses: its
      // generation is not known yet.
      if (s === undefined || s.state === 'acquiring' || s.state === 'released') continue
      if (generation !== undefined && s.generation >= generation) continue
      const unsafe = s.fence()
      // A session that did not know yet what it inherited vouches for
      // nothing (undefined): the next holder reconciles the whole log.
      out.push({ session: s.id, unsafe: s.inherited ? unsafe : undefined })
    }
    return out
  }

  /** Gives the lease back when nothing writes any more: everything flushed, the dirty-block log emptied. */
  async releaseIfIdle (): Promise<void> {
    if (!this.holder.idle()) return
    const s = this.session
    if (s === undefined) return
    this.releasing = (async () => {
      await this.acquiring?.catch(() => {})
      if (s.held) {
        await this.holder.flush().catch(() => {})
        await s.drained()
        await this.holder.trimLog(s).catch(() => {})
        if (s.held) await this.store.releaseWriter(this.holder.name, s.guard, { until: this.cluster.changeDeadline() }).catch(() => {})
        if (s.held) s.state = 'released'
      }
      this.retire(s)
    })().finally(() => { this.releasing = undefined })
    await this.releasing
  }
}
