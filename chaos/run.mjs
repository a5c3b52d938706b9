#!/usr/bin/env node
// `npm run chaos [-- --cycles N --seed S ...]`: the chaos run (not part of
// `npm test`). The harness is TypeScript under test/chaos/, compiled by the
// project's tsc into dist/test/chaos/; this entry compiles it first when the
// compiled harness is missing or older than its sources (`--no-build` skips
// that), then runs it. See test/chaos/harness.ts and chaos/results/latest.md.
import { spawnSync } from 'node:child_process'
import { existsSync, readdirSync, statSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const argv = process.argv.slice(2)
const noBuild = argv.includes('--no-build')
const args = argv.filter((a) => a !== '--no-build')

const compiled = join(root, 'dist/test/chaos/harness.js')
const sources = readdirSync(join(root, 'test/chaos')).filter((f) => f.endsWith('.ts')).map((f) => join(root, 'test/chaos', f))
const stale = !existsSync(compiled) || sources.some((s) => {
  const js = join(root, 'dist/test/chaos', s.split('/').pop().replace(/\.ts$/, '.js'))
  return !existsSync(js) || statSync(js).mtimeMs < statSync(s).mtimeMs
})
if (stale && !noBuild) {
  process.stdout.write('chaos: compiling (npx tsc -p .)\n')
  // Errors in files other than the harness do not stop it: tsc still emits.
  spawnSync('npx', ['tsc', '-p', '.'], { cwd: root, stdio: 'inherit' })
}
if (!existsSync(compiled)) {
  process.stderr.write(`chaos: ${compiled} is missing; run npx tsc -p . first\n`)
  process.exit(2)
}
const { main } = await import(compiled)
process.exit(await main(args, root))
