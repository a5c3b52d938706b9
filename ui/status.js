// The error banner: what failed, by key, until it works again or is dismissed.
// Every API error the page meets is shown here; nothing fails silently.
import { ApiError } from './api.js'
import { el } from './format.js'

/** Errors by what failed: a refresh that works again takes its error away. */
const errors = new Map()

/** Errors that every call meets alike: one banner for all of them, not one per view's call. */
const TOKEN_ERRORS = new Set(['NO_TOKEN', 'UKAI_ERR_UNAUTHENTICATED'])

export function report (key, err) {
  if (err?.name === 'AbortError') return
  if (err instanceof ApiError && TOKEN_ERRORS.has(err.code)) key = 'token'
  const message = err instanceof ApiError || err instanceof Error ? err.message : String(err)
  const code = err instanceof ApiError ? err.code : undefined
  errors.set(key, { message, code })
  renderErrors()
}

export function clear (key) {
  if (errors.delete(key)) renderErrors()
}

export function clearAll () {
  errors.clear()
  renderErrors()
}

function renderErrors () {
  const box = document.getElementById('errors')
  box.replaceChildren(...[...errors].map(([key, e]) => {
    const close = el('button', { type: 'button', class: 'close', 'aria-label': 'dismiss', text: '×' })
    close.addEventListener('click', () => clear(key))
    return el('div', { class: 'error', 'data-key': key, 'data-code': e.code }, el('strong', { text: e.code ?? 'error' }), ' ', e.message, close)
  }))
}

/** Runs `fn` now and every `ms` while the view is shown; its errors go to the banner under `key`. */
export function every (ms, key, fn) {
  let stopped = false
  let timer
  const tick = async () => {
    try {
      await fn()
      clear(key)
    } catch (err) {
      report(key, err)
    }
    if (!stopped) timer = setTimeout(tick, ms)
  }
  void tick()
  return () => { stopped = true; clearTimeout(timer) }
}

