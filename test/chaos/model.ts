/**
 * The model of one image: per 512-byte sector, the last acknowledged
 * write that covers it (0: never written, reads as zeros) and the writes
 * that failed over it since (a failed write may have landed, in part or
 * whole, or not at all; each of its sectors then holds either).
 *
 * A writer keeps one write in flight per region and regions are disjoint,
 * so the order of a region's writes is the order of its log lines.
 *
 * A check reads the image back: a sector must hold its expected write or
 * one of its candidates. The first read after a failure settles the
 * sector: from then on it must keep what was read (a failed write landing
 * later, or a read that flips between replicas, is caught).
 */
import { SECTOR, decodeSector, isMixOf } from './pattern.js'

export interface LogEvent {
  kind: 'A' | 'F'
  lane: number
  seq: number
  offset: number
  length: number
  /** Error code of a failed write. */
  error?: string
}

export function parseLog (text: string): LogEvent[] {
  const out: LogEvent[] = []
  for (const line of text.split('\n')) {
    if (line === '') continue
    const f = line.split(' ')
    if (f[0] !== 'A' && f[0] !== 'F') continue
    out.push({ kind: f[0], lane: Number(f[1]), seq: Number(f[2]), offset: Number(f[3]), length: Number(f[4]), error: f[5] })
  }
  return out
}

export type Mismatch = {
  sector: number
  /**
   * 'lost': an acknowledged write does not read back; 'changed': a sector
   * settled by an earlier check changed without a write; 'unexpected': a
   * sector never written (zeros expected) holds some write; 'bad': not a
   * whole sector of this stream in its place; 'torn': pieces of the
   * expected write and of failed ones inside one sector (a failed write
   * that landed in part, not on a sector boundary).
   */
  kind: 'lost' | 'changed' | 'unexpected' | 'bad' | 'torn'
  expected: number
  candidates: number[]
  got: string
}

export interface CheckResult {
  sectors: number
  mismatches: Mismatch[]
  /** Distinct acknowledged writes with at least one sector that does not read back. */
  lostWrites: Set<number>
  /** Sectors where a failed write was found to have landed. */
  landedFailed: number
}

export class ImageModel {
  readonly stream: number
  readonly size: number
  readonly sectors: number
  /** Last acknowledged write per sector (0: none). */
  readonly expected: Uint32Array
  /**
   * 1: the expected value was settled by a read (after failed writes), not
   * by an acknowledgement; 2: the sector read back wrong and was reported,
   * it is not checked again until a write acknowledges it.
   */
  readonly settled: Uint8Array
  /** Failed writes over a sector since its expected one. */
  readonly candidates = new Map<number, number[]>()
  /** Offset and length of every write, by seq (0 length: not logged); `ok` 1 when acknowledged. */
  private ackedOffset = new Float64Array(1024)
  private ackedLength = new Uint32Array(1024)
  private ackedOk = new Uint8Array(1024)

  constructor (stream: number, size: number) {
    this.stream = stream
    this.size = size
    this.sectors = size / SECTOR
    this.expected = new Uint32Array(this.sectors)
    this.settled = new Uint8Array(this.sectors)
  }

  apply (e: LogEvent): void {
    const first = e.offset / SECTOR
    const n = e.length / SECTOR
    if (e.seq >= this.ackedLength.length) {
      const n = Math.max(e.seq + 1, this.ackedLength.length * 2)
      const o = new Float64Array(n); o.set(this.ackedOffset); this.ackedOffset = o
      const l = new Uint32Array(n); l.set(this.ackedLength); this.ackedLength = l
      const k = new Uint8Array(n); k.set(this.ackedOk); this.ackedOk = k
    }
    this.ackedOffset[e.seq] = e.offset
    this.ackedLength[e.seq] = e.length
    this.ackedOk[e.seq] = e.kind === 'A' ? 1 : 0
    if (e.kind === 'A') {
      for (let s = first; s < first + n; s++) {
        this.expected[s] = e.seq
        this.settled[s] = 0
        this.candidates.delete(s)
      }
    } else {
      for (let s = first; s < first + n; s++) {
        const c = this.candidates.get(s)
        if (c === undefined) this.candidates.set(s, [e.seq])
        else c.push(e.seq)
      }
    }
  }

