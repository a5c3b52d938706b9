/**
 * Client of the control API, used by the CLI. Errors from the node come
 * back as UkaiError with the node's code and message.
 */
import { request as httpRequest, type ClientRequest, type IncomingMessage, type RequestOptions } from 'node:http'
import { request as httpsRequest } from 'node:https'
import { CODES, UkaiError, type ErrorCode } from '../errors.js'
import { clusterCa, expectNode, type ControlTls } from '../tls/identity.js'
import type { Config } from '../config/config.js'

/**
 * How this config's CLI or node reaches node `node`'s control API: HTTPS
 * trusting the cluster CA in tls_dir, or plain HTTP without one.
 */
export function controlTlsOf (config: Config, node: string): ControlTls | undefined {
  if (config.tls_dir === undefined) return undefined
  return { ca: clusterCa(config.tls_dir), node, defaultPort: config.proxy_port }
}

/** A request body that is JSON text already, sent as it is. */
export class RawJson {
  constructor (readonly text: string) {}
}

export class ControlClient {
  readonly host: string
  readonly port: number
  /** Milliseconds a call may take (0: no limit). */
  readonly timeoutMs: number
  /** The cluster's bearer token (control/token.ts); never shown. */
  private readonly token: string | undefined
  /** HTTPS to a node of a cluster on TLS (config key tls_dir); plain HTTP otherwise. */
  private readonly tls: ControlTls | undefined

  constructor (host: string, port: number, timeoutMs = 0, token?: string, tls?: ControlTls) {
    this.host = host
    this.port = port
    this.timeoutMs = timeoutMs
    this.token = token
    this.tls = tls
  }

  /** One request to the node, over HTTPS when the cluster is on TLS (the token never crosses in clear). */
  request (options: RequestOptions, onResponse: (res: IncomingMessage) => void): ClientRequest {
    const o = { ...options, host: this.host, port: this.port }
    if (this.tls === undefined) return httpRequest(o, onResponse)
    return httpsRequest({ ...o, ca: this.tls.ca, checkServerIdentity: expectNode(this.tls.node, this.tls.defaultPort) }, onResponse)
  }

  /** Headers of every call: the token, and a body's type and length. */
  headers (payload: Buffer | undefined): Record<string, string | number> {
    return {
      ...(this.token !== undefined ? { authorization: `Bearer ${this.token}` } : {}),
      ...(payload !== undefined ? { 'content-type': 'application/json', 'content-length': payload.length } : {})
    }
  }

  async call<T = unknown> (method: string, path: string, body?: unknown): Promise<T> {
    const payload = body === undefined ? undefined : Buffer.from(body instanceof RawJson ? body.text : JSON.stringify(body))
    return await new Promise<T>((resolve, reject) => {
      const req = this.request({
        method,
        path,
        headers: this.headers(payload)
      }, (res) => {
        const chunks: Buffer[] = []
        res.on('data', (c: Buffer) => chunks.push(c))
        res.on('error', reject)
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8')
          let doc: unknown
          try { doc = JSON.parse(text) } catch {
            return reject(new UkaiError('UKAI_ERR_INTERNAL', `control API answered ${res.statusCode ?? '?'} with a body that is not JSON`))
          }
          if ((res.statusCode ?? 500) >= 400) {
            const e = (doc as { error?: { code?: string, message?: string, details?: Record<string, unknown> } }).error
            const code = (e?.code !== undefined && e.code in CODES ? e.code : 'UKAI_ERR_INTERNAL') as ErrorCode
            return reject(new UkaiError(code, e?.message ?? `control API error ${res.statusCode ?? '?'}`, e?.details))
          }
          resolve(doc as T)
        })
      })
      req.on('error', (err) => reject(err))
      if (this.timeoutMs > 0) {
        req.setTimeout(this.timeoutMs, () => req.destroy(new UkaiError('UKAI_ERR_TIMEOUT', `control API at ${this.host}:${this.port} did not answer in ${this.timeoutMs} ms`)))
      }
      req.end(payload)
    })
  }
}

/**
 * Calls a streamed endpoint: `onLine` gets each progress object; resolves
 * with the final result, rejects with the node's error.
 */
export async function callStream<T> (client: ControlClient, method: string, path: string, body: unknown, onLine: (progress: unknown) => void): Promise<T> {
  const payload = Buffer.from(JSON.stringify(body ?? {}))
  return await new Promise<T>((resolve, reject) => {
    const req = client.request({
      method,
      path,
      headers: client.headers(payload)
    }, (res) => {
      let pending = ''
      let settled = false
      const handle = (text: string): void => {
        if (text.trim() === '') return
        let doc: { progress?: unknown, result?: T, error?: { code?: string, message?: string, details?: Record<string, unknown> } }
        try { doc = JSON.parse(text) } catch { return }
        if (doc.progress !== undefined) onLine(doc.progress)
        else if (doc.error !== undefined) {
          settled = true
          const code = (doc.error.code !== undefined && doc.error.code in CODES ? doc.error.code : 'UKAI_ERR_INTERNAL') as ErrorCode
          reject(new UkaiError(code, doc.error.message ?? 'error', doc.error.details))
        } else if ('result' in doc) {
          settled = true
          resolve(doc.result as T)
        }
      }
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => {
        pending += chunk
        let i: number
        while ((i = pending.indexOf('\n')) >= 0) {
          handle(pending.slice(0, i))
          pending = pending.slice(i + 1)
        }
      })
      res.on('end', () => {
        handle(pending)
        if (!settled) reject(new UkaiError('UKAI_ERR_CONNECT', 'the node closed the answer before the end'))
      })
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end(payload)
  })
}

/** True for the errors that mean "no node is listening there". */
export function isNotRunning (err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException)?.code
  return code === 'ECONNREFUSED' || code === 'ENOENT' || code === 'EADDRNOTAVAIL'
}
