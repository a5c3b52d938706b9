/**
 * Block file names: the seed's `blockname_format` ("%016d"), a printf
 * format with exactly one zero-padded decimal conversion. Only "%0Nd"
 * (optionally with a fixed prefix and suffix of safe characters) is
 * accepted, so a format can never produce a path separator.
 */
import { show } from '../util/show.js'

const FORMAT = /^([A-Za-z0-9._-]*)%0(\d{1,2})d([A-Za-z0-9._-]*)$/

export type BlockNamer = (index: number) => string

export function parseBlockNameFormat (format: string): BlockNamer {
  const m = FORMAT.exec(format)
  if (m === null) {
    throw new Error(`blockname_format ${show(format)} is not of the form "%0Nd" (for example "%016d")`)
  }
  const prefix = m[1]!
  const width = Number(m[2])
  const suffix = m[3]!
  if (width < 1 || width > 20) throw new Error(`blockname_format width must be 1-20, got ${width}`)
  return (index: number) => prefix + String(index).padStart(width, '0') + suffix
}

/** A format's parts: block `i`'s file is prefix + i zero-padded to width + suffix (for the native FUSE plane). */
export function blockNameParts (format: string): { prefix: string, width: number, suffix: string } {
  parseBlockNameFormat(format)
  const m = FORMAT.exec(format)!
  return { prefix: m[1]!, width: Number(m[2]), suffix: m[3]! }
}

/** The inverse of a format's namer: the block a file name is of, undefined for any other name. */
export function blockNameParser (format: string): (name: string) => number | undefined {
  const namer = parseBlockNameFormat(format)
  const m = FORMAT.exec(format)!
  const prefix = m[1]!
  const suffix = m[3]!
  return (name) => {
    if (!name.startsWith(prefix) || !name.endsWith(suffix) || name.length <= prefix.length + suffix.length) return undefined
    const digits = name.slice(prefix.length, name.length - suffix.length)
    if (!/^\d{1,16}$/.test(digits)) return undefined
    const index = Number(digits)
    // Only the name the format gives that block ("7" is not "%016d"'s block 7).
    return Number.isSafeInteger(index) && namer(index) === name ? index : undefined
  }
}
