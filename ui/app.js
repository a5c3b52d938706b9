// The dashboard's shell: the token, the views (#cluster, #images,
// #blocks/IMAGE, #live) and the error banner. Each view refreshes itself
// while it is shown and stops when another is.
import { api, getToken, setToken } from './api.js'
import { clear, clearAll, report } from './status.js'
import * as cluster from './cluster.js'
import * as images from './images.js'
import * as blocks from './blockmap.js'
import * as live from './live.js'

const views = { cluster, images, blocks, live }
let current

function route () {
  const [name, ...rest] = location.hash.replace(/^#/, '').split('/')
  const view = views[name] !== undefined ? name : 'cluster'
  const arg = rest.length > 0 ? decodeURIComponent(rest.join('/')) : undefined
  if (current !== undefined) current.module.hide()
  for (const v of Object.keys(views)) document.getElementById(`view-${v}`).hidden = v !== view
  for (const a of document.querySelectorAll('nav a')) a.classList.toggle('active', a.dataset.view === view)
  current = { name: view, module: views[view] }
  views[view].show(arg)
}

/** The token from /ui/#token=...: kept for the tab, then taken out of the URL and its history entry. */
function tokenFromHash () {
  if (!location.hash.startsWith('#token=')) return
  const params = new URLSearchParams(location.hash.slice(1))
  setToken(params.get('token') ?? '')
  history.replaceState(null, '', `${location.pathname}${params.has('view') ? `#${params.get('view')}` : '#cluster'}`)
}

async function whoAmI () {
  try {
    const n = await api('GET', '/v1/node')
    document.getElementById('node-id').textContent = `node ${n.id}`
    document.title = `UKAI ${n.id}`
    clear('token')
  } catch (err) {
    report('token', err)
  }
}

function start () {
  tokenFromHash()
  const input = document.getElementById('token')
  input.value = getToken()
  document.getElementById('token-form').addEventListener('submit', (e) => {
    e.preventDefault()
    setToken(input.value.trim())
    clearAll()
    void whoAmI()
    route()
  })
  document.getElementById('token-forget').addEventListener('click', () => {
    setToken('')
    input.value = ''
    void whoAmI()
  })
  window.addEventListener('hashchange', route)
  void whoAmI()
  route()
}

start()
