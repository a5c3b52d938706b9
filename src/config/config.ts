/**
 * The node's configuration: a JSON file, validated when it is loaded. The
 * seed's key names are kept (image_root, metadata_root, blockname_format,
 * control_port, proxy_port), with the later UKAI's `id` and `data_root`
 * (an alias of image_root). An unknown key, a wrong type or an impossible
 * value is an error that names the key; nothing starts with a bad config.
 */
import { readFileSync } from 'node:fs'
import { dirname, resolve } from 'node:path'
import { UkaiError } from '../errors.js'
import { parseBlockNameFormat } from '../blockstore/block-name.js'
import { canonicalLocation } from '../metadata/names.js'
import { parseSize } from '../util/size.js'
import { jsonError, show } from '../util/show.js'

export const DEFAULT_CONFIG_PATH = '/etc/ukai/config'

export interface Config {
  /** Where this node keeps block files: <image_root>/<image>/<block>. */
  image_root: string
  /** Where the embedded metadata store keeps one file per image. */
  metadata_root: string
  blockname_format: string
  control_port: number
  proxy_port: number
  /** Address the control API listens on; loopback unless configured. */
  control_address: string
  /** Address the peer (proxy) port listens on; loopback unless configured. */
  proxy_address: string
  /** This node's address as image locations name it, "host:port". */
  id: string
  /**
   * File holding the control API's bearer token (control/token.ts); when
   * absent, the token kept in the metadata store.
   */
  control_token_file: string | undefined
  /**
   * Directory of this node's TLS identity (ca-cert.pem, node-cert.pem,
   * node-key.pem; `ukai cert node`). With it, the peer port and every TCP
   * NBD export speak only TLS, with certificates of the cluster CA at both
   * ends. Without it they speak plain text, which is allowed only on
   * loopback addresses (and unix sockets).
   */
  tls_dir: string | undefined
  /** Seconds a node in the error state is skipped before it is tried again. */
  retry_after: number
  /** Seconds a peer may take to answer before it is put in the error state. */
  io_timeout: number
  /**
   * Metadata store backend: "file" (embedded, default), or "etcd" when
   * metadata_servers names the cluster's etcd.
   */
  metadata_backend: 'file' | 'etcd'
  /** etcd client URLs ("http://host:2379"); empty for the embedded store. */
  metadata_servers: string[]
  /** Namespace of this cluster's keys in etcd. */
  metadata_prefix: string
  /**
   * Seconds a node's lease outlives its last renewal: a node that stops
   * (or loses etcd) for longer loses its registration and writer leases,
   * and stops writing before that.
   */
  lease_ttl: number
  /** Default block size for `ukai image create`, in bytes. */
  default_block_size: number
  /**
   * The FUSE mount's engine: "native" (native/ukai-fuse.c on libfuse 3,
   * local in-sync reads without the JS thread) or "fuse-native" (libfuse
   * 2, every request on the JS thread); undefined: native when its addon
   * is built, else fuse-native.
   */
  fuse_engine: 'native' | 'fuse-native' | undefined
  /** Where the config was read from, or undefined for built-in defaults. */
  source: string | undefined
}

type Checker = (value: unknown, key: string, base: string) => unknown

const fail = (key: string, message: string): UkaiError =>
  new UkaiError('UKAI_ERR_INVALID_CONFIG', `config key '${key}': ${message}`, { key })

