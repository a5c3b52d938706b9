/**
 * The cluster's own certificate authority, with Debian's `openssl` CLI
 * (Node.js can verify certificates but not make them). Keys are ECDSA
 * P-256. File names follow the convention QEMU's `tls-creds-x509` and
 * libnbd's `tls-certificates` read (ca-cert.pem, client-cert.pem,
 * client-key.pem), so a hypervisor's directory is used as it is:
 *
 * - CA directory: ca-cert.pem, ca-key.pem (the key never leaves it).
 * - Node directory (config key `tls_dir`): ca-cert.pem, node-cert.pem,
 *   node-key.pem. Subject OU=node, CN=<node id>; the certificate serves
 *   both ends of the peer protocol and the hypervisor-facing NBD export,
 *   so its subjectAltNames carry the host of the id (and any --host).
 * - Client directory (a hypervisor): ca-cert.pem, client-cert.pem,
 *   client-key.pem. Subject OU=client, CN=<name>; good for the NBD export,
 *   never for the peer port, which takes only OU=node.
 */
import { execFile } from 'node:child_process'
import { X509Certificate, randomBytes } from 'node:crypto'
import { copyFile, mkdir, mkdtemp, readFile, rename, rm, stat, writeFile } from 'node:fs/promises'
import { isIP } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { UkaiError, invalidArgument } from '../errors.js'

export const CA_CERT = 'ca-cert.pem'
export const CA_KEY = 'ca-key.pem'
export const NODE_CERT = 'node-cert.pem'
export const NODE_KEY = 'node-key.pem'
export const CLIENT_CERT = 'client-cert.pem'
export const CLIENT_KEY = 'client-key.pem'

/** Days a CA certificate is valid. */
const CA_DAYS = 3650
/** Days a node or client certificate is valid. */
const LEAF_DAYS = 825

async function openssl (args: string[]): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    execFile('openssl', args, { timeout: 60_000 }, (err, _stdout, stderr) => {
      if (err === null) return resolve()
      const missing = (err as NodeJS.ErrnoException).code === 'ENOENT'
      reject(new UkaiError('UKAI_ERR_INTERNAL', missing
        ? 'the openssl command is not installed (Debian package openssl)'
        : `openssl ${args[0] ?? ''} failed: ${stderr.trim().split('\n').slice(-3).join('; ')}`))
    })
  })
}

async function exists (path: string): Promise<boolean> {
  try { await stat(path); return true } catch { return false }
}

