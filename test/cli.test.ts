/**
 * The `ukai` CLI as an operator uses it, with no node running (the
 * commands then act on the stores directly), plus its error exits.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { CLI, freePort, run } from './helpers/node-process.js'

describe('ukai CLI', () => {
  let dir: string
  let config: string
  const ukai = async (...args: string[]): ReturnType<typeof run> => await run(process.execPath, [CLI, '--config', config, ...args])

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ukai-cli-'))
    config = join(dir, 'config.json')
    // Ports nobody listens on: the CLI works offline.
    await writeFile(config, JSON.stringify({ image_root: 'img', metadata_root: 'meta', control_port: await freePort(), proxy_port: 22222 }))
  })
  after(async () => { await rm(dir, { recursive: true, force: true }) })

  test('image create, list, info and destroy', async () => {
    let r = await ukai('image', 'create', 'vm1', '-s', '8G', '-b', '50M', '-l', '127.0.0.1:22222', '-l', '10.0.0.2', '-h', 'hv1', '-h', 'hv2')
    assert.equal(r.code, 0, r.stderr)
    assert.match(r.stdout, /created image 'vm1': 8 GiB in 164 blocks of 50 MiB/)
    r = await ukai('image', 'list', '--json')
    const list = JSON.parse(r.stdout)
    assert.deepEqual(list.map((s: { name: string }) => s.name), ['vm1'])
    assert.deepEqual(list[0].locations, ['127.0.0.1:22222', '10.0.0.2'])
    assert.deepEqual(list[0].hypervisors, ['hv1', 'hv2'])
    r = await ukai('image', 'info', 'vm1')
    assert.match(r.stdout, /block size: +50 MiB \(164 blocks\)/)
    assert.match(r.stdout, /10\.0\.0\.2 +blocks 0-163 +out of sync -/)
    r = await ukai('image', 'info', 'vm1', '--format', 'ukai')
    const doc = JSON.parse(r.stdout)
    assert.equal(doc.blocks.length, 164)
    assert.deepEqual(doc.blocks[0], { '127.0.0.1:22222': { sync_status: 0 }, '10.0.0.2': { sync_status: 0 } })
    // The local location's directory was allocated; the remote one is not ours.
    assert.deepEqual(await readdir(join(dir, 'img')), ['vm1'])
    r = await ukai('image', 'destroy', 'vm1')
    assert.equal(r.code, 0, r.stderr)
    assert.deepEqual(await readdir(join(dir, 'img')), [])
    assert.match((await ukai('image', 'list')).stdout, /no images/)
  })

  test("the seed's metadata imports and exports back equal", async () => {
    const seed = {
      name: 'image01',
      size: 8000000000,
      block_size: 50000000,
      blocks: Array.from({ length: 160 }, () => ({ '192.168.0.100': { synced: true } }))
    }
    const file = join(dir, 'image01.json')
    await writeFile(file, JSON.stringify(seed, null, 4))
    let r = await ukai('image', 'import-metadata', file)
    assert.equal(r.code, 0, r.stderr)
    r = await ukai('image', 'info', 'image01', '--format', 'seed')
    assert.deepEqual(JSON.parse(r.stdout), seed)
    // A second import of the same name is refused and changes nothing.
    r = await ukai('image', 'import-metadata', file)
    assert.equal(r.code, 4)
    assert.match(r.stderr, /already exists/)
    // Stored compactly: one range, not 160 objects.
    r = await ukai('image', 'info', 'image01', '--json')
    assert.deepEqual(JSON.parse(r.stdout).locations, { '192.168.0.100': { blocks: [[0, 160]], out_of_sync: [] } })
    assert.equal((await ukai('image', 'destroy', 'image01')).code, 0)
  })

  test('invalid metadata is refused with a clear message and stores nothing', async () => {
    const cases: Array<[unknown, RegExp]> = [
      [{ name: 'bad1', size: 100, block_size: 10, blocks: [] }, /has 0 entries but size 100 \/ block_size 10 needs 10/],
      [{ name: 'bad2', size: 20, block_size: 10, blocks: [{ a: { synced: true } }, {}] }, /block 1: has no location/],
      [{ name: 'bad3', size: 10, block_size: 10, blocks: [{ a: { sync_status: 7 } }] }, /unknown sync_status 7/],
      [{ name: '../etc', size: 10, block_size: 10, blocks: [{ a: { synced: true } }] }, /invalid image name/],
      [{ name: 'bad4', size: -10, block_size: 10, blocks: [] }, /'size' must be a positive integer/],
      [{ name: 'bad5', size: 10.5, block_size: 10, blocks: [] }, /'size' must be a positive integer/]
    ]
    for (const [doc, message] of cases) {
      const file = join(dir, 'bad.json')
      await writeFile(file, JSON.stringify(doc))
      const r = await ukai('image', 'import-metadata', file)
      assert.equal(r.code, 2, `${JSON.stringify(doc)}: ${r.stderr}`)
      assert.match(r.stderr, message)
    }
    await writeFile(join(dir, 'bad.json'), '{"name": ')
    const r = await ukai('image', 'import-metadata', join(dir, 'bad.json'))
    assert.equal(r.code, 2)
    assert.match(r.stderr, /not valid JSON/)
    assert.match((await ukai('image', 'list')).stdout, /no images/)
  })

  test('bad arguments exit 2 with a message', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['image', 'create', 'x'], /needs -s\|--size/],
      [['image', 'create', 'x', '-s', 'lots'], /not a size/],
      [['image', 'create', 'x', '-s', '1M', '-b', '2M'], /block_size 2097152 is larger than size 1048576/],
      [['image', 'create', 'a/b', '-s', '1M'], /invalid image name/],
      [['image', 'create', 'x', '-s', '1M', '-l', 'not a host'], /invalid location/],
      [['image', 'create', 'x', '-s', '1M', '--colour'], /Unknown option '--colour'/],
      [['image', 'info'], /takes NAME/],
      [['image', 'frobnicate'], /unknown image command/],
      [['launch'], /unknown command/]
    ]
    for (const [args, message] of cases) {
      const r = await ukai(...args)
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`)
      assert.match(r.stderr, message)
    }
    const missing = await ukai('image', 'info', 'nope')
    assert.equal(missing.code, 3)
    assert.match(missing.stderr, /image 'nope' not found/)
  })

  test('a bad config is an error naming the key, exit 2', async () => {
    const cases: Array<[unknown, RegExp]> = [
      [{ colour: 'blue' }, /config key 'colour': unknown key/],
      [{ control_port: 'x' }, /config key 'control_port': must be an integer port/],
      [{ proxy_port: 70000 }, /config key 'proxy_port'/],
      [{ blockname_format: '%s' }, /config key 'blockname_format'/],
      [{ image_root: '' }, /config key 'image_root'/]
    ]
    for (const [doc, message] of cases) {
      const file = join(dir, 'bad-config.json')
      await writeFile(file, JSON.stringify(doc))
      const r = await run(process.execPath, [CLI, '--config', file, 'image', 'list'])
      assert.equal(r.code, 2, r.stderr)
      assert.match(r.stderr, message)
    }
    const r = await run(process.execPath, [CLI, 'image', 'list', '--config', join(dir, 'absent.json')])
    assert.equal(r.code, 2)
    assert.match(r.stderr, /cannot read config file/)
    const env = await run(process.execPath, [CLI, 'image', 'list'], { env: { ...process.env, UKAI_CONFIG: join(dir, 'bad-config.json') } })
    assert.equal(env.code, 2)
  })
})
