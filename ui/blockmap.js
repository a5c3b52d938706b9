// Block map: for one image (GET /v1/images/NAME), a row of cells per
// location, one cell per block (or per run of blocks on a large image),
// each in sync, out of sync, dirty (in the dirty-block log: a writer may
// have left its in-sync replicas different, to be reconciled) or not
// placed there. A range of blocks selected with the mouse can be synced
// (POST /v1/images/NAME/sync) or moved (POST /v1/images/NAME/move) after
// a confirmation; the progress streams in and the map follows it.
import { api, stream } from './api.js'
import { bytes, el } from './format.js'
import { clear, every, report } from './status.js'

/** At most this many cells per location: a larger image shows runs of blocks per cell. */
const MAX_CELLS = 2048

/** Cell states, by rank: a cell of several blocks shows the worst. */
const STATES = ['not-placed', 'in-sync', 'dirty', 'out-of-sync']
const LABELS = { 'not-placed': 'not placed', 'in-sync': 'in sync', dirty: 'dirty (in the dirty-block log)', 'out-of-sync': 'out of sync' }

let stop
let image
let doc
/** Per location, the state rank of every block. */
let ranks = new Map()
let perCell = 1
let selection
let drag
let task

export function show (name) {
  const select = document.getElementById('block-image')
  select.onchange = () => { location.hash = `#blocks/${encodeURIComponent(select.value)}` }
  document.getElementById('clear-selection').onclick = () => { selection = undefined; paintSelection() }
  document.getElementById('sync-range').onclick = () => void startSync()
  document.getElementById('move-range').onclick = () => void startMove()
  const map = document.getElementById('block-map')
  map.onmousedown = (e) => {
    const b = cellOf(e.target)
    if (b === undefined) return
    e.preventDefault()
    if (e.shiftKey && selection !== undefined) selection = span(selection.anchor, b)
    else selection = span(b, b)
    drag = true
    paintSelection()
  }
  map.onmouseover = (e) => {
    const b = cellOf(e.target)
    if (b === undefined) return
    hover(e.target)
    if (drag === true) { selection = span(selection.anchor, b); paintSelection() }
  }
  window.onmouseup = () => { drag = false }
  if (image !== name) { selection = undefined; doc = undefined }
  image = name
  stop = every(2000, 'block-map', async () => {
    const list = await api('GET', '/v1/images')
    fillSelect(select, list.map((s) => s.name))
    if (image === undefined && list.length > 0) { location.hash = `#blocks/${encodeURIComponent(list[0].name)}`; return }
    if (image === undefined) { document.getElementById('block-summary').textContent = 'no images'; return }
    await load()
  })
}

export function hide () {
  stop?.()
  window.onmouseup = null
}

function fillSelect (select, names) {
  const want = names.join('\n')
  if (select.dataset.names !== want) {
    select.replaceChildren(...names.map((n) => el('option', { value: n, text: n })))
    select.dataset.names = want
  }
  if (image !== undefined) select.value = image
}

/** Block selection from the anchor block to `b`, in block numbers (inclusive). */
function span (anchor, b) {
  const lo = Math.min(anchor.start, b.start)
  const hi = Math.max(anchor.end, b.end)
  return { anchor, start: lo, end: hi }
}

/** The blocks a cell covers, [start, end] inclusive. */
function cellOf (target) {
  if (!(target instanceof HTMLElement) || !target.classList.contains('cell') || target.dataset.block === undefined) return undefined
  const start = Number(target.dataset.block)
  return { start, end: start + Number(target.dataset.count) - 1 }
}

/** The state rank of each block of each location, painted range by range (cheap for ranges of a large image). */
function rankBlocks (d) {
  const out = new Map()
  for (const [loc, st] of Object.entries(d.locations)) {
    const r = new Uint8Array(d.blocks)
    for (const [s, e] of st.blocks) r.fill(1, s, Math.min(e, d.blocks))
    for (const [s, e] of d.dirty ?? []) for (let b = s; b < Math.min(e, d.blocks); b++) if (r[b] === 1) r[b] = 2
    for (const [s, e] of st.out_of_sync) r.fill(3, s, Math.min(e, d.blocks))
    out.set(loc, r)
  }
  return out
}

