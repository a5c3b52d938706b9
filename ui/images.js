// Images view: every image (GET /v1/images) with who has it open and who
// writes it (GET /v1/images/NAME); filter by name, node or hypervisor,
// sort by any column.
import { api } from './api.js'
import { bytes, el } from './format.js'
import { every } from './status.js'

let stop
let rows = []
let sort = { key: 'name', dir: 1 }

export function show () {
  const filter = document.getElementById('image-filter')
  filter.oninput = render
  for (const th of document.querySelectorAll('#images th[data-key]')) {
    th.onclick = () => {
      sort = { key: th.dataset.key, dir: sort.key === th.dataset.key ? -sort.dir : 1 }
      render()
    }
  }
  stop = every(5000, 'images', async () => {
    const list = await api('GET', '/v1/images')
    rows = await Promise.all(list.map(async (s) => {
      const d = await api('GET', `/v1/images/${encodeURIComponent(s.name)}`)
      return {
        ...s,
        dirty_blocks: d.dirty_blocks,
        writer: d.writer === null ? '' : d.writer.node,
        generation: d.writer_generation,
        open: d.open,
        opens: d.open.map(openText).join('; ')
      }
    }))
    render()
  })
}

export function hide () {
  stop?.()
}

/** One node's opens of an image: "NODE: 1 writer, 2 readers". */
function openText (o) {
  const parts = []
  if (o.writers > 0) parts.push(`${o.writers} writer${o.writers === 1 ? '' : 's'}`)
  if (o.readers > 0) parts.push(`${o.readers} reader${o.readers === 1 ? '' : 's'}`)
  return `${o.node}: ${parts.join(', ')}`
}

function value (r, key) {
  const v = r[key]
  return Array.isArray(v) ? v.join(', ') : v
}

function render () {
  const q = document.getElementById('image-filter').value.trim().toLowerCase()
  const shown = rows
    .filter((r) => q === '' || [r.name, ...r.locations, ...r.hypervisors, r.writer, r.opens].some((s) => s.toLowerCase().includes(q)))
    .sort((a, b) => {
      const x = value(a, sort.key)
      const y = value(b, sort.key)
      return sort.dir * (typeof x === 'number' ? x - y : String(x).localeCompare(String(y)))
    })
  for (const th of document.querySelectorAll('#images th[data-key]')) {
    th.classList.toggle('asc', th.dataset.key === sort.key && sort.dir > 0)
    th.classList.toggle('desc', th.dataset.key === sort.key && sort.dir < 0)
  }
  document.getElementById('image-count').textContent = `${shown.length} of ${rows.length}`
  document.querySelector('#images tbody').replaceChildren(...shown.map((r) => {
    return el('tr', { 'data-image': r.name },
      el('td', {}, el('a', { href: `#blocks/${encodeURIComponent(r.name)}`, text: r.name })),
      el('td', { class: 'num', text: bytes(r.size) }),
      el('td', { class: 'num', text: bytes(r.block_size) }),
      el('td', { class: 'num', text: String(r.blocks) }),
      el('td', { class: 'num', text: bytes(r.used_size) }),
      el('td', { class: 'mono', text: r.locations.join(', ') }),
      el('td', { class: 'mono', text: r.hypervisors.join(', ') || '–' }),
      el('td', { class: 'mono writer', text: r.writer === '' ? '–' : `${r.writer} (gen ${r.generation})` }),
      el('td', { class: 'mono opens', text: r.opens || '–' }),
      el('td', { class: `num${r.out_of_sync > 0 ? ' warn-text' : ''}`, text: String(r.out_of_sync) }),
      el('td', { class: 'num', text: String(r.dirty_blocks) }))
  }))
}