const path: Checker = (v, key, base) => {
  if (typeof v !== 'string' || v.length === 0) throw fail(key, 'must be a non-empty path string')
  if (v.includes('\0')) throw fail(key, 'must not contain NUL')
  return resolve(base, v)
}
const port: Checker = (v, key) => {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > 65535) {
    throw fail(key, `must be an integer port number 1-65535, got ${show(v)}`)
  }
  return v
}
const address: Checker = (v, key) => {
  if (typeof v !== 'string' || !/^[A-Za-z0-9.:_[\]-]+$/.test(v)) throw fail(key, `must be a host name or IP address, got ${show(v)}`)
  return v
}
const seconds: Checker = (v, key) => {
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0 || v > 86400) {
    throw fail(key, `must be a number of seconds greater than 0 and at most 86400, got ${show(v)}`)
  }
  return v
}
const blockNameFormat: Checker = (v, key) => {
  if (typeof v !== 'string') throw fail(key, 'must be a string such as "%016d"')
  try { parseBlockNameFormat(v) } catch (err) { throw fail(key, (err as Error).message) }
  return v
}
const fuseEngine: Checker = (v, key) => {
  if (v !== 'native' && v !== 'fuse-native') throw fail(key, `must be "native" or "fuse-native", got ${show(v)}`)
  return v
}
const backend: Checker = (v, key) => {
  if (v !== 'file' && v !== 'etcd') throw fail(key, `must be "file" or "etcd", got ${show(v)}`)
  return v
}
const servers: Checker = (v, key) => {
  if (!Array.isArray(v) || !v.every((u) => typeof u === 'string' && /^https?:\/\/[A-Za-z0-9.[\]:-]+(:\d{1,5})?\/?$/.test(u))) {
    throw fail(key, `must be a list of etcd client URLs such as ["http://10.0.0.1:2379"], got ${show(v)}`)
  }
  return (v as string[]).map((u) => u.replace(/\/$/, ''))
}
const prefix: Checker = (v, key) => {
  if (typeof v !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(v)) {
    throw fail(key, `must be 1-64 letters, digits, '.', '_' or '-', got ${show(v)}`)
  }
  return v
}
const ttl: Checker = (v, key) => {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 2 || v > 3600) {
    throw fail(key, `must be a whole number of seconds from 2 to 3600, got ${show(v)}`)
  }
  return v
}
const byteSize: Checker = (v, key) => {
  let n: number
  if (typeof v === 'number' && Number.isSafeInteger(v) && v > 0) n = v
  else if (typeof v === 'string') {
    try { n = parseSize(v, key) } catch (err) { throw fail(key, (err as Error).message) }
  } else throw fail(key, `must be a positive size in bytes or a string such as "64M", got ${show(v)}`)
  return n
}
const blockSize: Checker = (v, key, base) => {
  const n = byteSize(v, key, base) as number
  if (n < 4096 || !Number.isInteger(Math.log2(n)) || n > 2 ** 30) throw fail(key, `must be a power of two from 4K to 1G, got ${show(v)}`)
  return n
}

const KEYS: Record<string, { check: Checker, as?: keyof Config }> = {
  image_root: { check: path },
  data_root: { check: path, as: 'image_root' },
  metadata_root: { check: path },
  blockname_format: { check: blockNameFormat },
  control_port: { check: port },
  proxy_port: { check: port },
  control_address: { check: address },
  control_token_file: { check: path },
  tls_dir: { check: path },
  proxy_address: { check: address },
  id: { check: (v, key) => v }, // checked below, once proxy_port is known
  retry_after: { check: seconds },
  io_timeout: { check: seconds },
  metadata_backend: { check: backend },
  metadata_servers: { check: servers },
  metadata_prefix: { check: prefix },
  lease_ttl: { check: ttl },
  default_block_size: { check: blockSize },
  fuse_engine: { check: fuseEngine }
}

export function defaultConfig (): Config {
  return {
    image_root: '/var/lib/ukai/images',
    metadata_root: '/var/lib/ukai/metadata',
    blockname_format: '%016d',
    control_port: 22221,
    proxy_port: 22222,
    control_address: '127.0.0.1',
    proxy_address: '127.0.0.1',
    id: '127.0.0.1:22222',
    control_token_file: undefined,
    tls_dir: undefined,
    retry_after: 60,
    io_timeout: 10,
    metadata_backend: 'file',
    metadata_servers: [],
    metadata_prefix: 'ukai',
    lease_ttl: 10,
    default_block_size: 64 * 2 ** 20,
    fuse_engine: undefined,
    source: undefined
  }
}

/**
 * Validates a parsed config object. Relative paths are taken relative to
 * `base` (the config file's directory).
 */
