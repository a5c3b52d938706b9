// Runs every compiled test file (dist/**/*.test.js) with node's test runner.
// Files are listed here rather than by a glob so the runner behaves the same
// on every Node.js 20 release.
import { readdirSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { spawnSync } from 'node:child_process'

function find (dir, out = []) {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name)
    if (statSync(p).isDirectory()) find(p, out)
    else if (name.endsWith('.test.js')) out.push(p)
  }
  return out
}

const filter = process.argv.slice(2)
let files = find('dist').sort()
if (filter.length > 0) files = files.filter((f) => filter.some((s) => f.includes(s)))
if (files.length === 0) {
  console.error('run-tests: no test files found under dist/ (run npm run build)')
  process.exit(1)
}
const r = spawnSync(process.execPath, ['--test', '--test-concurrency=1', ...files], { stdio: 'inherit' })
process.exit(r.status ?? 1)
