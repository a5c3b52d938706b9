/**
 * A short, fixed-seed slice of every fuzz target (test/fuzz/, run in full
 * by `npm run fuzz`, fuzz/run.mjs): the same inputs every time, a few
 * seconds in all. A failure names the finding, its minimal input and how
 * to replay it; the cases also have to reach the code's success paths,
 * so a target that only ever sees garbage is noticed.
 */
import { describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { runShardInChild } from './fuzz/child.js'
import { runShard, type AnyTarget, type FindingRecord } from './fuzz/harness.js'
import { targets } from './fuzz/targets/index.js'
import { stats as controlStats, uncoveredRoutes } from './fuzz/targets/control-api.js'
import { stats as importStats } from './fuzz/targets/metadata-import.js'
import { stats as clientStats } from './fuzz/targets/peer-client.js'

/** The slice's seed: changing it changes every input of `npm test`'s slice. */
const SEED = 20_240_601

function describeFinding (f: FindingRecord): string {
  const m = f.minimized !== undefined && 'input' in f.minimized ? f.minimized : undefined
  return [
    `${f.kind} (${f.count} case(s)): ${f.message}`,
    `  input: ${(m?.input ?? f.input).slice(0, 1500)}`,
    `  replay: node fuzz/run.mjs --replay ${f.target} --seed ${f.seed} --path ${m?.path ?? f.path}`,
    `  ${(m?.stack ?? f.stack).split('\n').slice(0, 12).join('\n  ')}`
  ].join('\n')
}

async function slice (t: AnyTarget): Promise<void> {
  // A target whose case may block the event loop for good runs in a child process with its watchdog.
  const r = t.isolate === true ? await runShardInChild(t, SEED, t.sliceCases) : await runShard(t, { seed: SEED, cases: t.sliceCases, minimize: 1, minimizeMs: 5000 })
  if (r.findings.length > 0) {
    assert.fail(`${t.name}: ${r.crashes} crash(es), ${r.hangs} hang(s), ${r.violations} violation(s) in ${r.cases} cases (seed ${SEED})\n\n${r.findings.map(describeFinding).join('\n\n')}`)
  }
  assert.equal(r.cases, t.sliceCases)
}

describe('fuzz slice (fixed seed)', { timeout: 120_000 }, () => {
  for (const t of targets) {
    test(`${t.name}: ${t.sliceCases} cases, no crash, hang or contract violation`, async () => { await slice(t) })
  }

  test("the control-api target's ROUTES names every route of the server's tables, and nothing else", () => {
    assert.deepEqual(uncoveredRoutes(), { missing: [], stale: [] })
  })

  test('the cases reached the success paths, not only the refusals', () => {
    assert.ok(clientStats.connected > 0 && clientStats.opsOk > 0, `peer-client: ${JSON.stringify(clientStats)}`)
    assert.ok(controlStats.ok > 0 && controlStats.refused > 0, `control-api: ${JSON.stringify(controlStats)}`)
    assert.ok(importStats.accepted > 0 && importStats.refused > 0, `metadata-import: ${JSON.stringify(importStats)}`)
  })
})
