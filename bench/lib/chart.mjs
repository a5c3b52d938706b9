/**
 * The results chart: for every pair (UKAI / its peer) one bar per
 * workload, the median of the per-round ratios, with a whisker from the
 * smallest to the largest ratio; a dashed line marks each pair's target.
 * Plain SVG, no dependencies.
 */
import { median, min, max } from './stats.mjs'
import { targetOf } from './throughput.mjs'

const COLOURS = { seqread: '#4e79a7', seqwrite: '#f28e2b', randread: '#59a14f', randwrite: '#e15759' }

const esc = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')

/**
 * @param {{ pairs: import('./throughput.mjs').Pair[], workloads: import('./fio.mjs').Workload[], throughput: any, title: string, subtitle: string }} o
 */
export function ratioChart (o) {
  const labelW = 300
  const plotW = 620
  const barH = 14
  const groupGap = 18
  const top = 70
  const rows = o.pairs.map((p) => ({ p, entries: o.workloads.map((w) => ({ w, e: o.throughput.pairs[p.id]?.[w.id] })) }))
  let hi = 1.6
  for (const r of rows) {
    for (const { e } of r.entries) if (e !== undefined && e.ratios.length > 0) hi = Math.max(hi, max(e.ratios))
    if (r.p.target !== undefined) hi = Math.max(hi, r.p.target.min)
  }
  hi = Math.ceil(hi * 5) / 5
  const x = (v) => labelW + Math.min(v, hi) / hi * plotW
  const groupH = o.workloads.length * barH + groupGap
  const height = top + rows.length * groupH + 60
  const width = labelW + plotW + 40
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="${width}" height="${height}" fill="#ffffff"/>`,
    `<text x="10" y="22" font-size="16" font-weight="bold">${esc(o.title)}</text>`,
    `<text x="10" y="42" fill="#555">${esc(o.subtitle)}</text>`
  ]
  // Grid.
  const step = hi > 4 ? 1 : hi > 2 ? 0.5 : 0.25
  for (let v = 0; v <= hi + 1e-9; v += step) {
    out.push(`<line x1="${x(v)}" y1="${top - 8}" x2="${x(v)}" y2="${height - 50}" stroke="${Math.abs(v - 1) < 1e-9 ? '#333' : '#e3e3e3'}" stroke-width="${Math.abs(v - 1) < 1e-9 ? 1.2 : 1}"/>`)
    out.push(`<text x="${x(v)}" y="${height - 36}" text-anchor="middle" fill="#555">${v.toFixed(2).replace(/\.?0+$/, '')}×</text>`)
  }
  out.push(`<text x="${labelW + plotW / 2}" y="${height - 16}" text-anchor="middle" fill="#333">UKAI / peer (median of paired runs; whisker: min–max; dashed: target)</text>`)
  rows.forEach((r, gi) => {
    const gy = top + gi * groupH
    out.push(`<text x="${labelW - 10}" y="${gy + (o.workloads.length * barH) / 2 + 4}" text-anchor="end" font-weight="bold">${esc(r.p.title)}</text>`)
    r.entries.forEach(({ w, e }, i) => {
      const y = gy + i * barH
      if (e === undefined || e.ratios.length === 0) {
        out.push(`<text x="${labelW + 4}" y="${y + barH - 3}" fill="#999" font-size="10">${esc(w.id)}: not measured${e?.error !== undefined ? ' (failed)' : ''}</text>`)
        return
      }
      const m = median(e.ratios)
      out.push(`<rect x="${labelW}" y="${y + 1}" width="${Math.max(0, x(m) - labelW)}" height="${barH - 3}" fill="${COLOURS[w.id] ?? '#888'}"><title>${esc(`${r.p.title}, ${w.label}: ${m.toFixed(2)}× (${min(e.ratios).toFixed(2)}–${max(e.ratios).toFixed(2)})`)}</title></rect>`)
      const lo = x(min(e.ratios))
      const up = x(max(e.ratios))
      const cy = y + barH / 2 - 0.5
      out.push(`<line x1="${lo}" y1="${cy}" x2="${up}" y2="${cy}" stroke="#222"/><line x1="${lo}" y1="${cy - 3}" x2="${lo}" y2="${cy + 3}" stroke="#222"/><line x1="${up}" y1="${cy - 3}" x2="${up}" y2="${cy + 3}" stroke="#222"/>`)
      out.push(`<text x="${Math.max(x(m), up) + 5}" y="${y + barH - 3}" font-size="10" fill="#333">${m.toFixed(2)}×</text>`)
      const t = targetOf(r.p, w)
      if (t !== undefined) out.push(`<line x1="${x(t.min)}" y1="${y}" x2="${x(t.min)}" y2="${y + barH}" stroke="#c00" stroke-width="2" stroke-dasharray="3,2"/>`)
    })
  })
  // Legend.
  o.workloads.forEach((w, i) => {
    const lx = labelW + i * 155
    out.push(`<rect x="${lx}" y="${top - 24}" width="10" height="10" fill="${COLOURS[w.id] ?? '#888'}"/><text x="${lx + 14}" y="${top - 15}" font-size="11">${esc(w.label)}</text>`)
  })
  out.push('</svg>')
  return out.join('\n') + '\n'
}
