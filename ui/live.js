// Live I/O: the live feed (GET /v1/live, server-sent events read with
// fetch and the token) brings every node's counters of every image each
// second; rates are the differences between two events over the node's
// own clock, latency the replica seconds over the replica requests.
import { events } from './api.js'
import { sparkline } from './chart.js'
import { bytes, ms, perSecond, rate, el } from './format.js'
import { clear, report } from './status.js'

/** Samples kept per row for the charts: 60 s at one event a second. */
const HISTORY = 60

let abort
/** Per "node\nimage": the last counters and the history of rates. */
const rows = new Map()

export function show () {
  abort = new AbortController()
  void feed(abort.signal)
}

export function hide () {
  abort?.abort()
  abort = undefined
}

async function feed (signal) {
  const status = document.getElementById('live-status')
  while (!signal.aborted) {
    status.textContent = 'connecting…'
    try {
      await events('/v1/live?interval=1000', (ev) => {
        status.textContent = `live, updated ${new Date(ev.time).toLocaleTimeString()}`
        status.dataset.events = String(Number(status.dataset.events ?? 0) + 1)
        update(ev)
        clear('live')
      }, signal)
    } catch (err) {
      report('live', err)
    }
    if (signal.aborted) break
    status.textContent = 'disconnected; reconnecting in 3 s'
    await new Promise((resolve) => setTimeout(resolve, 3000))
  }
}

function sum (locations, key) {
  return Object.values(locations).reduce((s, l) => s + l[key], 0)
}

/** The counters of one image on one node that rates are made of. */
function counters (s, time) {
  return {
    time,
    reads: s.reads,
    writes: s.writes,
    bytesRead: s.bytesRead,
    bytesWritten: s.bytesWritten,
    readsLocal: s.reads_local,
    readsRemote: s.reads_remote,
    peerWrites: s.peer_writes,
    replicaReads: sum(s.locations, 'reads'),
    replicaWrites: sum(s.locations, 'writes'),
    readSeconds: sum(s.locations, 'read_seconds'),
    writeSeconds: sum(s.locations, 'write_seconds')
  }
}

function update (ev) {
  const seen = new Set()
  for (const n of ev.nodes) {
    if (!n.reachable) {
      report(`live-${n.id}`, new Error(`node ${n.id}: ${n.error ?? 'no answer'}`))
      continue
    }
    clear(`live-${n.id}`)
    for (const s of n.images) {
      const key = `${n.id}\n${s.image}`
      seen.add(key)
      const now = counters(s, n.time)
      const row = rows.get(key) ?? { node: n.id, image: s.image, history: [] }
      const last = row.last
      if (last !== undefined && now.time > last.time) {
        const dt = (now.time - last.time) / 1000
        const d = (k) => Math.max(0, now[k] - last[k]) / dt
        const dReads = now.replicaReads - last.replicaReads
        const dWrites = now.replicaWrites - last.replicaWrites
        row.rate = {
          reads: d('reads'),
          writes: d('writes'),
          readBytes: d('bytesRead'),
          writtenBytes: d('bytesWritten'),
          readsLocal: d('readsLocal'),
          readsRemote: d('readsRemote'),
          peerWrites: d('peerWrites'),
          readLatency: dReads > 0 ? (now.readSeconds - last.readSeconds) / dReads : undefined,
          writeLatency: dWrites > 0 ? (now.writeSeconds - last.writeSeconds) / dWrites : undefined
        }
        row.history.push(row.rate)
        if (row.history.length > HISTORY) row.history.shift()
      }
      row.last = now
      rows.set(key, row)
    }
  }
  for (const key of rows.keys()) if (!seen.has(key)) rows.delete(key)
  render()
}

function render () {
  const body = document.querySelector('#live tbody')
  body.replaceChildren(...[...rows.values()].sort((a, b) => a.image.localeCompare(b.image) || a.node.localeCompare(b.node)).map((r) => {
    const x = r.rate ?? {}
    const h = r.history
    return el('tr', { 'data-node': r.node, 'data-image': r.image },
      el('td', { class: 'mono', text: r.node }),
      el('td', { text: r.image }),
      el('td', { class: 'num', text: perSecond(x.reads) }),
      el('td', { class: 'num', text: perSecond(x.writes) }),
      el('td', { class: 'num', text: rate(x.readBytes) }),
      el('td', { class: 'num', text: rate(x.writtenBytes) }),
      el('td', { class: 'num', text: `${perSecond(x.readsLocal)} / ${perSecond(x.readsRemote)}` }),
      el('td', { class: 'num', text: `${ms(x.readLatency)} / ${ms(x.writeLatency)}` }),
      el('td', { class: 'num', text: perSecond(x.peerWrites) }),
      el('td', { class: 'num reads-total', text: String(r.last.reads) }),
      el('td', { class: 'num writes-total', text: String(r.last.writes), title: `${bytes(r.last.bytesWritten)} written` }),
      el('td', {}, sparkline([{ values: h.map((v) => v.reads), class: 'reads' }, { values: h.map((v) => v.writes), class: 'writes' }, { values: h.map((v) => v.peerWrites), class: 'peer' }], { points: HISTORY, width: 120 })),
      el('td', {}, sparkline([{ values: h.map((v) => v.readBytes), class: 'reads' }, { values: h.map((v) => v.writtenBytes), class: 'writes' }], { points: HISTORY, width: 120 })))
  }))
}
