import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Writable } from 'node:stream'
import { duration, progressReporter } from './progress.js'

/** A stream that keeps what is written to it; isTTY as given. */
function sink (isTTY = false): Writable & { text: string, isTTY: boolean } {
  const w = new Writable({ write (chunk: Buffer, _enc, cb) { w.text += chunk.toString(); cb() } }) as Writable & { text: string, isTTY: boolean }
  w.text = ''
  w.isTTY = isTTY
  return w
}

test('--json: one progress object per update, then the result; nothing on stderr', () => {
  const out = sink()
  const err = sink()
  const p = progressReporter({ label: 'sync x', json: true, stdout: out, stderr: err })
  p.start(4, 4096)
  for (let i = 1; i <= 4; i++) p.update({ done: i, bytes: i * 1024 })
  p.end({ blocks: 4, done: 4 })
  const lines = out.text.trim().split('\n').map((l) => JSON.parse(l))
  assert.equal(lines.length, 6)
  assert.deepEqual(lines.slice(0, 5).map((l) => [l.progress.done, l.progress.total, l.progress.bytes, l.progress.total_bytes]),
    [[0, 4, 0, 4096], [1, 4, 1024, 4096], [2, 4, 2048, 4096], [3, 4, 3072, 4096], [4, 4, 4096, 4096]])
  assert.equal(lines[4].progress.eta_s, 0)
  assert.ok(lines.slice(0, 5).every((l) => typeof l.progress.rate === 'number' && typeof l.progress.elapsed_s === 'number'))
  assert.deepEqual(lines[5], { result: { blocks: 4, done: 4 } })
  assert.equal(err.text, '')
})

test('--json: a failure is an error line', () => {
  const out = sink()
  const p = progressReporter({ label: 'sync x', json: true, stdout: out, stderr: sink() })
  p.start(2)
  p.fail(new Error('gone'))
  assert.deepEqual(JSON.parse(out.text.trim().split('\n')[1]!), { error: { code: 'UKAI_ERR_INTERNAL', message: 'gone' } })
})

test('not a terminal: a line at start, at each tenth, and at the end', () => {
  const err = sink(false)
  const out = sink()
  const p = progressReporter({ label: 'sync x', stdout: out, stderr: err, plainIntervalMs: 3_600_000 })
  p.start(100)
  for (let i = 1; i <= 100; i++) p.update({ done: i, bytes: i * 65536 })
  p.end({})
  const lines = err.text.trim().split('\n')
  assert.equal(lines.length, 1 + 9 + 1, err.text)
  assert.match(lines[0]!, /^sync x: 0\/100 blocks, 0 B, 0 B\/s, ETA \?$/)
  assert.match(lines[1]!, /^sync x: 10\/100 blocks, 640 KiB, .*\/s, ETA /)
  assert.match(lines[10]!, /^sync x: done, 100\/100 blocks, 6.3 MiB in \d+ s$/)
  assert.equal(out.text, '')
})

test('durations read as a person says them', () => {
  assert.equal(duration(undefined), '?')
  assert.equal(duration(Infinity), '?')
  assert.equal(duration(14.4), '14 s')
  assert.equal(duration(185), '3 min 05 s')
  assert.equal(duration(7260), '2 h 01 min')
})

test('unit bytes (import, export): sizes of the image gone through, and the data moved', () => {
  const err = sink(false)
  const p = progressReporter({ label: 'import x', stdout: sink(), stderr: err, unit: 'bytes' })
  p.start(4 * 2 ** 30)
  p.update({ done: 2 ** 30, bytes: 100 * 2 ** 20 })
  p.update({ done: 4 * 2 ** 30, bytes: 200 * 2 ** 20 })
  p.end({})
  const lines = err.text.trim().split('\n')
  assert.match(lines[1]!, /^import x: 1 GiB of 4 GiB, 100 MiB of data, .*\/s, ETA /)
  assert.match(lines[lines.length - 1]!, /^import x: done, 4 GiB of 4 GiB, 200 MiB of data in /)
  assert.ok(!err.text.includes('blocks'), err.text)
})