  /** Offset and length of acknowledged write `seq`, if it was. */
  ackedWrite (seq: number): [number, number] | undefined {
    const l = this.ackedLength[seq] ?? 0
    return l === 0 || this.ackedOk[seq] !== 1 ? undefined : [this.ackedOffset[seq]!, l]
  }

  /** "write N (acknowledged|failed): bytes a-b", for a report. */
  describeWrite (seq: number): string {
    const l = this.ackedLength[seq] ?? 0
    if (l === 0) return `write ${seq} (not in the log)`
    const o = this.ackedOffset[seq]!
    return `write ${seq} (${this.ackedOk[seq] === 1 ? 'acknowledged' : 'failed'}): bytes ${o}-${o + l - 1} (${l} B)`
  }

  /**
   * Checks `data`, read back from `offset`, against the model; settles
   * the sectors read that had candidates (`settle`).
   */
  check (data: Buffer, offset: number, result: CheckResult, settle = true): void {
    const first = offset / SECTOR
    for (let i = 0; i < data.length / SECTOR; i++) {
      const s = first + i
      result.sectors++
      if (this.settled[s] === 2) continue
      const got = decodeSector(data, i * SECTOR, this.stream, s)
      const exp = this.expected[s]!
      const cands = this.candidates.get(s)
      if ('seq' in got && got.seq === exp) {
        if (cands !== undefined && settle) this.candidates.delete(s)
        continue
      }
      if ('seq' in got && cands?.includes(got.seq) === true) {
        result.landedFailed++
        if (settle) {
          this.expected[s] = got.seq
          this.settled[s] = 1
          this.candidates.delete(s)
        }
        continue
      }
      // Pieces of the expected write and of failed ones: a failed write torn inside a sector.
      const torn = 'bad' in got && cands !== undefined && isMixOf(data, i * SECTOR, this.stream, s, [exp, ...cands])
      const kind = torn ? 'torn' : 'bad' in got ? 'bad' : this.settled[s] === 1 ? 'changed' : exp === 0 ? 'unexpected' : 'lost'
      result.mismatches.push({ sector: s, kind, expected: exp, candidates: cands ?? [], got: 'seq' in got ? (got.seq === 0 ? 'zeros' : `write ${got.seq}`) : got.bad })
      if (exp !== 0 && this.settled[s] === 0 && !torn) result.lostWrites.add(exp)
      // Reported once: a sector that stays wrong is not counted again by every later check.
      if (settle) { this.settled[s] = 2; this.candidates.delete(s) }
    }
  }
}

export function newCheckResult (): CheckResult {
  return { sectors: 0, mismatches: [], lostWrites: new Set(), landedFailed: 0 }
}

/** Mismatching sectors grouped into runs, for a report. */
export function describeMismatches (m: Mismatch[], limit = 12): string[] {
  const out: string[] = []
  let i = 0
  while (i < m.length && out.length < limit) {
    let j = i
    while (j + 1 < m.length && m[j + 1]!.sector === m[j]!.sector + 1 && m[j + 1]!.kind === m[i]!.kind &&
      m[j + 1]!.expected === m[i]!.expected && m[j + 1]!.got === m[i]!.got) j++
    const a = m[i]!
    const from = a.sector * SECTOR
    const to = (m[j]!.sector + 1) * SECTOR
    out.push(`${a.kind}: bytes ${from}-${to - 1} (${to - from} B, block ${Math.floor(from / 2 ** 20)}): expected ${a.expected === 0 ? 'zeros' : `write ${a.expected}`}` +
      `${a.candidates.length > 0 ? ` or failed write(s) ${a.candidates.join(',')}` : ''}, read ${a.got}`)
    i = j + 1
  }
  if (i < m.length) out.push(`... and ${m.length - i} more sector(s)`)
  return out
}
