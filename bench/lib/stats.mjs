/**
 * Small statistics and number formatting for the report.
 */

/** Median of a list (the mean of the two middle values for an even count). */
export function median (xs) {
  const v = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b)
  if (v.length === 0) return NaN
  const m = v.length >> 1
  return v.length % 2 === 1 ? v[m] : (v[m - 1] + v[m]) / 2
}

export function min (xs) { return Math.min(...xs.filter(Number.isFinite)) }
export function max (xs) { return Math.max(...xs.filter(Number.isFinite)) }

/** Spread of a list relative to its median, as "±x%" of the median (half the min–max range). */
export function spreadPct (xs) {
  const m = median(xs)
  if (!Number.isFinite(m) || m === 0) return NaN
  return (max(xs) - min(xs)) / 2 / m * 100
}

/** 3 significant digits, thousands separated by a thin space. */
export function fmt (x, digits = 3) {
  if (!Number.isFinite(x)) return 'n/a'
  if (Math.abs(x) >= 10 ** digits) return Math.round(x).toLocaleString('en-US').replace(/,/g, '\u202f')
  return Number(x.toPrecision(digits)).toString()
}

export function fmtRatio (x) {
  return Number.isFinite(x) ? `${x.toFixed(2)}×` : 'n/a'
}

export function fmtBytes (n) {
  if (!Number.isFinite(n)) return 'n/a'
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let i = 0
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++ }
  return `${i === 0 ? n : Number(n.toFixed(n >= 100 ? 0 : n >= 10 ? 1 : 2))} ${units[i]}`
}

export function fmtMs (ms) {
  if (!Number.isFinite(ms)) return 'n/a'
  if (ms < 0) return `−${fmtMs(-ms)}`
  if (ms < 1) return `${(ms * 1000).toFixed(0)} µs`
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 2 : 1)} ms`
  return `${(ms / 1000).toFixed(2)} s`
}
