/**
 * The dashboard's static files, served by every node on its control port
 * under /ui/: plain HTML, CSS and JavaScript modules from the package's
 * `ui/` directory, no build step and nothing from elsewhere. They hold no
 * data, so they are served without the token (after the Host check); the
 * page asks the operator for the token and sends it with every API call.
 *
 * Only flat names of the listed types are served, so no path reaches
 * outside `ui/`. The Content-Security-Policy keeps the page to this
 * origin (no inline script, no other host) and out of frames, where
 * another site could make its buttons be clicked.
 */
import { readFile } from 'node:fs/promises'
import type { IncomingMessage, ServerResponse } from 'node:http'
import { fileURLToPath } from 'node:url'
import { join } from 'node:path'
import { UkaiError } from '../errors.js'

/** `ui/` of the package: this file is dist/src/control/ui-assets.js. */
export const UI_DIR = fileURLToPath(new URL('../../../ui/', import.meta.url))

const TYPES: Record<string, string> = {
  html: 'text/html; charset=utf-8',
  css: 'text/css; charset=utf-8',
  js: 'text/javascript; charset=utf-8',
  svg: 'image/svg+xml'
}

const FILE = /^\/ui\/([a-z0-9][a-z0-9-]*\.(html|css|js|svg))$/

const SECURITY_HEADERS = {
  'content-security-policy': "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
  'x-frame-options': 'DENY',
  'x-content-type-options': 'nosniff',
  'referrer-policy': 'no-referrer',
  'cache-control': 'no-cache'
}

export function isUiPath (path: string): boolean {
  return path === '/ui' || path.startsWith('/ui/')
}

export async function serveUi (req: IncomingMessage, res: ServerResponse, path: string): Promise<void> {
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.setHeader('allow', 'GET, HEAD')
    throw new UkaiError('UKAI_ERR_NOT_SUPPORTED', `${req.method ?? '?'} is not allowed on ${path}`)
  }
  if (path === '/ui') {
    res.writeHead(301, { location: '/ui/', 'content-length': 0 })
    res.end()
    return
  }
  const m = FILE.exec(path === '/ui/' ? '/ui/index.html' : path)
  if (m === null) throw new UkaiError('UKAI_ERR_NOT_FOUND', `no such dashboard file: ${path}`)
  let body: Buffer
  try {
    body = await readFile(join(UI_DIR, m[1]!))
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new UkaiError('UKAI_ERR_NOT_FOUND', `no such dashboard file: ${path}`)
    throw err
  }
  res.writeHead(200, { ...SECURITY_HEADERS, 'content-type': TYPES[m[2]!]!, 'content-length': body.length })
  res.end(req.method === 'HEAD' ? undefined : body)
}
