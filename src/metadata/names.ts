/**
 * Validation of the names that become paths or addresses: image names
 * (a directory under image_root and a file under metadata_root) and
 * locations (node addresses). Anything that could leave those roots is
 * refused here, before any file is touched (DESIGN.md invariant 7).
 */
import { UkaiError } from '../errors.js'
import { show } from '../util/show.js'

/** Letters, digits, '.', '_', '-'; starts with a letter or digit; at most 128. */
const IMAGE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/

export function validateImageName (name: unknown): string {
  if (typeof name !== 'string' || !IMAGE_NAME.test(name)) {
    throw new UkaiError('UKAI_ERR_INVALID_NAME',
      `invalid image name ${show(name)}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit`,
      { image: typeof name === 'string' ? name : show(name) })
  }
  return name
}

const HOSTNAME = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/
const IPV6 = /^\[[0-9A-Fa-f:.]+\]$/

export interface Address { host: string, port: number }

/**
 * Parses a location: "host" (the default proxy port) or "host:port";
 * IPv6 hosts in brackets, "[::1]:22222".
 */
export function parseLocation (location: unknown, defaultPort: number): Address {
  if (typeof location !== 'string') {
    throw new UkaiError('UKAI_ERR_INVALID_NAME', `invalid location ${show(location)}: not a string`)
  }
  let host = location
  let port = defaultPort
  const m = /^(.*):(\d{1,5})$/.exec(location)
  if (m !== null && !(location.startsWith('[') && !location.includes(']:'))) {
    host = m[1]!
    port = Number(m[2])
  }
  if (!(HOSTNAME.test(host) || IPV6.test(host)) || port < 1 || port > 65535) {
    throw new UkaiError('UKAI_ERR_INVALID_NAME',
      `invalid location ${show(location)}: expected host or host:port (port 1-65535)`, { location })
  }
  return { host, port }
}

export function validateLocation (location: unknown, defaultPort: number): string {
  parseLocation(location, defaultPort)
  return location as string
}

/** True when two locations (node ids) name the same node; false when either is not a location. */
export function sameLocation (a: string, b: string, defaultPort: number): boolean {
  try {
    return canonicalLocation(a, defaultPort) === canonicalLocation(b, defaultPort)
  } catch { return false }
}

/** The canonical "host:port" form, to compare locations written either way. */
export function canonicalLocation (location: string, defaultPort: number): string {
  const { host, port } = parseLocation(location, defaultPort)
  return `${host.toLowerCase()}:${port}`
}
