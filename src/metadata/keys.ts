/**
 * Where everything shared lives in the metadata core, and how an image's
 * metadata is cut into keys. Keys stay small whatever the image's size:
 * an image header, and per location one key per segment of 65,536 blocks
 * holding that segment's ranges (held, out of sync). A uniform 1 TiB
 * image with 1 MiB blocks is 16 small keys per location, and one change
 * of sync state rewrites the one segment key it touches.
 *
 *   images/<name>/meta/header             size, block size, used size, hypervisors, location order, incarnation
 *   images/<name>/meta/loc/<loc>/<seg>    {"blocks": ranges, "out_of_sync": ranges} of blocks [seg*S, (seg+1)*S)
 *   images/<name>/dirty                   the dirty-block log
 *   images/<name>/writer                  the writer lease (on the holder node's lease)
 *   images/<name>/generation              the last writer generation granted (survives its holder)
 *   images/<name>/open/<node>             who has the image open there (on that node's lease)
 *   nodes/<id>/info                       a node's registration: how to reach its control API
 *   nodes/<id>/alive                      present while the node runs (on its lease)
 *   cluster/control-token                 the control API's bearer token (unless the config names a file)
 *
 * Image names and locations cannot contain '/', so no key is ambiguous.
 */
import { UkaiError } from '../errors.js'
import { GRANULE, ImageMeta, emptyLocation, type LocationState } from './image.js'
import { RangeSet, type Range } from './range-set.js'
import { jsonError, show } from '../util/show.js'

/** Blocks per location segment key. */
export const SEGMENT_BLOCKS = 65536
export const HEADER_FORMAT = 2

export const imagesPrefix = 'images/'
export const imagePrefix = (name: string): string => `images/${name}/`
export const metaPrefix = (name: string): string => `images/${name}/meta/`
export const headerKey = (name: string): string => `images/${name}/meta/header`
export const locPrefix = (name: string): string => `images/${name}/meta/loc/`
export const segmentKey = (name: string, location: string, segment: number): string =>
  `images/${name}/meta/loc/${location}/${String(segment).padStart(8, '0')}`
export const dirtyKey = (name: string): string => `images/${name}/dirty`
export const writerKey = (name: string): string => `images/${name}/writer`
export const generationKey = (name: string): string => `images/${name}/generation`
/** A move of the image under way (MoveIntent): the node that runs it resumes it when it starts again. */
export const moveKey = (name: string): string => `images/${name}/move`
export const openPrefix = (name: string): string => `images/${name}/open/`
export const openKey = (name: string, node: string): string => `images/${name}/open/${node}`
export const nodesPrefix = 'nodes/'
export const controlTokenKey = 'cluster/control-token'
export const nodeInfoKey = (id: string): string => `nodes/${id}/info`
export const nodeAliveKey = (id: string): string => `nodes/${id}/alive`

/** The image name in a key under images/, or undefined. */
export function imageOfKey (key: string): string | undefined {
  if (!key.startsWith(imagesPrefix)) return undefined
  const end = key.indexOf('/', imagesPrefix.length)
  return end < 0 ? undefined : key.slice(imagesPrefix.length, end)
}

export interface ImageHeader {
  format: typeof HEADER_FORMAT
  name: string
  size: number
  block_size: number
  used_size: number
  hypervisors: string[]
  /** Locations in the order they were added (replicas are listed so). */
  locations: string[]
  /** Made when the image is created: tells this image from an earlier one of the same name. */
  incarnation: string
  created: string
}

/** A location's state of one segment; `fine` and `changed` only when it keeps fine records there (granules of GRANULE bytes). */
interface SegmentDoc { blocks: Range[], out_of_sync: Range[], fine?: Range[], changed?: Range[] }

const corrupt = (name: string, what: string): UkaiError =>
  new UkaiError('UKAI_ERR_INVALID_METADATA', `stored metadata of image '${name}': ${what}`)

