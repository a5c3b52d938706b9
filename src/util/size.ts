/**
 * Byte sizes as operators type them: "8G", "50M", "512", "4KiB", "1.5G".
 * K/M/G/T (and KB, KiB, ...) are powers of 1024, as in qemu-img; the
 * result must be a whole number of bytes.
 */
import { invalidArgument } from '../errors.js'

const UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50
}

export function parseSize (text: string, what = 'size'): number {
  // The "iB" of KiB only after a unit letter: "1iB" is not a size.
  const m = /^\s*(\d+(?:\.\d+)?)\s*(?:([kmgtp])(?:i?b)?|b)?\s*$/i.exec(text)
  if (m === null) {
    throw invalidArgument(`${what} '${text}' is not a size (examples: 8G, 50M, 4KiB, 1048576)`, { [what]: text })
  }
  const bytes = Number(m[1]) * UNITS[(m[2] ?? '').toLowerCase()]!
  if (!Number.isSafeInteger(bytes)) {
    throw invalidArgument(`${what} '${text}' is not a whole number of bytes below 2^53`, { [what]: text })
  }
  if (bytes <= 0) throw invalidArgument(`${what} '${text}' must be greater than zero`, { [what]: text })
  return bytes
}

export function formatSize (bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB']
  let v = bytes
  let i = 0
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++ }
  return i === 0 ? `${bytes} B` : `${Number.isInteger(v) ? v : v.toFixed(1)} ${units[i]}`
}
