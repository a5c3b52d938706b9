/**
 * One error class for the whole project, with stable string codes, and one
 * table that maps each code to what every interface reports: the errno a
 * FUSE callback returns, the NBD error value (proto.md, "Error values"),
 * the HTTP status of the control API and the exit code of the CLI.
 */
import { constants as os } from 'node:os'

const E = os.errno

export interface ErrorMapping {
  /** Positive errno; FUSE callbacks return its negative. */
  errno: number
  /** NBD error value as the protocol spells it (NBD_EPERM ...). */
  nbd: number
  http: number
  exit: number
}

// NBD error values: proto.md, section "Error values". They are Linux errno
// numbers, except ESHUTDOWN (108) and EOVERFLOW (75), also Linux numbers.
export const NBD_EPERM = 1
export const NBD_EIO = 5
export const NBD_ENOMEM = 12
export const NBD_EINVAL = 22
export const NBD_ENOSPC = 28
export const NBD_EOVERFLOW = 75
export const NBD_ENOTSUP = 95
export const NBD_ESHUTDOWN = 108

export const CODES = {
  UKAI_ERR_INVALID_ARGUMENT: { errno: E.EINVAL, nbd: NBD_EINVAL, http: 400, exit: 2 },
  UKAI_ERR_INVALID_CONFIG: { errno: E.EINVAL, nbd: NBD_EINVAL, http: 500, exit: 2 },
  UKAI_ERR_INVALID_METADATA: { errno: E.EINVAL, nbd: NBD_EINVAL, http: 400, exit: 2 },
  UKAI_ERR_INVALID_NAME: { errno: E.EINVAL, nbd: NBD_EINVAL, http: 400, exit: 2 },
  UKAI_ERR_NOT_FOUND: { errno: E.ENOENT, nbd: NBD_EINVAL, http: 404, exit: 3 },
  UKAI_ERR_EXISTS: { errno: E.EEXIST, nbd: NBD_EINVAL, http: 409, exit: 4 },
  UKAI_ERR_BUSY: { errno: E.EBUSY, nbd: NBD_EPERM, http: 409, exit: 5 },
  UKAI_ERR_PERMISSION: { errno: E.EPERM, nbd: NBD_EPERM, http: 403, exit: 6 },
  UKAI_ERR_READ_ONLY: { errno: E.EROFS, nbd: NBD_EPERM, http: 403, exit: 6 },
  UKAI_ERR_NO_SPACE: { errno: E.ENOSPC, nbd: NBD_ENOSPC, http: 507, exit: 7 },
  UKAI_ERR_OUT_OF_RANGE: { errno: E.EINVAL, nbd: NBD_EINVAL, http: 416, exit: 2 },
  UKAI_ERR_TOO_BIG: { errno: E.EFBIG, nbd: NBD_EOVERFLOW, http: 413, exit: 2 },
  UKAI_ERR_NOT_SUPPORTED: { errno: E.EOPNOTSUPP, nbd: NBD_ENOTSUP, http: 501, exit: 8 },
  /** No in-sync location of a block could be reached. */
  UKAI_ERR_UNAVAILABLE: { errno: E.EIO, nbd: NBD_EIO, http: 503, exit: 9 },
  UKAI_ERR_IO: { errno: E.EIO, nbd: NBD_EIO, http: 500, exit: 9 },
  UKAI_ERR_TIMEOUT: { errno: E.ETIMEDOUT, nbd: NBD_EIO, http: 504, exit: 9 },
  UKAI_ERR_SHUTDOWN: { errno: 108 /* ESHUTDOWN */, nbd: NBD_ESHUTDOWN, http: 503, exit: 9 },
  UKAI_ERR_CONNECT: { errno: E.ECONNREFUSED, nbd: NBD_EIO, http: 502, exit: 10 },
  /** Another live process runs with this node's id. */
  UKAI_ERR_NODE_ID_IN_USE: { errno: E.EADDRINUSE, nbd: NBD_EIO, http: 409, exit: 11 },
  /** The metadata store (etcd) could not be reached. */
  UKAI_ERR_METADATA_UNAVAILABLE: { errno: E.EIO, nbd: NBD_EIO, http: 503, exit: 12 },
  /** This writer was fenced: another node took over the image's writer lease. */
  UKAI_ERR_FENCED: { errno: E.EROFS, nbd: NBD_EPERM, http: 409, exit: 13 },
  /** A control API call without the cluster's bearer token, or with another one. */
  UKAI_ERR_UNAUTHENTICATED: { errno: E.EACCES, nbd: NBD_EPERM, http: 401, exit: 14 },
  UKAI_ERR_INTERNAL: { errno: E.EIO, nbd: NBD_EIO, http: 500, exit: 1 }
} as const satisfies Record<string, ErrorMapping>

