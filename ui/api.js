// The control API as the page calls it: every call carries the cluster's
// bearer token (Authorization header), which the operator gives the page
// (the token field, or /ui/#token=... read once and taken out of the URL)
// and which is kept in sessionStorage only: it goes with the tab.
// Streamed answers (sync, move: NDJSON; the live feed: server-sent events)
// are read with fetch(), since EventSource cannot send the header.

const KEY = 'ukai.control-token'

export function getToken () {
  return sessionStorage.getItem(KEY) ?? ''
}

export function setToken (token) {
  if (token === '') sessionStorage.removeItem(KEY)
  else sessionStorage.setItem(KEY, token)
}

/** An error of the API (its code and message) or of the page's call. */
export class ApiError extends Error {
  constructor (status, code, message) {
    super(message)
    this.status = status
    this.code = code
  }
}

function headers (body) {
  const token = getToken()
  if (token === '') throw new ApiError(0, 'NO_TOKEN', "no control token: paste the cluster's token ('ukai control-token' prints it) into the Token field")
  return { authorization: `Bearer ${token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) }
}

function apiError (status, doc, what) {
  const e = doc?.error
  if (e !== undefined && typeof e.message === 'string') return new ApiError(status, e.code ?? 'UKAI_ERR_INTERNAL', e.message)
  return new ApiError(status, 'UKAI_ERR_INTERNAL', `${what}: the node answered ${status}`)
}

async function send (method, path, body, signal) {
  const init = { method, headers: headers(body), cache: 'no-store', ...(body !== undefined ? { body: JSON.stringify(body) } : {}), ...(signal !== undefined ? { signal } : {}) }
  try {
    return await fetch(path, init)
  } catch (err) {
    if (err?.name === 'AbortError') throw err
    throw new ApiError(0, 'UKAI_ERR_CONNECT', `${method} ${path}: the node cannot be reached (${err?.message ?? err})`)
  }
}

/** One JSON call; resolves with the answer, rejects with an ApiError. */
export async function api (method, path, body) {
  const res = await send(method, path, body)
  const text = await res.text()
  let doc
  try { doc = JSON.parse(text) } catch {
    throw new ApiError(res.status, 'UKAI_ERR_INTERNAL', `${method} ${path}: the answer (${res.status}) is not JSON`)
  }
  if (!res.ok) throw apiError(res.status, doc, `${method} ${path}`)
  return doc
}

/** The lines of a streamed body, each as it arrives. */
async function * lines (res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader()
  let pending = ''
  for (;;) {
    const { value, done } = await reader.read()
    if (done) break
    pending += value
    let i
    while ((i = pending.indexOf('\n')) >= 0) {
      yield pending.slice(0, i)
      pending = pending.slice(i + 1)
    }
  }
  if (pending !== '') yield pending
}

/**
 * A streamed call (sync, move): `onProgress` gets each progress object;
 * resolves with the result, rejects with the node's error.
 */
export async function stream (method, path, body, onProgress) {
  const res = await send(method, path, body ?? {})
  if (!res.ok) {
    let doc
    try { doc = await res.json() } catch {}
    throw apiError(res.status, doc, `${method} ${path}`)
  }
  for await (const line of lines(res)) {
    if (line.trim() === '') continue
    let doc
    try { doc = JSON.parse(line) } catch { throw new ApiError(res.status, 'UKAI_ERR_INTERNAL', `${method} ${path}: a line of the answer is not JSON`) }
    if (doc.progress !== undefined) onProgress(doc.progress)
    else if (doc.error !== undefined) throw apiError(500, doc, `${method} ${path}`)
    else if ('result' in doc) return doc.result
  }
  throw new ApiError(0, 'UKAI_ERR_CONNECT', `${method} ${path}: the node closed the answer before the end`)
}

/**
 * Server-sent events of `path` (text/event-stream): `onEvent(data)` for
 * each event's JSON data, until `signal` aborts or the node ends the
 * stream (resolves) or sends an error event (rejects).
 */
export async function events (path, onEvent, signal) {
  const res = await send('GET', path, undefined, signal)
  if (!res.ok) {
    let doc
    try { doc = await res.json() } catch {}
    throw apiError(res.status, doc, `GET ${path}`)
  }
  let event = 'message'
  let data = []
  try {
    for await (const line of lines(res)) {
      if (line === '') {
        // A blank line dispatches the event (HTML, "server-sent events": interpreting an event stream).
        if (data.length > 0) {
          const doc = JSON.parse(data.join('\n'))
          if (event === 'error') throw apiError(500, doc, `GET ${path}`)
          if (event === 'end') return
          onEvent(doc)
        }
        event = 'message'
        data = []
      } else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''))
      else if (line.startsWith('event:')) event = line.slice(6).trim()
    }
  } catch (err) {
    if (signal?.aborted) return
    throw err
  }
}
