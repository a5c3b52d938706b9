/**
 * A node's TLS identity (config key `tls_dir`, see certs.ts) and who is
 * at the other end of a TLS connection.
 *
 * - At start the node checks that its certificate was issued by the
 *   cluster CA in the same directory, that its key belongs to it, and
 *   that it names this node (OU=node, CN=<config id>): a node can serve,
 *   register and write only as the id in its certificate.
 * - Both ends of every TLS connection present a certificate from the
 *   cluster CA and verify the other's (mutual TLS). The peer port takes
 *   only node certificates; a client certificate (a hypervisor's) is good
 *   for the NBD export and nothing else.
 */
import { X509Certificate } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { createSecureContext, type PeerCertificate, type SecureContext, type TLSSocket } from 'node:tls'
import { UkaiError } from '../errors.js'
import { sameLocation } from '../metadata/names.js'
import { CA_CERT, NODE_CERT, NODE_KEY } from './certs.js'

/** Who a verified certificate says the other end is. */
export interface PeerIdentity {
  role: 'node' | 'client'
  /** A node's id, or a client's name. */
  name: string
}

export interface NodeTls {
  dir: string
  /** This node's certificate and key, trusting only the cluster CA. */
  context: SecureContext
  /** The id in this node's certificate (equal to the config's id). */
  id: string
  /** The cluster CA, which every peer's certificate must come from. */
  ca: X509Certificate
  /** The PEM files, for servers that build their own context (the control API's HTTPS). */
  pem: { ca: Buffer, cert: Buffer, key: Buffer }
}

function field (subject: string | Record<string, string | string[] | undefined> | undefined, key: string): string | undefined {
  if (subject === undefined) return undefined
  if (typeof subject === 'string') {
    const lines = subject.split('\n').filter((l) => l.startsWith(`${key}=`))
    return lines.length === 1 ? lines[0]!.slice(key.length + 1) : undefined
  }
  const v = subject[key]
  return typeof v === 'string' ? v : undefined
}

/** The identity a certificate's subject carries, or undefined for one that is neither a node's nor a client's. */
export function identityOf (subject: string | Record<string, string | string[] | undefined> | undefined): PeerIdentity | undefined {
  const role = field(subject, 'OU')
  const name = field(subject, 'CN')
  if ((role !== 'node' && role !== 'client') || name === undefined || name === '') return undefined
  return { role, name }
}

/**
 * The identity of the client of a server-side TLS socket, once its
 * certificate is checked here against the cluster CA: OpenSSL has seen
 * the client prove it holds the certificate's key, but a TLS socket made
 * over an accepted connection does not check the chain itself (Node's
 * tls.Server does that; this one runs inside the NBD handshake). The
 * CA issues node and client certificates directly, so the chain is one
 * link: issued by the CA, signed by its key, valid now, meant for clients.
 */
export function clientIdentity (socket: TLSSocket, ca: X509Certificate): PeerIdentity | undefined {
  const cert = socket.getPeerX509Certificate()
  if (cert === undefined) return undefined
  const now = Date.now()
  if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) return undefined
  if (Date.parse(cert.validFrom) > now || Date.parse(cert.validTo) < now) return undefined
  if (cert.ca) return undefined
  const usage = cert.keyUsage
  if (usage !== undefined && !usage.includes(CLIENT_AUTH)) return undefined
  return identityOf(cert.subject)
}

/** The extended key usage "TLS client authentication". */
const CLIENT_AUTH = '1.3.6.1.5.5.7.3.2'

function readPem (dir: string, name: string): Buffer {
  const path = join(dir, name)
  try {
    return readFileSync(path)
  } catch (err) {
    throw new UkaiError('UKAI_ERR_INVALID_CONFIG', `config key 'tls_dir': cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); make it with ukai cert node`, { path })
  }
}

/** Loads and checks this node's TLS identity from `dir` (see the module comment). */
export function loadNodeTls (dir: string, id: string): NodeTls {
  const caPem = readPem(dir, CA_CERT)
  const certPem = readPem(dir, NODE_CERT)
  const keyPem = readPem(dir, NODE_KEY)
  const bad = (what: string): UkaiError => new UkaiError('UKAI_ERR_INVALID_CONFIG', `config key 'tls_dir' (${dir}): ${what}`, { path: dir })
  let ca: X509Certificate
  let cert: X509Certificate
  try {
    ca = new X509Certificate(caPem)
    cert = new X509Certificate(certPem)
  } catch {
    // Never the file's bytes: a path given by mistake may be anything.
    throw bad(`${CA_CERT} or ${NODE_CERT} is not a PEM certificate`)
  }
  if (!cert.verify(ca.publicKey)) throw bad(`${NODE_CERT} was not issued by the CA in ${CA_CERT}`)
  const who = identityOf(cert.subject)
  if (who?.role !== 'node') throw bad(`${NODE_CERT} is not a node certificate (subject ${cert.subject.replace(/\n/g, ', ')})`)
  if (who.name !== id) throw bad(`${NODE_CERT} is node ${who.name}'s certificate, and this node's id is ${id}`)
  if (Date.parse(cert.validTo) < Date.now()) throw bad(`${NODE_CERT} expired on ${cert.validTo}`)
  let context: SecureContext
  try {
    context = createSecureContext({ ca: caPem, cert: certPem, key: keyPem, minVersion: 'TLSv1.2' })
  } catch (err) {
    throw bad(`${NODE_KEY} does not go with ${NODE_CERT} or is not a key (${(err as Error).message.split('\n')[0] ?? ''})`)
  }
  return { dir, context, id, ca, pem: { ca: caPem, cert: certPem, key: keyPem } }
}

/**
 * The server-identity check of a client connecting to node `id`: the
 * certificate, already verified against the CA, must be that node's (ids
 * compared as locations, `defaultPort` where one names no port).
 */
export function expectNode (id: string, defaultPort: number): (host: string, cert: PeerCertificate) => Error | undefined {
  return (_host, cert) => {
    const who = identityOf(cert.subject as unknown as Record<string, string | string[] | undefined>)
    if (who?.role === 'node' && sameLocation(who.name, id, defaultPort)) return undefined
    return new UkaiError('UKAI_ERR_PERMISSION', `the peer at ${id} presented the certificate of ${who === undefined ? 'an unknown subject' : `${who.role} ${who.name}`}, not node ${id}'s`)
  }
}

/**
 * How a control API client reaches a node of a cluster on TLS: HTTPS,
 * trusting only the cluster CA, and only the node certificate of `node`.
 */
export interface ControlTls {
  ca: Buffer
  /** The node expected at the other end (its id); its certificate must name it. */
  node: string
  /** The port of a node id that names none (the cluster's proxy_port). */
  defaultPort: number
}

/** The cluster CA certificate of a tls_dir, for a control API client (the CLI needs no node key). */
export function clusterCa (dir: string): Buffer {
  return readPem(dir, CA_CERT)
}