export function parseConfig (raw: unknown, base: string, source?: string): Config {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new UkaiError('UKAI_ERR_INVALID_CONFIG', 'config must be a JSON object')
  }
  const cfg = defaultConfig() as unknown as Record<string, unknown>
  const given = raw as Record<string, unknown>
  if ('image_root' in given && 'data_root' in given) {
    throw fail('data_root', 'is an alias of image_root; give only one of them')
  }
  for (const [key, value] of Object.entries(given)) {
    const spec = KEYS[key]
    if (spec === undefined) {
      throw fail(key, `unknown key (known keys: ${Object.keys(KEYS).join(', ')})`)
    }
    cfg[spec.as ?? key] = spec.check(value, key, base)
  }
  const config = cfg as unknown as Config
  config.source = source
  if (!('id' in given)) {
    // An IPv6 address needs brackets to be a location ("[::1]:22222").
    const host = config.proxy_address.includes(':') && !config.proxy_address.startsWith('[')
      ? `[${config.proxy_address}]`
      : config.proxy_address
    config.id = `${host}:${config.proxy_port}`
  } else {
    try {
      canonicalLocation(given.id as string, config.proxy_port)
    } catch {
      throw fail('id', `must be this node's address as "host" or "host:port", got ${show(given.id)}`)
    }
  }
  if (config.metadata_servers.length > 0) {
    if ('metadata_backend' in given && config.metadata_backend !== 'etcd') {
      throw fail('metadata_backend', `is "${config.metadata_backend}" but metadata_servers names etcd servers`)
    }
    config.metadata_backend = 'etcd'
  } else if (config.metadata_backend === 'etcd') {
    throw fail('metadata_backend', 'is "etcd" but metadata_servers names no etcd server')
  }
  if (config.metadata_servers.length === 0) {
    // The embedded store and the block files must not share a directory:
    // an image named "shards" would be the store's files.
    const a = config.image_root.replace(/\/+$/, '') + '/'
    const b = config.metadata_root.replace(/\/+$/, '') + '/'
    if (a.startsWith(b) || b.startsWith(a)) {
      throw fail('metadata_root', `must not be image_root or contain it or lie inside it (image_root ${config.image_root}, metadata_root ${config.metadata_root})`)
    }
  }
  if (config.tls_dir === undefined && !isLoopbackAddress(config.proxy_address)) {
    throw fail('proxy_address', `is ${config.proxy_address}, not a loopback address: the peer port speaks plain text only on loopback; give the node a TLS identity (config key tls_dir, made with ukai cert node)`)
  }
  if (config.control_port === config.proxy_port && config.control_address === config.proxy_address) {
    throw fail('control_port', `must differ from proxy_port (${config.proxy_port})`)
  }
  return config
}

/**
 * Loads the config: the path given, else $UKAI_CONFIG, else
 * /etc/ukai/config. Only the default path may be absent (then the built-in
 * defaults apply); a path the operator named must exist.
 */
export function loadConfig (path?: string): Config {
  const named = path ?? process.env.UKAI_CONFIG
  const file = named ?? DEFAULT_CONFIG_PATH
  let text: string
  try {
    text = readFileSync(file, 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' && named === undefined) return defaultConfig()
    throw new UkaiError('UKAI_ERR_INVALID_CONFIG', `cannot read config file ${file}: ${(err as Error).message}`, { path: file })
  }
  let raw: unknown
  try {
    raw = JSON.parse(text)
  } catch (err) {
    throw new UkaiError('UKAI_ERR_INVALID_CONFIG', `config file ${file} is not valid JSON (${jsonError(err)})`, { path: file })
  }
  return parseConfig(raw, dirname(resolve(file)), resolve(file))
}

/** True for an address only this machine reaches: 127.0.0.0/8, ::1, localhost. */
export function isLoopbackAddress (address: string): boolean {
  const a = address.startsWith('[') && address.endsWith(']') ? address.slice(1, -1) : address
  return a === 'localhost' || a === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(a) || /^::ffff:127\./i.test(a)
}

/** True when `location` names this node. */
export function isLocalLocation (config: Config, location: string): boolean {
  return canonicalLocation(location, config.proxy_port) === canonicalLocation(config.id, config.proxy_port)
}
