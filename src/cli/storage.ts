/** `ukai nodes storage`: what each node's image_root holds, as GET /v1/nodes/storage reports it. */
import type { NodeStorageStatus } from '../node/directory.js'
import { formatSize } from '../util/size.js'

/** The report as text: per node, its images' block files, then its orphans. */
export function formatStorage (nodes: NodeStorageStatus[]): string {
  if (nodes.length === 0) return 'no node has registered'
  const out: string[] = []
  for (const n of nodes) {
    if (!n.reachable) {
      out.push(`node ${n.id}: not reachable${n.error !== undefined ? ` (${n.error})` : ''}`, '')
      continue
    }
    const images = n.images ?? []
    const orphans = n.orphans ?? []
    const sum = (xs: Array<{ bytes: number }>): number => xs.reduce((a, x) => a + x.bytes, 0)
    out.push(`node ${n.id}: ${n.image_root ?? '?'}, ${formatSize(sum(images))} in ${images.length} image(s)` +
      (orphans.length > 0 ? `, ${formatSize(sum(orphans))} orphaned in ${orphans.length} entr${orphans.length === 1 ? 'y' : 'ies'}` : ''))
    const rows: string[][] = [['  IMAGE', 'FILES', 'ALLOCATED', 'PLACED BLOCKS', '']]
    for (const i of images) rows.push([`  ${i.image}`, String(i.files), formatSize(i.bytes), String(i.placed_blocks), i.missing === true ? 'directory missing: replica lost' : ''])
    for (const o of orphans) rows.push([`  ${o.name}`, String(o.files), formatSize(o.bytes), '-', `orphan: ${o.reason}`])
    if (rows.length > 1) out.push(table(rows))
    out.push('')
  }
  return out.join('\n').trimEnd()
}

function table (rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)))
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n')
}
