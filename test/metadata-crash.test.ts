/**
 * Crash safety of the embedded metadata store: a child process updates
 * one image as fast as it can and is killed with SIGKILL at random
 * moments. After every kill the image must still read back valid (old or
 * new, never torn), no acknowledged update may be lost, and the only
 * files left are the image's shard and temp files of the killed writer,
 * which the next open removes. A killed writer leaves no lock behind (the
 * lock is a socket the kernel closes).
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { readdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { FileCore } from '../src/metadata/file-core.js'
import { ImageMeta } from '../src/metadata/image.js'
import { MetadataStore } from '../src/metadata/store.js'
import { tmpDir } from './helpers/tmp.js'
import { prng } from './helpers/assertions.js'

const PORT = 22222
const ROUNDS = 20
const NAME = 'crash'
// dist/test/ -> dist/src/metadata/, the compiled modules under test.
const MODULE = (f: string): string => JSON.stringify(pathToFileURL(fileURLToPath(new URL(`../src/metadata/${f}`, import.meta.url))).href)
const SHARD = `${encodeURIComponent(`images/${NAME}`)}.json`
const TEMP = /^\..*\.tmp$/

// The child: update the image in a tight loop, printing each acknowledged
// count (kept in used_size). Each update changes the file's length
// (hypervisors, out-of-sync ranges), so a torn or truncated write could
// not parse.
const CHILD = `
import { FileCore } from ${MODULE('file-core.js')}
import { MetadataStore } from ${MODULE('store.js')}
const [root, name] = process.argv.slice(2)
const store = new MetadataStore(await FileCore.open(root), ${PORT})
const start = (await store.require(name)).usedSize
for (let i = start + 1; ; i++) {
  await store.update(name, (m) => {
    const b = (i * 7919) % m.blockCount
    m.setSync('10.0.0.2', b, b + 1, i % 3 === 0)
    m.hypervisors = Array.from({ length: i % 17 }, (_, k) => '10.9.0.' + k)
    m.usedSize = i
    return m
  })
  process.stdout.write(i + '\\n')
}
`


interface Run { acked: number, signal: NodeJS.Signals | null, code: number | null, stderr: string }

/** Starts the child, kills it with SIGKILL once `killAfter` acknowledgements and `delayMs` have passed. */
async function runAndKill (script: string, root: string, killAfter: number, delayMs: number): Promise<Run> {
  const child = spawn(process.execPath, [script, root, NAME], { stdio: ['ignore', 'pipe', 'pipe'] })
  let acked = 0
  let seen = 0
  let buffered = ''
  let stderr = ''
  let killing = false
  child.stderr.setEncoding('utf8').on('data', (d: string) => { stderr += d })
  child.stdout.setEncoding('utf8').on('data', (d: string) => {
    buffered += d
    const lines = buffered.split('\n')
    buffered = lines.pop()!
    for (const l of lines) {
      acked = Math.max(acked, Number(l))
      seen++
    }
    if (!killing && seen >= killAfter) {
      killing = true
      // The delay only picks a random moment inside the update loop; nothing is asserted about time.
      setTimeout(() => child.kill('SIGKILL'), delayMs)
    }
  })
  return await new Promise<Run>((resolve, reject) => {
    child.on('error', reject)
    child.on('close', (code, signal) => resolve({ acked, signal, code, stderr }))
  })
}

test('SIGKILL at random moments never loses or tears the image metadata', { timeout: 120_000 }, async (t) => {
  const seed = Number(process.env.UKAI_TEST_SEED ?? Date.now() % 2 ** 31)
  t.diagnostic(`seed ${seed} (set UKAI_TEST_SEED to repeat)`)
  const random = prng(seed)
  const dir = await tmpDir(t, 'ukai-crash-')
  const root = join(dir, 'metadata')
  const script = join(dir, 'child.mjs')
  await writeFile(script, CHILD)

  const setup = new MetadataStore(await FileCore.open(root), PORT)
  const meta = new ImageMeta({ name: NAME, size: 2 ** 30, blockSize: 2 ** 16, usedSize: 0 })
  meta.addLocation('10.0.0.1', 0, meta.blockCount, true)
  meta.addLocation('10.0.0.2', 0, meta.blockCount, true)
  await setup.create(meta)
  await setup.close()

  const shards = join(root, 'shards')
  let count = 0
  let withTemp = 0
  for (let round = 0; round < ROUNDS; round++) {
    const run = await runAndKill(script, root, 1 + Math.floor(random() * 40), Math.floor(random() * 20))
    assert.equal(run.signal, 'SIGKILL', `child ended by itself (code ${run.code}): ${run.stderr}`)
    assert.ok(run.acked > 0, `round ${round}: the child acknowledged no update`)

    // Only the image's shard and temp files of the killed writer may be there.
    const files = await readdir(shards)
    assert.ok(files.includes(SHARD), `round ${round}: ${SHARD} is gone (${files.join(', ')})`)
    for (const f of files) assert.ok(f === SHARD || TEMP.test(f), `round ${round}: unexpected file ${f}`)
    if (files.some((f) => TEMP.test(f))) withTemp++

    const store = new MetadataStore(await FileCore.open(root), PORT)
    try {
      assert.deepEqual(await readdir(shards), [SHARD], `round ${round}: open did not remove the dead writer's temp files`)
      const got = await store.get(NAME)
      assert.ok(got !== undefined, `round ${round}: image missing`)
      assert.equal(got.name, NAME)
      assert.ok(got.usedSize >= run.acked, `round ${round}: count ${got.usedSize} < acknowledged ${run.acked}`)
      assert.ok(got.usedSize >= count, `round ${round}: count went back from ${count} to ${got.usedSize}`)
      count = got.usedSize
      assert.deepEqual(await store.list(), [NAME])
      // Nothing of the dead writer blocks the next one.
      count = (await store.update(NAME, (m) => { m.usedSize++; return m })).usedSize
      assert.deepEqual(await readdir(shards), [SHARD], `round ${round}: files left after an update`)
    } finally {
      await store.close()
    }
  }
  t.diagnostic(`final count ${count}; ${withTemp} of ${ROUNDS} kills left a temp file`)
})