/** What the map is drawn from, to draw it again only when it changed. */
let drawn

async function load () {
  const d = await api('GET', `/v1/images/${encodeURIComponent(image)}`)
  doc = d
  ranks = rankBlocks(d)
  perCell = Math.max(1, Math.ceil(d.blocks / MAX_CELLS))
  const oos = Object.values(d.locations).reduce((n, st) => n + st.out_of_sync.reduce((m, [s, e]) => m + e - s, 0), 0)
  document.getElementById('block-summary').textContent =
    `${d.blocks} blocks of ${bytes(d.block_size)}, ${Object.keys(d.locations).length} locations, ${oos} block replicas out of sync, ${d.dirty_blocks} dirty` +
    (perCell > 1 ? `; a cell is ${perCell} blocks` : '') + (d.writer !== null ? `; written by ${d.writer.node}` : '')
  const key = JSON.stringify([d.name, d.incarnation, d.blocks, d.locations, d.dirty])
  if (key !== drawn || document.querySelector('#block-map .cell') === null) {
    drawn = key
    render()
  }
  void fillNodes()
}

async function fillNodes () {
  const locs = Object.keys(doc.locations)
  const from = document.getElementById('move-from')
  const keep = from.value
  from.replaceChildren(el('option', { value: '', text: '(any other node)' }), ...locs.map((l) => el('option', { value: l, text: l })))
  from.value = locs.includes(keep) ? keep : ''
  try {
    const nodes = await api('GET', '/v1/nodes')
    const to = document.getElementById('move-to')
    const keepTo = to.value
    const ids = nodes.filter((n) => n.alive).map((n) => n.id).sort()
    if (to.dataset.ids !== ids.join('\n')) {
      to.replaceChildren(...ids.map((id) => el('option', { value: id, text: id })))
      to.dataset.ids = ids.join('\n')
    }
    if (ids.includes(keepTo)) to.value = keepTo
    clear('move-nodes')
  } catch (err) { report('move-nodes', err) }
}

function render () {
  const map = document.getElementById('block-map')
  const cells = Math.ceil(doc.blocks / perCell)
  const rows = [...ranks].sort(([a], [b]) => a.localeCompare(b)).map(([loc, r]) => {
    const strip = el('div', { class: 'strip' })
    for (let c = 0; c < cells; c++) {
      const start = c * perCell
      const count = Math.min(perCell, doc.blocks - start)
      let worst = 0
      for (let b = start; b < start + count; b++) if (r[b] > worst) worst = r[b]
      strip.append(el('span', { class: `cell ${STATES[worst]}`, 'data-block': String(start), 'data-count': String(count), 'data-location': loc, 'data-state': STATES[worst] }))
    }
    return el('div', { class: 'location', 'data-location': loc }, el('div', { class: 'loc-label mono', text: loc }), strip)
  })
  map.replaceChildren(...rows)
  map.classList.toggle('big', cells <= 256)
  paintSelection()
}

function hover (cell) {
  const start = Number(cell.dataset.block)
  const count = Number(cell.dataset.count)
  const loc = cell.dataset.location
  const first = start * doc.block_size
  const last = Math.min((start + count) * doc.block_size, doc.size) - 1
  let what
  if (count === 1) what = LABELS[cell.dataset.state]
  else {
    const r = ranks.get(loc)
    const n = [0, 0, 0, 0]
    for (let b = start; b < start + count; b++) n[r[b]]++
    what = STATES.map((s, i) => n[i] > 0 ? `${n[i]} ${LABELS[s]}` : '').filter((s) => s !== '').join(', ')
  }
  const blocks = count === 1 ? `block ${start}` : `blocks ${start}–${start + count - 1}`
  const text = `${blocks} · bytes ${first}–${last} (${bytes(last - first + 1)}) · ${loc}: ${what}`
  document.getElementById('block-hover').textContent = text
  cell.title = text
}

