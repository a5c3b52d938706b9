/**
 * Every command that mounts nothing works on a host without libfuse 2;
 * `ukai server --mount` there is one clear line (exit 8), no stack trace,
 * and starts nothing. Two ways to take FUSE away: a module hook that makes
 * 'fuse-native' unresolvable, and, where the test may make a mount
 * namespace (root, unshare), libfuse.so.2 itself replaced by an empty
 * file there, so the binding's dlopen really fails.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, readdir, readFile, realpath, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { CLI, freePort, run, type RunResult } from './helpers/node-process.js'

const HOOK = resolve('dist/test/helpers/no-fuse-native.js')

/** The libfuse.so.2 the binding links against, from ldd. */
async function libfusePath (): Promise<string | undefined> {
  const dir = resolve('node_modules/fuse-native/prebuilds', `${process.platform}-${process.arch}`)
  const addon = (await readdir(dir).catch(() => [])).find((f) => f.startsWith('node'))
  if (addon === undefined) return undefined
  const r = await run('ldd', [join(dir, addon)]).catch(() => undefined)
  const m = r === undefined ? null : /libfuse\.so\.2 => (\S+)/.exec(r.stdout)
  return m === null ? undefined : await realpath(m[1]!)
}

describe('ukai without FUSE', () => {
  let dir: string
  let config: string
  let lib: string | undefined
  let namespaces = false

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ukai-nofuse-'))
    config = join(dir, 'config.json')
    // The fuse-native engine: what these ways take away (the native engine's own case is the last test).
    await writeFile(config, JSON.stringify({ image_root: 'img', metadata_root: 'meta', control_port: await freePort(), proxy_port: await freePort(), fuse_engine: 'fuse-native' }))
    lib = await libfusePath()
    if (lib !== undefined) {
      const probe = await run('unshare', ['-m', '--propagation', 'private', 'sh', '-c', `mount --bind /dev/null ${lib} && true`]).catch(() => undefined)
      namespaces = probe?.code === 0
    }
  })
  after(async () => { await rm(dir, { recursive: true, force: true }) })

  const ways: Array<{ name: string, ukai: (...args: string[]) => Promise<RunResult>, skip: () => string | false }> = [
    {
      name: "'fuse-native' cannot be resolved",
      ukai: async (...args) => await run(process.execPath, ['--import', HOOK, CLI, '--config', config, ...args]),
      skip: () => false
    },
    {
      name: 'libfuse.so.2 cannot be loaded (dlopen fails)',
      ukai: async (...args) => await run('unshare', ['-m', '--propagation', 'private', 'sh', '-c',
        `mount --bind /dev/null "$0" && exec "$@"`, lib!, process.execPath, CLI, '--config', config, ...args]),
      skip: () => namespaces ? false : 'needs root and unshare -m to hide libfuse.so.2'
    }
  ]

  for (const way of ways) {
    test(`${way.name}: commands that mount nothing work`, async (t) => {
      const why = way.skip()
      if (why !== false) return t.skip(why)
      let r = await way.ukai('--help')
      assert.equal(r.code, 0, r.stderr)
      assert.match(r.stdout, /Usage: ukai/)
      r = await way.ukai('version')
      assert.equal(r.code, 0, r.stderr)
      assert.match(r.stdout, /^ukai \d+\.\d+\.\d+/)
      r = await way.ukai('image', 'list', '--help')
      assert.equal(r.code, 0, r.stderr)
      assert.match(r.stdout, /Usage: ukai image list/)
      r = await way.ukai('image', 'create', 'nofuse', '-s', '4M')
      assert.equal(r.code, 0, r.stderr)
      r = await way.ukai('image', 'list', '--json')
      assert.equal(r.code, 0, r.stderr)
      assert.ok(JSON.parse(r.stdout).some((s: { name: string }) => s.name === 'nofuse'))
      assert.equal((await way.ukai('image', 'destroy', 'nofuse')).code, 0)
    })

    test(`${way.name}: server --mount fails with one clear line and starts nothing`, async (t) => {
      const why = way.skip()
      if (why !== false) return t.skip(why)
      const before = (await readdir(dir)).sort()
      const r = await way.ukai('server', '--mount', join(dir, 'mnt'))
      assert.equal(r.code, 8, r.stderr)
      assert.match(r.stderr, /^ukai: FUSE is not available: libfuse\.so\.2 .*install libfuse2/)
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr)
      assert.doesNotMatch(r.stderr, /\n\s+at /)
      assert.equal(r.stdout, '', 'no ready line')
      // Refused before the node touched anything: not even the mount point was made.
      assert.deepEqual((await readdir(dir)).sort(), before)
    })
  }

  test('fuse_engine "native" without its addon: server --mount fails with one clear line and starts nothing', async (t) => {
    if (!namespaces) return t.skip('needs root and unshare -m to hide the addon')
    const addon = resolve('build/Release/ukai_fuse.node')
    const native = join(dir, 'native.json')
    await writeFile(native, JSON.stringify({ ...JSON.parse(await readFile(config, 'utf8')), fuse_engine: 'native' }))
    const before = (await readdir(dir)).sort()
    const r = await run('unshare', ['-m', '--propagation', 'private', 'sh', '-c',
      `mount --bind /dev/null "$0" && exec "$@"`, addon, process.execPath, CLI, '--config', native, 'server', '--mount', join(dir, 'mnt')])
    assert.equal(r.code, 8, r.stderr)
    assert.match(r.stderr, /^ukai: FUSE is not available: the native FUSE engine cannot be loaded .*libfuse3-dev.*"fuse_engine": "fuse-native"/)
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr)
    assert.deepEqual((await readdir(dir)).sort(), before)
  })
})
