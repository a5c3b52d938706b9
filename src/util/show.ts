/**
 * Values as error messages show them: short (a value from outside may be
 * huge), and safe (deeply nested, cyclic, BigInt: never a second error
 * while describing the first).
 */
const MAX = 80

export function show (v: unknown): string {
  let s: string | undefined
  try {
    s = typeof v === 'bigint' ? `${v}n` : JSON.stringify(v)
  } catch {
    return Array.isArray(v) ? '(a list nested too deeply to show)' : '(a value nested too deeply to show)'
  }
  if (s === undefined) s = String(v)
  return s.length > MAX ? `${s.slice(0, MAX - 3)}...` : s
}

/**
 * The reason a text is not valid JSON, without quoting the text: it may be
 * a file the caller should not see (a config path pointing elsewhere).
 */
export function jsonError (err: unknown): string {
  const m = /position (\d+)/.exec((err as Error)?.message ?? '')
  if (m !== null) return `invalid JSON at position ${m[1]!}`
  if (/end of (JSON )?input/i.test((err as Error)?.message ?? '')) return 'invalid JSON: it ends too early'
  return 'invalid JSON'
}