function paintSelection () {
  const actions = document.getElementById('block-actions')
  for (const c of document.querySelectorAll('#block-map .cell')) {
    const b = Number(c.dataset.block)
    c.classList.toggle('selected', selection !== undefined && b >= selection.start && b <= selection.end)
  }
  actions.hidden = selection === undefined || task !== undefined
  if (selection === undefined || doc === undefined) return
  const first = selection.start * doc.block_size
  const last = Math.min((selection.end + 1) * doc.block_size, doc.size) - 1
  document.getElementById('block-selection').textContent =
    `blocks ${selection.start}–${selection.end} selected (bytes ${first}–${last}, ${bytes(last - first + 1)})`
}

/** The confirmation dialog: resolves true when the operator starts it. */
async function confirm (title, text) {
  const dialog = document.getElementById('confirm')
  document.getElementById('confirm-title').textContent = title
  document.getElementById('confirm-text').textContent = text
  dialog.returnValue = ''
  dialog.showModal()
  await new Promise((resolve) => dialog.addEventListener('close', resolve, { once: true }))
  return dialog.returnValue === 'ok'
}

async function startSync () {
  const { start, end } = selection
  const ok = await confirm(`Sync blocks ${start}–${end} of ${image}?`,
    'Every out-of-sync replica of these blocks is copied from an in-sync one, on the node that writes the image, while it runs.')
  if (ok) await run('sync', `/v1/images/${encodeURIComponent(image)}/sync`, { start, end })
}

async function startMove () {
  const { start, end } = selection
  const to = document.getElementById('move-to').value
  const from = document.getElementById('move-from').value
  if (to === '') { report('task', new Error('choose the node to move the blocks to')); return }
  const ok = await confirm(`Move blocks ${start}–${end} of ${image} to ${to}?`,
    `${to} gets a copy of these blocks, then ${from === '' ? 'the other node holding them' : from} drops its copy (its block files go a few seconds later).`)
  if (ok) await run('move', `/v1/images/${encodeURIComponent(image)}/move`, { to, ...(from !== '' ? { from } : {}), start, end })
}

/** Runs a streamed sync or move, showing its progress and reloading the map as it goes. */
async function run (what, path, body) {
  const box = document.getElementById('task')
  const bar = document.getElementById('task-progress')
  const detail = document.getElementById('task-detail')
  const label = `${what} of ${image}, blocks ${body.start}–${body.end}`
  task = what
  box.hidden = false
  box.dataset.state = 'running'
  document.getElementById('task-label').textContent = label
  bar.value = 0
  detail.textContent = 'starting'
  paintSelection()
  let reloading = 0
  const progress = (p) => {
    bar.max = Math.max(p.blocks, 1)
    bar.value = p.done
    detail.textContent = `${p.done} of ${p.blocks} blocks, ${bytes(p.bytes)}`
    // The map follows the copy, at most every half second.
    const now = Date.now()
    if (now - reloading > 500) { reloading = now; void load().catch((err) => report('block-map', err)) }
  }
  try {
    const result = await stream('POST', path, body, progress)
    bar.max = Math.max(result.blocks, 1)
    bar.value = result.done
    const failed = result.failed?.length ?? 0
    detail.textContent = `done: ${result.done} of ${result.blocks} blocks, ${bytes(result.bytes)}${failed > 0 ? `, ${failed} failed` : ''}`
    box.dataset.state = failed > 0 ? 'failed' : 'done'
    if (failed > 0) report('task', new Error(`${label}: ${failed} replica(s) could not be copied: ${result.failed.map((f) => `block ${f.block}${f.location !== undefined ? ` to ${f.location}` : ''}: ${f.reason}`).join('; ')}`))
    else clear('task')
    selection = undefined
  } catch (err) {
    box.dataset.state = 'failed'
    detail.textContent = `failed: ${err.message}`
    report('task', err)
  } finally {
    task = undefined
    await load().catch((err) => report('block-map', err))
  }
}
