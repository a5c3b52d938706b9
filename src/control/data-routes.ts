/**
 * Control API routes that move an image's data (`ukai image import` and
 * `export`) and report storage (`ukai nodes storage`). Data goes through
 * the image's Volume on this node, as a hypervisor's I/O does: replicated
 * writes, reads from an in-sync replica, the writer lease.
 *
 *   POST   /v1/images/NAME/sessions {write}        open a data session (node/data-sessions.ts)
 *   DELETE /v1/images/NAME/sessions/ID             end it (a writing one is flushed first)
 *   PUT    /v1/images/NAME/data?offset=N[&session] raw bytes, at most MAX_DATA
 *   GET    /v1/images/NAME/data?offset=N&length=L[&session]   raw bytes
 *   GET    /v1/images/NAME/extents?offset=N&length=L[&session]   (MAX_EXTENT_BLOCKS blocks
 *                                                 in detail, data past them)
 *   POST   /v1/images/NAME/flush[?session]
 *   GET    /v1/storage                             this node's image_root
 *   GET    /v1/nodes/storage                       every registered node's
 *
 * Without a session, a request opens the image for itself (a PUT is
 * flushed before it answers).
 */
import type { IncomingMessage } from 'node:http'
import { UkaiError, invalidArgument } from '../errors.js'
import { storageReport } from '../node/storage.js'
import type { Extent } from '../volume/volume.js'
import { show } from '../util/show.js'
import type { Route } from './server.js'

/** Largest body of a data PUT, and largest length of a data GET. */
export const MAX_DATA = 16 * 2 ** 20

/**
 * Blocks one extents answer looks at at most (each is a look at a block
 * file, some tens of microseconds): past them, up to used_size, the answer
 * says data, as Volume.extents does where it cannot know (always safe: a
 * client reads it). A client that wants the detail asks at most this many
 * blocks at a time (the CLI's export does).
 */
export const MAX_EXTENT_BLOCKS = 2 ** 14

const IMAGE = '([^/]+)'

/** A query parameter that must be a byte offset or length (a non-negative integer). */
function byteParam (query: URLSearchParams, key: string, required: boolean): number | undefined {
  const v = query.get(key)
  if (v === null) {
    if (required) throw invalidArgument(`the query needs '${key}' (bytes)`, { key })
    return undefined
  }
  if (!/^\d{1,16}$/.test(v) || !Number.isSafeInteger(Number(v))) throw invalidArgument(`'${key}' must be a number of bytes, got ${show(v)}`, { key })
  return Number(v)
}

/** Query parameters other than `allowed` are refused, as unknown body fields are. */
export function onlyParams (query: URLSearchParams, allowed: string[]): void {
  for (const k of query.keys()) if (!allowed.includes(k)) throw invalidArgument(`unknown query parameter '${k}'`, { key: k })
}

function sessionParam (query: URLSearchParams): string | undefined {
  const s = query.get('session')
  if (s === null) return undefined
  if (!/^[0-9a-f]{24}$/.test(s)) throw invalidArgument(`'session' ${show(s)} is not a session id`, { key: 'session' })
  return s
}

/** [offset, offset + length) must lie within the image. */
function checkRange (image: string, size: number, offset: number, length: number): void {
  if (offset + length > size) {
    throw new UkaiError('UKAI_ERR_OUT_OF_RANGE', `range of ${length} bytes at ${offset} passes the end of image '${image}' (${size} bytes)`, { image, offset, length })
  }
}

/** A raw request body of at most `max` bytes; refused from its Content-Length when that says more. */
export async function readRawBody (req: IncomingMessage, max: number): Promise<Buffer> {
  const declared = Number(req.headers['content-length'] ?? NaN)
  if (declared > max) throw new UkaiError('UKAI_ERR_TOO_BIG', `request body of ${declared} bytes is larger than ${max} bytes`)
  const chunks: Buffer[] = []
  let size = 0
  for await (const chunk of req) {
    size += (chunk as Buffer).length
    if (size > max) throw new UkaiError('UKAI_ERR_TOO_BIG', `request body is larger than ${max} bytes`)
    chunks.push(chunk as Buffer)
  }
  return chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size)
}