/** The keys and values that hold `meta` (header and location segments). */
export function encodeImageKeys (meta: ImageMeta, incarnation: string, created: string): Map<string, string> {
  const out = new Map<string, string>()
  const header: ImageHeader = {
    format: HEADER_FORMAT,
    name: meta.name,
    size: meta.size,
    block_size: meta.blockSize,
    used_size: meta.usedSize,
    hypervisors: meta.hypervisors.slice(),
    locations: [...meta.locations.keys()],
    incarnation,
    created
  }
  out.set(headerKey(meta.name), JSON.stringify(header))
  for (const [loc, st] of meta.locations) {
    const segments = new Set<number>()
    for (const [s, e] of st.blocks.ranges()) {
      for (let seg = Math.floor(s / SEGMENT_BLOCKS); seg * SEGMENT_BLOCKS < e; seg++) segments.add(seg)
    }
    for (const seg of segments) {
      const lo = seg * SEGMENT_BLOCKS
      const hi = lo + SEGMENT_BLOCKS
      const doc: SegmentDoc = { blocks: rangesWithin(st.blocks, lo, hi), out_of_sync: rangesWithin(st.outOfSync, lo, hi) }
      const fine = rangesWithin(st.fine, lo, hi)
      if (fine.length > 0) {
        const per = meta.blockSize / GRANULE
        doc.fine = fine
        doc.changed = rangesWithin(st.changed, lo * per, hi * per)
      }
      out.set(segmentKey(meta.name, loc, seg), JSON.stringify(doc))
    }
  }
  return out
}

function rangesWithin (set: RangeSet, lo: number, hi: number): Range[] {
  return [...set.within(lo, hi)]
}

function parseJson (text: string, name: string, key: string): unknown {
  try {
    return JSON.parse(text)
  } catch (err) {
    throw corrupt(name, `key ${key} is not valid JSON (${jsonError(err)})`)
  }
}

function decodeRanges (v: unknown, lo: number, hi: number, name: string, key: string): Range[] {
  if (!Array.isArray(v)) throw corrupt(name, `key ${key}: expected a list of ranges`)
  for (const r of v) {
    if (!Array.isArray(r) || r.length !== 2 || !r.every((x) => Number.isSafeInteger(x)) || r[0] < lo || r[1] > hi || r[0] >= r[1]) {
      throw corrupt(name, `key ${key}: ${show(r)} is not a range of blocks within [${lo}, ${hi})`)
    }
  }
  return v as Range[]
}

export function decodeHeader (text: string, name: string): ImageHeader {
  const h = parseJson(text, name, headerKey(name)) as ImageHeader
  if (typeof h !== 'object' || h === null || h.format !== HEADER_FORMAT || h.name !== name ||
    !Array.isArray(h.locations) || !h.locations.every((l) => typeof l === 'string') ||
    !Array.isArray(h.hypervisors) || !h.hypervisors.every((x) => typeof x === 'string') ||
    typeof h.incarnation !== 'string' || typeof h.created !== 'string') {
    throw corrupt(name, 'the header is malformed')
  }
  return h
}

/**
 * The image from its header and its location segments (keys under
 * locPrefix). Segments of locations the header does not list are ignored:
 * they are what an interrupted removal leaves, and the next update drops.
 */
export function decodeImage (header: ImageHeader, segments: Array<{ key: string, value: string }>, revision: number): ImageMeta {
  const name = header.name
  const locations = new Map<string, LocationState>()
  for (const loc of header.locations) locations.set(loc, emptyLocation())
  const per = Number.isSafeInteger(header.block_size / GRANULE) ? header.block_size / GRANULE : 1
  const prefix = locPrefix(name)
  for (const { key, value } of segments) {
    const rest = key.slice(prefix.length)
    const slash = rest.lastIndexOf('/')
    const loc = rest.slice(0, slash)
    const seg = Number(rest.slice(slash + 1))
    const st = locations.get(loc)
    if (st === undefined) continue
    if (slash <= 0 || !Number.isSafeInteger(seg) || seg < 0) throw corrupt(name, `unexpected key ${key}`)
    const doc = parseJson(value, name, key) as SegmentDoc
    const lo = seg * SEGMENT_BLOCKS
    for (const [s, e] of decodeRanges(doc?.blocks, lo, lo + SEGMENT_BLOCKS, name, key)) st.blocks.add(s, e)
    for (const [s, e] of decodeRanges(doc?.out_of_sync, lo, lo + SEGMENT_BLOCKS, name, key)) st.outOfSync.add(s, e)
    for (const [s, e] of decodeRanges(doc?.fine ?? [], lo, lo + SEGMENT_BLOCKS, name, key)) st.fine.add(s, e)
    for (const [s, e] of decodeRanges(doc?.changed ?? [], lo * per, (lo + SEGMENT_BLOCKS) * per, name, key)) st.changed.add(s, e)
  }
  return new ImageMeta({
    name,
    size: header.size,
    blockSize: header.block_size,
    usedSize: header.used_size,
    hypervisors: header.hypervisors,
    locations,
    revision
  })
}
