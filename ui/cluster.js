// Cluster view: every registered node (GET /v1/nodes: liveness from its
// lease, address, capacity, RTT of this node's probe), the space its
// images' block files take (GET /v1/nodes/storage), the locations each
// node has in the error state with their retry_after countdown (GET
// /v1/nodes/stats), and the RTT between every two nodes (GET /v1/nodes/rtt).
import { api } from './api.js'
import { bytes, countdown, el } from './format.js'
import { every } from './status.js'

let stops = []
const data = { nodes: [], storage: new Map(), errors: [], rtt: [] }

export function show () {
  stops = [
    every(3000, 'nodes', async () => { data.nodes = await api('GET', '/v1/nodes'); render() }),
    every(3000, 'node-errors', async () => {
      const all = await api('GET', '/v1/nodes/stats')
      data.errors = all.flatMap((n) => (n.errors ?? []).map((e) => ({ ...e, seenBy: n.id })))
      render()
    }),
    every(30_000, 'storage', async () => {
      const all = await api('GET', '/v1/nodes/storage')
      data.storage = new Map(all.filter((n) => n.reachable).map((n) => [n.id,
        (n.images ?? []).reduce((s, i) => s + i.bytes, 0) + (n.orphans ?? []).reduce((s, o) => s + o.bytes, 0)]))
      render()
    }),
    every(10_000, 'rtt', async () => { data.rtt = await api('GET', '/v1/nodes/rtt'); renderRtt() }),
    // The retry_after countdowns.
    every(1000, 'clock', async () => render())
  ]
}

export function hide () {
  for (const stop of stops) stop()
  stops = []
}

/** Whether a location (host or host:port) names node `id`. */
function names (location, id) {
  return location === id || id.startsWith(`${location}:`)
}

function state (n) {
  if (!n.alive) return el('span', { class: 'badge down', text: 'down', title: 'its lease ended' })
  if (!n.reachable) return el('span', { class: 'badge warn', text: 'unreachable', title: n.error ?? '' })
  return el('span', { class: 'badge ok', text: 'alive' })
}

function render () {
  const body = document.querySelector('#nodes tbody')
  const rows = [...data.nodes].sort((a, b) => a.id.localeCompare(b.id)).map((n) => {
    const cap = n.capacity
    const used = data.storage.get(n.id)
    const bar = cap === undefined
      ? '–'
      : el('span', { class: 'bar', title: `${bytes(cap.total - cap.free)} of ${bytes(cap.total)} in use on its file system` },
        el('span', { class: 'fill' }))
    if (cap !== undefined) bar.firstChild.style.width = `${Math.round(100 * (cap.total - cap.free) / Math.max(cap.total, 1))}%`
    const errs = data.errors.filter((e) => names(e.location, n.id))
    const errCell = errs.length === 0
      ? (n.error !== undefined ? el('span', { class: 'error-text', text: n.error }) : el('span', { class: 'muted', text: 'none' }))
      : el('ul', { class: 'errors' }, ...errs.map((e) => el('li', { 'data-seen-by': e.seenBy },
        el('span', { class: 'badge down', text: 'error' }), ` seen by ${e.seenBy}: ${e.reason}; retried in `,
        el('span', { class: 'countdown', text: countdown(e.retry_after) }))))
    return el('tr', { 'data-node': n.id },
      el('td', { class: 'mono', text: n.id }),
      el('td', { class: 'mono', text: n.control }),
      el('td', {}, state(n)),
      el('td', { class: 'num', text: cap === undefined ? '–' : bytes(cap.available) }),
      el('td', { class: 'num', text: used === undefined ? '–' : bytes(used) }),
      el('td', {}, bar, cap === undefined ? '' : ` ${bytes(cap.total)}`),
      el('td', { class: 'num', text: n.rtt_ms === undefined ? '–' : `${n.rtt_ms.toFixed(2)} ms` }),
      el('td', { text: (n.open_images ?? []).join(', ') || '–' }),
      el('td', {}, errCell))
  })
  body.replaceChildren(...rows)
}

function renderRtt () {
  const table = document.getElementById('rtt')
  const ids = data.rtt.map((n) => n.id).sort()
  table.tHead.replaceChildren(el('tr', {}, el('th', { text: 'from \\ to' }), ...ids.map((id) => el('th', { class: 'mono', text: id }))))
  table.tBodies[0].replaceChildren(...ids.map((from) => {
    const row = data.rtt.find((n) => n.id === from)
    return el('tr', { 'data-node': from }, el('th', { class: 'mono', text: from }), ...ids.map((to) => {
      const v = row?.rtt_ms?.[to]
      const text = row?.reachable === false ? '×' : v === undefined ? '–' : v.toFixed(2)
      return el('td', { class: 'num', text, title: row?.error ?? '' })
    }))
  }))
}
