/**
 * The control API's bearer token. Every call needs it (`Authorization:
 * Bearer TOKEN`); nodes calling each other use it too, so a cluster has
 * one. It comes from the file `control_token_file` names (made, readable
 * by its owner only, when it does not exist yet), or else from the
 * metadata store, where the first node or CLI that needs it makes it.
 * The token never appears in a message or a log line, and neither does
 * what a file holds when it is not a token.
 */
import { randomBytes, createHash, timingSafeEqual } from 'node:crypto'
import { promises as fsp } from 'node:fs'
import { dirname } from 'node:path'
import type { Config } from '../config/config.js'
import { UkaiError } from '../errors.js'
import type { MetadataStore } from '../metadata/store.js'
import { fsyncDir } from '../util/durable-fs.js'

/** What a token may be made of: 16 to 512 characters of base64url, base64 or hex. */
const TOKEN = /^[A-Za-z0-9._~+/=-]{16,512}$/

/** A new token: 32 random bytes, base64url. */
export function newToken (): string {
  return randomBytes(32).toString('base64url')
}

/** The token the config names: from its file, or from the metadata store. */
export async function loadControlToken (config: Config, store: MetadataStore): Promise<string> {
  if (config.control_token_file !== undefined) return await tokenFromFile(config.control_token_file)
  const t = await store.controlToken(newToken)
  if (!TOKEN.test(t)) throw new UkaiError('UKAI_ERR_INVALID_METADATA', 'the control token in the metadata store (cluster/control-token) is not a token')
  return t
}

/** The token in `path` (a new one is made there when the file does not exist). */
export async function tokenFromFile (path: string): Promise<string> {
  let text: string
  try {
    text = await fsp.readFile(path, 'utf8')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOENT') return await makeTokenFile(path)
    throw new UkaiError('UKAI_ERR_INVALID_CONFIG', `control_token_file ${path}: cannot be read (${code ?? 'error'})`)
  }
  const t = text.trim()
  if (!TOKEN.test(t)) {
    // Never what the file holds: it may be a file the caller should not see.
    throw new UkaiError('UKAI_ERR_INVALID_CONFIG', `control_token_file ${path}: does not hold a token (one line of 16-512 letters, digits or any of . _ ~ + / = -)`)
  }
  return t
}

/** A new token in a new file, mode 0600, durably; a file made meanwhile by another process wins. */
async function makeTokenFile (path: string): Promise<string> {
  const t = newToken()
  let fh
  try {
    fh = await fsp.open(path, 'wx', 0o600)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'EEXIST') return await tokenFromFile(path)
    throw new UkaiError('UKAI_ERR_INVALID_CONFIG', `control_token_file ${path}: cannot be made (${code ?? 'error'})`)
  }
  try {
    await fh.writeFile(`${t}\n`)
    await fh.sync()
  } finally { await fh.close() }
  await fsyncDir(dirname(path))
  return t
}

/** Whether an Authorization header carries `token` (compared in constant time). */
export function bearerMatches (header: string | undefined, token: string): boolean {
  if (header === undefined) return false
  const m = /^Bearer +(\S+) *$/i.exec(header)
  if (m === null) return false
  const digest = (s: string): Buffer => createHash('sha256').update(s).digest()
  return timingSafeEqual(digest(m[1]!), digest(token))
}