export const dataRoutes: Route[] = [
  {
    method: 'POST',
    pattern: new RegExp(`^/v1/images/${IMAGE}/sessions$`),
    status: 201,
    handler: async (node, [name], body) => {
      const b = (body ?? {}) as Record<string, unknown>
      if (typeof b !== 'object' || b === null || Array.isArray(b)) throw invalidArgument('request body must be an object {write: boolean}')
      for (const k of Object.keys(b)) if (k !== 'write') throw invalidArgument(`unknown field '${k}'`, { key: k })
      if (b.write !== undefined && typeof b.write !== 'boolean') throw invalidArgument(`'write' must be true or false, got ${show(b.write)}`, { key: 'write' })
      await node.images.info(name!) // validates the name; 404 when unknown
      return await node.dataSessions.open(name!, b.write === true, 'data session')
    }
  },
  {
    method: 'DELETE',
    pattern: new RegExp(`^/v1/images/${IMAGE}/sessions/([^/]+)$`),
    handler: async (node, [name, id]) => await node.dataSessions.close(name!, id!)
  },
  {
    method: 'PUT',
    pattern: new RegExp(`^/v1/images/${IMAGE}/data$`),
    raw: true,
    handler: async (node, [name], body, query) => {
      onlyParams(query, ['offset', 'session'])
      const offset = byteParam(query, 'offset', true)!
      const data = body as Buffer
      await node.images.info(name!)
      return await node.dataSessions.use(name!, sessionParam(query), true, 'data PUT', async (v) => {
        checkRange(name!, v.size, offset, data.length)
        await v.write(offset, data)
        return { written: data.length }
      })
    }
  },
  {
    method: 'GET',
    pattern: new RegExp(`^/v1/images/${IMAGE}/data$`),
    handler: async (node, [name], _b, query) => {
      onlyParams(query, ['offset', 'length', 'session'])
      const offset = byteParam(query, 'offset', true)!
      const length = byteParam(query, 'length', true)!
      if (length > MAX_DATA) throw new UkaiError('UKAI_ERR_TOO_BIG', `'length' ${length} is more than ${MAX_DATA} bytes`, { key: 'length' })
      await node.images.info(name!)
      return await node.dataSessions.use(name!, sessionParam(query), false, 'data GET', async (v) => {
        checkRange(name!, v.size, offset, length)
        // Past used_size the image reads as zeros: the buffer is zeroed.
        const buf = Buffer.alloc(length)
        await v.read(offset, buf)
        return buf
      })
    }
  },
  {
    method: 'GET',
    pattern: new RegExp(`^/v1/images/${IMAGE}/extents$`),
    handler: async (node, [name], _b, query) => {
      onlyParams(query, ['offset', 'length', 'session'])
      const offset = byteParam(query, 'offset', false) ?? 0
      await node.images.info(name!)
      return await node.dataSessions.use(name!, sessionParam(query), false, 'extents', async (v) => {
        const length = byteParam(query, 'length', false) ?? v.size - Math.min(offset, v.size)
        checkRange(name!, v.size, offset, length)
        const used = Math.min(v.usedSize, offset + length)
        // A bounded walk: the whole of a large image (2^28 blocks of 4 KiB) would be a piece and a file look per block.
        const walked = Math.min(used, (Math.floor(offset / v.blockSize) + MAX_EXTENT_BLOCKS) * v.blockSize)
        const out: Extent[] = walked > offset ? await v.extents(offset, walked - offset) : []
        if (used > walked) {
          const last = out[out.length - 1]
          if (last !== undefined && !last.hole && !last.zero && last.offset + last.length === walked) last.length += used - walked
          else out.push({ offset: walked, length: used - walked, hole: false, zero: false })
        }
        // Past used_size nothing is stored: a hole that reads as zeros.
        const from = Math.max(offset, used)
        if (offset + length > from) {
          const last = out[out.length - 1]
          if (last !== undefined && last.hole && last.zero && last.offset + last.length === from) last.length += offset + length - from
          else out.push({ offset: from, length: offset + length - from, hole: true, zero: true })
        }
        return out
      })
    }
  },
  {
    method: 'POST',
    pattern: new RegExp(`^/v1/images/${IMAGE}/flush$`),
    handler: async (node, [name], _b, query) => {
      onlyParams(query, ['session'])
      await node.images.info(name!)
      await node.dataSessions.use(name!, sessionParam(query), true, 'flush', async (v) => await v.flush())
      return { flushed: name }
    }
  },
  { method: 'GET', pattern: /^\/v1\/storage$/, handler: async (node) => await storageReport(node) },
  { method: 'GET', pattern: /^\/v1\/nodes\/storage$/, handler: async (node) => await node.images.directory.storage() }
]
