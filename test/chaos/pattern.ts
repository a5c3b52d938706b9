/**
 * Self-describing write data for the chaos run. Every 512-byte sector a
 * writer writes carries a header (magic, stream, write sequence number,
 * the sector's own index in the image) and a body regenerated from those,
 * so a sector read back says which write it came from, and whether it is
 * whole and in the right place, without the harness keeping any data.
 */

export const SECTOR = 512
const WORDS = SECTOR / 4
const MAGIC = 0x55434830 // 'UCH0'

/** A 32-bit mix of the header fields (the body's PRNG seed). */
function mix (stream: number, seq: number, sector: number): number {
  let h = Math.imul(stream ^ 0x9E3779B9, 0x85EBCA6B) ^ Math.imul(seq, 0xC2B2AE35) ^ Math.imul(sector, 0x27D4EB2F)
  h ^= h >>> 16
  h = Math.imul(h, 0x7FEB352D)
  h ^= h >>> 15
  h = Math.imul(h, 0x846CA68B)
  h ^= h >>> 16
  return (h >>> 0) || 1
}

function fillSector (w: Uint32Array, base: number, stream: number, seq: number, sector: number): void {
  w[base] = MAGIC
  w[base + 1] = stream
  w[base + 2] = seq
  w[base + 3] = sector
  let x = mix(stream, seq, sector)
  for (let i = 4; i < WORDS; i++) {
    // xorshift32
    x ^= x << 13; x >>>= 0
    x ^= x >>> 17
    x ^= x << 5; x >>>= 0
    w[base + i] = x
  }
}

/** The bytes write `seq` of `stream` puts at `offset` (sector aligned), `length` bytes. */
export function writeData (stream: number, seq: number, offset: number, length: number): Buffer {
  const buf = Buffer.alloc(length)
  writeDataInto(buf, stream, seq, offset)
  return buf
}

/** The same into `buf` (4-byte aligned), as many bytes as it holds. */
export function writeDataInto (buf: Buffer, stream: number, seq: number, offset: number): void {
  const length = buf.length
  if (offset % SECTOR !== 0 || length % SECTOR !== 0) throw new Error(`unaligned write ${offset}+${length}`)
  const w = new Uint32Array(buf.buffer, buf.byteOffset, length / 4)
  const first = offset / SECTOR
  for (let s = 0; s < length / SECTOR; s++) fillSector(w, s * WORDS, stream, seq, first + s)
}

/**
 * True when every 4-byte word of the sector at `at` is that word of one
 * of `versions` (write sequence numbers, 0 for zeros): a sector that holds
 * pieces of some of them (a write that landed in part, torn inside a sector).
 */
export function isMixOf (buf: Buffer, at: number, stream: number, sector: number, versions: number[]): boolean {
  const copies = versions.map((v) => {
    const w = new Uint32Array(WORDS)
    if (v !== 0) fillSector(w, 0, stream, v, sector)
    return w
  })
  for (let i = 0; i < WORDS; i++) {
    const word = buf.readUInt32LE(at + i * 4)
    if (!copies.some((c) => c[i] === word)) return false
  }
  return true
}

/**
 * What a sector read back holds: `seq` 0 for all zeros (never written),
 * the write's sequence number for a whole sector of `stream` in its
 * place, or a description of what is wrong with it.
 */
export type SectorContent = { seq: number } | { bad: string }

const scratch = new Uint32Array(WORDS)

const aligned = Buffer.alloc(SECTOR)

export function decodeSector (buf: Buffer, at: number, stream: number, sector: number): SectorContent {
  let w: Uint32Array
  if ((buf.byteOffset + at) % 4 === 0) {
    w = new Uint32Array(buf.buffer, buf.byteOffset + at, WORDS)
  } else {
    buf.copy(aligned, 0, at, at + SECTOR)
    w = new Uint32Array(aligned.buffer, aligned.byteOffset, WORDS)
  }
  let zero = true
  for (let i = 0; i < WORDS; i++) if (w[i] !== 0) { zero = false; break }
  if (zero) return { seq: 0 }
  if (w[0] !== MAGIC) return { bad: 'not written by the chaos writer (no header)' }
  if (w[1] !== stream) return { bad: `data of stream ${w[1]!} (write ${w[2]!})` }
  if (w[3] !== sector) return { bad: `data of sector ${w[3]!} (write ${w[2]!}) misplaced here` }
  fillSector(scratch, 0, stream, w[2]!, sector)
  for (let i = 4; i < WORDS; i++) if (scratch[i] !== w[i]) return { bad: `torn sector: header of write ${w[2]!}, body differs from word ${i}` }
  return { seq: w[2]! }
}
