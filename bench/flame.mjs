#!/usr/bin/env node
/**
 * Flame graphs and self-time tables from V8 CPU profiles (`node
 * --cpu-prof` writes them as .cpuprofile JSON). No dependencies: the
 * profile's call tree is summed bottom-up and drawn as an SVG, one box per
 * frame, width proportional to the samples under it.
 *
 *   node bench/flame.mjs PROFILE.cpuprofile [OUT.svg]
 *
 * prints the heaviest functions by self time and, with OUT.svg, writes
 * the flame graph.
 */
import { readFile, writeFile } from 'node:fs/promises'
import { basename } from 'node:path'
import { fileURLToPath } from 'node:url'

/**
 * @typedef {{ id: number, callFrame: { functionName: string, url: string, lineNumber: number }, hitCount?: number, children?: number[] }} ProfileNode
 * @typedef {{ name: string, file: string, self: number, total: number, children: Frame[] }} Frame
 */

/** Where a frame's code lives, shortened: `src/volume/volume.ts`, `node:fs`, `(native)`. */
export function shortFile (url) {
  if (url === '' || url === undefined) return ''
  const m = /\/dist\/(src\/.*)\.js$/.exec(url)
  if (m !== null) return `${m[1]}.ts`
  const nm = /node_modules\/(.*)$/.exec(url)
  if (nm !== null) return nm[1]
  return url.replace(/^file:\/\//, '')
}

/**
 * The profile as a tree of frames with self and total sample counts.
 * @returns {{ root: Frame, samples: number, intervalUs: number }}
 */
export function buildTree (profile) {
  /** @type {Map<number, ProfileNode>} */
  const byId = new Map(profile.nodes.map((n) => [n.id, n]))
  // Sample counts from `samples` when present (hitCount can be absent).
  const hits = new Map()
  if (Array.isArray(profile.samples) && profile.samples.length > 0) {
    for (const id of profile.samples) hits.set(id, (hits.get(id) ?? 0) + 1)
  } else {
    for (const n of profile.nodes) hits.set(n.id, n.hitCount ?? 0)
  }
  const convert = (n, parent) => {
    const name = n.callFrame.functionName === '' ? '(anonymous)' : n.callFrame.functionName
    let file = shortFile(n.callFrame.url)
    const line = n.callFrame.lineNumber >= 0 && file !== '' ? `:${n.callFrame.lineNumber + 1}` : ''
    // A native binding has no file; its caller says which one it is
    // (fs's writeBuffer and a socket's writeBuffer share the name).
    if (file === '' && !name.startsWith('(') && parent !== undefined) file = `native, from ${parent.name} ${parent.file}`.trim()
    const f = { name, file: file + line, self: hits.get(n.id) ?? 0, total: 0, children: [] }
    for (const c of n.children ?? []) f.children.push(convert(byId.get(c), f))
    f.total = f.self + f.children.reduce((s, c) => s + c.total, 0)
    f.children.sort((a, b) => b.total - a.total)
    return f
  }
  const root = convert(profile.nodes[0])
  const samples = root.total
  const durationUs = (profile.endTime ?? 0) - (profile.startTime ?? 0)
  return { root, samples, intervalUs: samples > 0 ? durationUs / samples : 0 }
}

/** Self time per function (name + file) and per file, heaviest first. */
export function selfTimes (root) {
  const fn = new Map()
  const file = new Map()
  const walk = (f) => {
    if (f.self > 0) {
      const k = `${f.name} ${f.file}`
      fn.set(k, { name: f.name, file: f.file, self: (fn.get(k)?.self ?? 0) + f.self })
      const fk = f.file.startsWith('native, from ') ? `(native, from ${(f.file.slice(13).split(' ')[1] ?? '?').replace(/:\d+$/, '')})` : f.file.replace(/:\d+$/, '') || f.name
      file.set(fk, (file.get(fk) ?? 0) + f.self)
    }
    for (const c of f.children) walk(c)
  }
  walk(root)
  return {
    functions: [...fn.values()].sort((a, b) => b.self - a.self),
    files: [...file.entries()].map(([f, self]) => ({ file: f, self })).sort((a, b) => b.self - a.self)
  }
}

const esc = (s) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;')

function colour (f) {
  if (f.name.startsWith('(')) return '#b0b0b0' // (idle), (program), (garbage collector)
  if (f.file.startsWith('src/')) return '#e8743b' // UKAI's own code
  if (f.file.startsWith('node:')) return '#5b8fd6' // Node's library
  if (f.file.includes('fuse-native')) return '#9b6bd6'
  return '#d6b85b' // natives, V8 builtins
}

/**
 * The flame graph as an SVG (root at the bottom). Frames narrower than
 * half a pixel are left out.
 */
export function flameSvg (tree, title) {
  const width = 1200
  const rowH = 16
  const { root } = tree
  let depth = 0
  const boxes = []
  const place = (f, x, level) => {
    const w = root.total === 0 ? 0 : f.total / root.total * width
    if (w < 0.5) return
    depth = Math.max(depth, level)
    boxes.push({ f, x, w, level })
    let cx = x
    for (const c of f.children) {
      place(c, cx, level + 1)
      cx += root.total === 0 ? 0 : c.total / root.total * width
    }
  }
  place(root, 0, 0)
  const top = 40
  const height = top + (depth + 1) * rowH + 10
  const y = (level) => height - 10 - (level + 1) * rowH
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="monospace" font-size="11">`,
    `<rect width="${width}" height="${height}" fill="#fdfdf8"/>`,
    `<text x="6" y="18" font-size="14" font-family="sans-serif">${esc(title)}</text>`,
    `<text x="6" y="34" font-size="11" font-family="sans-serif" fill="#555">${tree.samples} samples; width = share of samples; orange = UKAI (src/), blue = Node library, purple = fuse-native, grey = idle/GC/program. Hover for details.</text>`
  ]
  for (const { f, x, w, level } of boxes) {
    const pct = (f.total / root.total * 100).toFixed(2)
    const label = `${f.name}${f.file !== '' ? ` ${f.file}` : ''}`
    out.push(`<g><title>${esc(label)}: ${pct}% (${f.total} samples, ${f.self} self)</title>` +
      `<rect x="${x.toFixed(2)}" y="${y(level)}" width="${Math.max(0, w - 0.3).toFixed(2)}" height="${rowH - 1}" fill="${colour(f)}" rx="1"/>` +
      (w > 40 ? `<text x="${(x + 3).toFixed(2)}" y="${y(level) + 11}">${esc(label.slice(0, Math.floor((w - 6) / 6.6)))}</text>` : '') + '</g>')
  }
  out.push('</svg>')
  return out.join('\n') + '\n'
}

/** Reads a .cpuprofile; optionally writes its flame graph; returns the tree and self times. */
export async function analyseProfile (path, svgPath, title) {
  const profile = JSON.parse(await readFile(path, 'utf8'))
  const tree = buildTree(profile)
  if (svgPath !== undefined) await writeFile(svgPath, flameSvg(tree, title ?? basename(path)))
  return { tree, ...selfTimes(tree.root) }
}

async function main (argv) {
  const [input, svg] = argv
  if (input === undefined) {
    process.stderr.write('usage: node bench/flame.mjs PROFILE.cpuprofile [OUT.svg]\n')
    return 2
  }
  const { tree, functions, files } = await analyseProfile(input, svg)
  const pct = (n) => `${(n / tree.samples * 100).toFixed(1)}%`.padStart(6)
  process.stdout.write(`${tree.samples} samples\n\nself time by function:\n`)
  for (const f of functions.slice(0, 25)) process.stdout.write(`${pct(f.self)}  ${f.name}  ${f.file}\n`)
  process.stdout.write('\nself time by file:\n')
  for (const f of files.slice(0, 15)) process.stdout.write(`${pct(f.self)}  ${f.file}\n`)
  return 0
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  process.exitCode = await main(process.argv.slice(2))
}
