// Numbers as the dashboard shows them: sizes in powers of 1024, as the CLI takes them.

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB']

export function bytes (n) {
  if (n === undefined || n === null || !Number.isFinite(n)) return '–'
  let i = 0
  let v = n
  while (Math.abs(v) >= 1024 && i < UNITS.length - 1) { v /= 1024; i++ }
  return `${i === 0 ? v : v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${UNITS[i]}`
}

export function rate (n) {
  return n === undefined ? '–' : `${bytes(n)}/s`
}

export function perSecond (n) {
  if (n === undefined || !Number.isFinite(n)) return '–'
  return n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2)
}

export function ms (seconds) {
  if (seconds === undefined || !Number.isFinite(seconds)) return '–'
  const v = seconds * 1000
  return `${v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(3)} ms`
}

/** Seconds until an ISO time, as "12 s" or "3 min 4 s"; "now" once past. */
export function countdown (iso, now = Date.now()) {
  const s = Math.ceil((Date.parse(iso) - now) / 1000)
  if (!(s > 0)) return 'now'
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`
}

/** An element with a class and text, or children. */
export function el (tag, attrs = {}, ...children) {
  const e = document.createElement(tag)
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue
    if (k === 'class') e.className = v
    else if (k === 'text') e.textContent = v
    else if (k.startsWith('data-')) e.setAttribute(k, v)
    else e.setAttribute(k, v === true ? '' : v)
  }
  for (const c of children) if (c !== undefined && c !== null) e.append(c)
  return e
}
