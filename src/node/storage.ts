/**
 * What this node's image_root holds (`ukai nodes storage`, GET /v1/storage):
 * per image placed here, the space its block files take (allocated
 * blocks, st_blocks * 512, so holes cost nothing) and how many there are;
 * and what nobody needs any more: directories of images the metadata no
 * longer places on this node, of destroyed images, of an earlier image of
 * the same name, and anything else under image_root.
 *
 * The metadata is read from the store, not from the node's cache, so a
 * change made a moment ago is seen. A directory that is an orphan may
 * still be on its way out (a reclaim waits RECLAIM_DELAY_MS).
 */
import type { Dirent } from 'node:fs'
import { lstat, readdir } from 'node:fs/promises'
import { join } from 'node:path'
import { INCARNATION_FILE } from '../blockstore/block-store.js'
import { blockNameParser } from '../blockstore/block-name.js'
import { validateImageName } from '../metadata/names.js'
import type { UkaiNode } from './node.js'

export interface ReplicaUsage {
  image: string
  /** Block files in the directory. */
  files: number
  /** Bytes allocated on disk by the block files (st_blocks * 512). */
  bytes: number
  /** Blocks the metadata places on this node. */
  placed_blocks: number
  /** True when the image is placed here but its directory is missing (the replica is lost). */
  missing?: boolean
}

export interface Orphan {
  /** The entry's name under image_root. */
  name: string
  /** Why nothing needs it. */
  reason: string
  /** Files under it (the entry itself when it is a file). */
  files: number
  /** Bytes allocated on disk by all of it. */
  bytes: number
}

export interface NodeStorage {
  id: string
  image_root: string
  images: ReplicaUsage[]
  orphans: Orphan[]
}

export async function storageReport (node: UkaiNode): Promise<NodeStorage> {
  const root = node.config.image_root
  const isBlock = blockNameParser(node.config.blockname_format)
  let entries: Dirent[]
  try {
    entries = await readdir(root, { withFileTypes: true })
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
    entries = []
  }
  const images: ReplicaUsage[] = []
  const orphans: Orphan[] = []
  const seen = new Set<string>()
  for (const e of entries.sort((a, b) => a.name < b.name ? -1 : 1)) {
    const path = join(root, e.name)
    if (!e.isDirectory()) {
      orphans.push({ name: e.name, reason: 'not an image directory', ...await usage(path) })
      continue
    }
    let valid = true
    try { validateImageName(e.name) } catch { valid = false }
    if (!valid) {
      orphans.push({ name: e.name, reason: 'not an image name', ...await usage(path) })
      continue
    }
    const st = await node.store.state(e.name)
    const marker = await node.blocks.incarnationOf(e.name).catch(() => undefined)
    if (st === undefined) {
      orphans.push({
        name: e.name,
        reason: marker !== undefined && marker !== null ? 'its image was destroyed' : 'no image of that name',
        ...await usage(path)
      })
      continue
    }
    const placed = node.placedHere(st.meta)
    if (placed === undefined) {
      orphans.push({ name: e.name, reason: 'its image places no block on this node', ...await usage(path) })
      continue
    }
    if (marker !== undefined && marker !== null && marker.id !== st.incarnation) {
      orphans.push({ name: e.name, reason: 'files of an earlier image of that name', ...await usage(path) })
      continue
    }
    seen.add(e.name)
    images.push({ image: e.name, ...await blockUsage(path, isBlock), placed_blocks: placed.blocks.size })
  }
  // Placed here, without a directory: the replica is lost.
  for (const name of await node.store.list()) {
    if (seen.has(name)) continue
    const meta = await node.store.get(name).catch(() => undefined)
    const placed = meta === undefined ? undefined : node.placedHere(meta)
    if (placed !== undefined && !await node.blocks.has(name)) {
      images.push({ image: name, files: 0, bytes: 0, placed_blocks: placed.blocks.size, missing: true })
    }
  }
  images.sort((a, b) => a.image < b.image ? -1 : 1)
  return { id: node.config.id, image_root: root, images, orphans }
}

/** The block files of an image directory: how many, and the bytes they take on disk. */
async function blockUsage (dir: string, isBlock: (name: string) => number | undefined): Promise<{ files: number, bytes: number }> {
  let files = 0
  let bytes = 0
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    if (name === INCARNATION_FILE || isBlock(name) === undefined) continue
    const st = await lstat(join(dir, name)).catch(() => undefined)
    if (st === undefined || !st.isFile()) continue
    files++
    bytes += st.blocks * 512
  }
  return { files, bytes }
}

/** Files under `path` and the bytes they take on disk (symbolic links are not followed). */
async function usage (path: string): Promise<{ files: number, bytes: number }> {
  const st = await lstat(path).catch(() => undefined)
  if (st === undefined) return { files: 0, bytes: 0 }
  if (!st.isDirectory()) return { files: 1, bytes: st.blocks * 512 }
  let files = 0
  let bytes = 0
  for (const name of await readdir(path).catch(() => [] as string[])) {
    const u = await usage(join(path, name))
    files += u.files
    bytes += u.bytes
  }
  return { files, bytes }
}
