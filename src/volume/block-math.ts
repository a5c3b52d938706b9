/**
 * Splitting a byte range of an image into per-block pieces.
 */
export interface Piece {
  /** Block index. */
  block: number
  /** Offset inside the block. */
  offset: number
  length: number
  /** Offset of this piece inside the caller's buffer. */
  bufferOffset: number
}

/**
 * The pieces of [offset, offset + length) for blocks of `blockSize` bytes,
 * in order, clipped at `limit` (bytes at or past it are not part of any
 * piece). Zero-length pieces are never produced.
 */
export function splitRange (offset: number, length: number, blockSize: number, limit: number): Piece[] {
  const end = Math.min(offset + length, limit)
  const pieces: Piece[] = []
  let pos = offset
  while (pos < end) {
    const block = Math.floor(pos / blockSize)
    const inBlock = pos - block * blockSize
    const n = Math.min(blockSize - inBlock, end - pos)
    pieces.push({ block, offset: inBlock, length: n, bufferOffset: pos - offset })
    pos += n
  }
  return pieces
}

/** Blocks [first, end) touched by [offset, offset + length). */
export function blockSpan (offset: number, length: number, blockSize: number): [number, number] {
  if (length <= 0) return [Math.floor(offset / blockSize), Math.floor(offset / blockSize)]
  return [Math.floor(offset / blockSize), Math.floor((offset + length - 1) / blockSize) + 1]
}