export type ErrorCode = keyof typeof CODES

export class UkaiError extends Error {
  readonly code: ErrorCode
  /** Extra facts for the API's error body (the key at fault, ...). */
  readonly details: Record<string, unknown> | undefined

  constructor (code: ErrorCode, message: string, details?: Record<string, unknown>, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'UkaiError'
    this.code = code
    this.details = details
  }

  get mapping (): ErrorMapping { return CODES[this.code] }
}

export function isUkaiError (err: unknown): err is UkaiError {
  return err instanceof UkaiError
}

/**
 * Turns any thrown value into a UkaiError. System errors from the file
 * system keep their meaning (ENOSPC stays "no space"); anything unknown is
 * an internal error, never silently a success.
 */
export function toUkaiError (err: unknown): UkaiError {
  if (err instanceof UkaiError) return err
  const e = err as NodeJS.ErrnoException
  const message = e?.message ?? String(err)
  switch (e?.code) {
    case 'ENOENT': return new UkaiError('UKAI_ERR_NOT_FOUND', message, undefined, { cause: err })
    case 'EEXIST': return new UkaiError('UKAI_ERR_EXISTS', message, undefined, { cause: err })
    case 'ENOSPC': case 'EDQUOT': case 'EFBIG': return new UkaiError('UKAI_ERR_NO_SPACE', message, undefined, { cause: err })
    case 'EACCES': case 'EPERM': return new UkaiError('UKAI_ERR_PERMISSION', message, undefined, { cause: err })
    case 'EROFS': return new UkaiError('UKAI_ERR_READ_ONLY', message, undefined, { cause: err })
    case 'EBUSY': return new UkaiError('UKAI_ERR_BUSY', message, undefined, { cause: err })
    case 'ETIMEDOUT': return new UkaiError('UKAI_ERR_TIMEOUT', message, undefined, { cause: err })
    case 'ECONNREFUSED': case 'ECONNRESET': case 'EHOSTUNREACH': case 'EPIPE':
      return new UkaiError('UKAI_ERR_CONNECT', message, undefined, { cause: err })
    case 'EIO': return new UkaiError('UKAI_ERR_IO', message, undefined, { cause: err })
    default: return new UkaiError('UKAI_ERR_INTERNAL', message, undefined, { cause: err })
  }
}

/** Negative errno for a FUSE callback. */
export function fuseErrno (err: unknown): number {
  return -toUkaiError(err).mapping.errno
}

/** NBD error value for a reply. */
export function nbdError (err: unknown): number {
  return toUkaiError(err).mapping.nbd
}

// Factories for the errors raised in many places, so their wording stays one.
export const invalidArgument = (message: string, details?: Record<string, unknown>): UkaiError =>
  new UkaiError('UKAI_ERR_INVALID_ARGUMENT', message, details)
export const notFound = (what: string): UkaiError => new UkaiError('UKAI_ERR_NOT_FOUND', `${what} not found`)
export const imageNotFound = (name: string): UkaiError =>
  new UkaiError('UKAI_ERR_NOT_FOUND', `image '${name}' not found`, { image: name })
