// Small time-series charts: inline SVG polylines, one per series, scaled to the largest value shown.
const NS = 'http://www.w3.org/2000/svg'

/** `series`: [{values: number[], class}]; `points` samples fill the width. */
export function sparkline (series, { width = 160, height = 28, points = 60 } = {}) {
  const svg = document.createElementNS(NS, 'svg')
  svg.setAttribute('class', 'spark')
  svg.setAttribute('width', String(width))
  svg.setAttribute('height', String(height))
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`)
  const max = Math.max(1e-9, ...series.flatMap((s) => s.values))
  const step = width / Math.max(points - 1, 1)
  for (const s of series) {
    const line = document.createElementNS(NS, 'polyline')
    const offset = points - s.values.length
    line.setAttribute('points', s.values.map((v, i) => `${((offset + i) * step).toFixed(1)},${(height - 1 - (v / max) * (height - 2)).toFixed(1)}`).join(' '))
    line.setAttribute('class', s.class)
    svg.append(line)
  }
  const title = document.createElementNS(NS, 'title')
  title.textContent = `peak ${max < 1e-6 ? 0 : Number(max.toPrecision(3))} per second`
  svg.append(title)
  return svg
}
