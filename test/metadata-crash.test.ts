/**
 * Crash safety of the file metadata store: a child process updates one
 * image as fast as it can and is killed with SIGKILL at random moments.
 * After every kill the image must still read back valid (old or new,
 * never torn), no acknowledged update may be lost, and the only files
 * left are the image's own, temp files, which the next open removes, and
 * the killed writer's lock file, which the next update takes over.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { readdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { FileMetadataStore } from '../src/metadata/file-store.js'
import { ImageMeta } from '../src/metadata/image.js'
import { tmpDir } from './helpers/tmp.js'
import { prng } from './helpers/assertions.js'

const PORT = 22222
const ROUNDS = 20
const NAME = 'crash'
// dist/test/ -> dist/src/metadata/file-store.js, the compiled module under test.
const FILE_STORE = fileURLToPath(new URL('../src/metadata/file-store.js', import.meta.url))
const TEMP = /^\..*\.tmp$/
const LOCK = `.${NAME}.lock`

// The child: update the image in a tight loop, printing each acknowledged
// generation. Each update changes the file's length (hypervisors, out-of-sync
// ranges), so a torn or truncated write could not parse.
const CHILD = `
import { FileMetadataStore } from ${JSON.stringify(pathToFileURL(FILE_STORE).href)}
const [root, name] = process.argv.slice(2)
const store = await FileMetadataStore.open(root, ${PORT})
for (let i = 0; ; i++) {
  const meta = await store.update(name, (m) => {
    const b = (i * 7919) % m.blockCount
    m.setSync('10.0.0.2', b, b + 1, i % 3 === 0)
    m.hypervisors = Array.from({ length: i % 17 }, (_, k) => '10.9.0.' + k)
    m.usedSize = (i * 4096) % m.size
    return m
  })
  process.stdout.write(meta.generation + '\\n')
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

  const setup = await FileMetadataStore.open(root, PORT)
  const meta = new ImageMeta({ name: NAME, size: 2 ** 30, blockSize: 2 ** 16, usedSize: 0 })
  meta.addLocation('10.0.0.1', 0, meta.blockCount, true)
  meta.addLocation('10.0.0.2', 0, meta.blockCount, true)
  await setup.create(meta)
  await setup.close()

  let generation = 1
  let withTemp = 0
  for (let round = 0; round < ROUNDS; round++) {
    const run = await runAndKill(script, root, 1 + Math.floor(random() * 40), Math.floor(random() * 20))
    assert.equal(run.signal, 'SIGKILL', `child ended by itself (code ${run.code}): ${run.stderr}`)
    assert.ok(run.acked > 0, `round ${round}: the child acknowledged no update`)

    // Only the image file, temp files and the lock of the killed writer may be there.
    const files = await readdir(root)
    assert.ok(files.includes(`${NAME}.json`), `round ${round}: ${NAME}.json is gone (${files.join(', ')})`)
    for (const f of files) {
      assert.ok(f === `${NAME}.json` || f === LOCK || TEMP.test(f), `round ${round}: unexpected file ${f}`)
    }
    if (files.some((f) => TEMP.test(f))) withTemp++

    const store = await FileMetadataStore.open(root, PORT)
    try {
      const left = (await readdir(root)).filter((f) => f !== LOCK)
      assert.deepEqual(left, [`${NAME}.json`], `round ${round}: open did not remove temp files`)
      const got = await store.get(NAME)
      assert.ok(got !== undefined, `round ${round}: image missing`)
      assert.equal(got.name, NAME)
      assert.ok(got.generation >= run.acked, `round ${round}: generation ${got.generation} < acknowledged ${run.acked}`)
      assert.ok(got.generation >= generation, `round ${round}: generation went back from ${generation} to ${got.generation}`)
      generation = got.generation
      assert.deepEqual(await store.list(), [NAME])
      // A lock left by the dead writer does not block the next one.
      generation = (await store.update(NAME, (m) => m)).generation
      assert.equal(generation, got.generation + 1)
      assert.deepEqual(await readdir(root), [`${NAME}.json`], `round ${round}: files left after an update`)
    } finally {
      await store.close()
    }
  }
  t.diagnostic(`final generation ${generation}; ${withTemp} of ${ROUNDS} kills left a temp file`)
})