/** A subject field value openssl's -subj can carry: no '/', '\', '=', control characters or '+'. */
function subjectValue (v: string, what: string): string {
  // eslint-disable-next-line no-control-regex
  if (v.length === 0 || v.length > 64 || /[/\\=+\x00-\x1f\x7f,"]/.test(v)) {
    throw invalidArgument(`${what} ${JSON.stringify(v)} cannot be a certificate name (1-64 characters, none of / \\ = + , " or control characters)`)
  }
  return v
}

/** The subjectAltName entry of a host: an IP address or a DNS name. */
function altName (host: string): string {
  const h = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host
  if (isIP(h) !== 0) return `IP:${h}`
  if (!/^[A-Za-z0-9.-]{1,253}$/.test(h)) throw invalidArgument(`host ${JSON.stringify(host)} is not an IP address or DNS name`)
  return `DNS:${h}`
}

/** The host part of a node id "host:port" ("[::1]:22222" -> "[::1]"). */
export function hostOfId (id: string): string {
  const i = id.lastIndexOf(':')
  return i > 0 && /^\d+$/.test(id.slice(i + 1)) ? id.slice(0, i) : id
}

/** Files are written under a temporary name and renamed, so a directory never holds half a credential. */
async function refuseOverwrite (paths: string[]): Promise<void> {
  for (const p of paths) {
    if (await exists(p)) throw new UkaiError('UKAI_ERR_EXISTS', `${p} exists already; remove it first to make a new one`, { path: p })
  }
}

/** Creates the cluster CA in `dir` (made if needed). Refuses to overwrite an existing CA. */
export async function createCa (dir: string, name = 'UKAI cluster CA'): Promise<void> {
  subjectValue(name, 'CA name')
  await mkdir(dir, { recursive: true, mode: 0o700 })
  const cert = join(dir, CA_CERT)
  const key = join(dir, CA_KEY)
  await refuseOverwrite([cert, key])
  const tmp = await mkdtemp(join(dir, '.new-'))
  try {
    await openssl([
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', join(tmp, CA_KEY), '-out', join(tmp, CA_CERT), '-days', String(CA_DAYS),
      '-subj', `/O=ukai/OU=ca/CN=${name}`,
      '-addext', 'basicConstraints=critical,CA:TRUE',
      '-addext', 'keyUsage=critical,keyCertSign,cRLSign'
    ])
    await rename(join(tmp, CA_KEY), key)
    await rename(join(tmp, CA_CERT), cert)
  } finally {
    await rm(tmp, { recursive: true, force: true })
  }
}

export type CertRole = 'node' | 'client'

export interface IssueOptions {
  /** Extra hosts (IP addresses or DNS names) the certificate is valid for. */
  hosts?: string[]
}

/**
 * Issues a node's (role 'node', `name` its id) or a hypervisor's (role
 * 'client') key and certificate from the CA in `caDir` into `outDir`,
 * with a copy of the CA certificate next to them.
 */
export async function issueCert (caDir: string, role: CertRole, name: string, outDir: string, options: IssueOptions = {}): Promise<{ cert: string, key: string }> {
  subjectValue(name, role === 'node' ? 'node id' : 'client name')
  const caCert = join(caDir, CA_CERT)
  const caKey = join(caDir, CA_KEY)
  for (const p of [caCert, caKey]) {
    if (!await exists(p)) throw new UkaiError('UKAI_ERR_NOT_FOUND', `${p} does not exist: create the CA first (ukai cert ca ${caDir})`, { path: p })
  }
  const hosts = role === 'node' ? [hostOfId(name), ...(options.hosts ?? [])] : (options.hosts ?? [])
  const san = [...new Set(hosts.map(altName))]
  await mkdir(outDir, { recursive: true, mode: 0o700 })
  const certPath = join(outDir, role === 'node' ? NODE_CERT : CLIENT_CERT)
  const keyPath = join(outDir, role === 'node' ? NODE_KEY : CLIENT_KEY)
  await refuseOverwrite([certPath, keyPath])
  const tmp = await mkdtemp(join(tmpdir(), 'ukai-cert-'))
  try {
    const ext = [
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature',
      `extendedKeyUsage=${role === 'node' ? 'serverAuth,clientAuth' : 'clientAuth'}`,
      ...(san.length > 0 ? [`subjectAltName=${san.join(',')}`] : [])
    ]
    await writeFile(join(tmp, 'ext.cnf'), ext.join('\n') + '\n')
    await openssl([
      'req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', join(tmp, 'key.pem'), '-out', join(tmp, 'req.pem'), '-subj', `/O=ukai/OU=${role}/CN=${name}`
    ])
    await openssl([
      'x509', '-req', '-in', join(tmp, 'req.pem'), '-CA', caCert, '-CAkey', caKey,
      '-set_serial', `0x${randomBytes(16).toString('hex')}`, '-days', String(LEAF_DAYS),
      '-extfile', join(tmp, 'ext.cnf'), '-out', join(tmp, 'cert.pem')
    ])
    await copyFile(join(tmp, 'key.pem'), keyPath + '.new')
    await rename(keyPath + '.new', keyPath)
    await copyFile(join(tmp, 'cert.pem'), certPath + '.new')
    await rename(certPath + '.new', certPath)
    await copyFile(caCert, join(outDir, CA_CERT))
  } finally {
    await rm(tmp, { recursive: true, force: true })
  }
  return { cert: certPath, key: keyPath }
}

/** One line describing a certificate file, for the CLI. */
export async function describeCert (path: string): Promise<string> {
  const c = new X509Certificate(await readFile(path))
  return `${path}: ${c.subject.replace(/\n/g, ', ')}${c.subjectAltName !== undefined ? ` (${c.subjectAltName})` : ''}, valid until ${c.validTo}`
}
