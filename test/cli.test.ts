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
    let r = await ukai('image', 'create', 'vm1', '-s', '8G', '-b', '64M', '-l', '127.0.0.1:22222', '-l', '10.0.0.2', '-h', 'hv1', '-h', 'hv2')
    assert.equal(r.code, 0, r.stderr)
    assert.match(r.stdout, /created image 'vm1': 8 GiB in 128 blocks of 64 MiB/)
    r = await ukai('image', 'list', '--json')
    const list = JSON.parse(r.stdout)
    assert.deepEqual(list.map((s: { name: string }) => s.name), ['vm1'])
    assert.deepEqual(list[0].locations, ['127.0.0.1:22222', '10.0.0.2'])
    assert.deepEqual(list[0].hypervisors, ['hv1', 'hv2'])
    r = await ukai('image', 'info', 'vm1')
    assert.match(r.stdout, /block size: +64 MiB \(128 blocks\)/)
    assert.match(r.stdout, /10\.0\.0\.2 +blocks 0-127 +out of sync -/)
    r = await ukai('image', 'info', 'vm1', '--format', 'ukai')
    const doc = JSON.parse(r.stdout)
    assert.equal(doc.blocks.length, 128)
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
      [['image', 'create', 'x'], /required option '-s, --size <SIZE>' not specified \(see 'ukai image create --help'\)/],
      [['image', 'create', 'x', '-s', 'lots'], /not a size/],
      [['image', 'create', 'x', '-s', '1M', '-b', '2M'], /block_size 2097152 is larger than size 1048576/],
      [['image', 'create', 'a/b', '-s', '1M'], /invalid image name/],
      [['image', 'create', 'x', '-s', '1M', '-l', 'not a host'], /invalid location/],
      [['image', 'create', 'x', '-s', '1M', '--colour'], /unknown option '--colour' \(see 'ukai image create --help'\)/],
      [['image', 'info'], /missing required argument 'NAME'/],
      [['image', 'info', 'a', 'b'], /too many arguments for 'ukai image info'/],
      [['image', 'info', 'a', '--json', '--format', 'seed'], /'--json' cannot be used with option '--format/],
      [['image', 'info', 'a', '--format', 'xml'], /Allowed choices are seed, ukai, stored/],
      [['image', 'create', 'x', '-s'], /option '-s, --size <SIZE>' argument missing/],
      [['image', 'lst'], /unknown command 'image lst' \(did you mean 'list'\?\)/],
      [['sync', 'v', '-s', 'x'], /-s START must be a block number/],
      [['image', 'frobnicate'], /unknown command 'image frobnicate' \(see 'ukai image --help'\)/],
      [['launch'], /unknown command 'launch' \(see 'ukai --help'\)/],
      // Block sizes: powers of two from 4K (issue 9: 1-byte blocks made 20,000 files of one write).
      [['image', 'create', 'x', '-s', '1M', '-b', '1'], /block_size 1 must be a power of two from 4096/],
      [['image', 'create', 'x', '-s', '1M', '-b', '3'], /must be a power of two/],
      [['image', 'create', 'x', '-s', '8M', '-b', '3000000'], /block_size 3000000 must be a power of two/],
      [['image', 'create', 'x', '-s', '1000'], /block_size 4096 is larger than size 1000/],
      // One line, not the whole usage (issue 9: -s -1 printed 24 lines); the value after -s is taken as given.
      [['image', 'create', 'x', '-s', '-1'], /'-1' is not a size/],
      [['image', 'create', 'x', '--size=-1'], /'-1' is not a size/]
    ]
    for (const [args, message] of cases) {
      const r = await ukai(...args)
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`)
      assert.match(r.stderr, message)
      assert.equal(r.stderr.trim().split('\n').length, 1, `${args.join(' ')}: one line: ${r.stderr}`)
    }
    // A small image without -b gets the default halved to fit.
    const small = await ukai('image', 'create', 'small', '-s', '5M')
    assert.equal(small.code, 0, small.stderr)
    assert.match(small.stdout, /in 2 blocks of 4 MiB/)
    const missing = await ukai('image', 'info', 'nope')
    assert.equal(missing.code, 3)
    assert.match(missing.stderr, /image 'nope' not found/)
  })

  test('an import of an image no replica can serve, or of tiny blocks, or nested without end, is refused with one line, exit 2', async () => {
    const docs: Array<[string, RegExp]> = [
      [JSON.stringify({ name: 'lost', size: 8192, block_size: 4096, blocks: [{ h: { synced: true } }, { h: { synced: false }, i: { sync_status: 2 } }] }), /block 1 has no in-sync replica/],
      [JSON.stringify({ name: 'tiny', size: 3, block_size: 1, blocks: [{ h: { synced: true } }, { h: { synced: true } }, { h: { synced: true } }] }), /'block_size' 1 is smaller than 4096/],
      [`{"name":"deep","size":4096,"block_size":4096,"blocks":[${'['.repeat(100000)}${']'.repeat(100000)}]}`, /block 0: must be an object/]
    ]
    for (const [text, message] of docs) {
      const file = join(dir, 'doc.json')
      await writeFile(file, text)
      const r = await ukai('image', 'import-metadata', file)
      assert.equal(r.code, 2, r.stderr)
      assert.match(r.stderr, message)
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr)
    }
    assert.doesNotMatch((await ukai('image', 'list')).stdout, /lost|tiny|deep/)
  })

  test('--help on every command prints its usage, exit 0; no command is the usage on stderr, exit 2', async () => {
    const commands = [
      [], ['server'], ['image'], ['image', 'create'], ['image', 'import-metadata'], ['image', 'list'], ['image', 'info'], ['image', 'destroy'],
      ['image', 'add-location'], ['image', 'remove-location'], ['image', 'add-hypervisor'], ['image', 'remove-hypervisor'],
      ['sync'], ['stats'], ['nodes'], ['nodes', 'list'], ['nodes', 'best'], ['nodes', 'errors'], ['control-token'],
      ['cert'], ['cert', 'ca'], ['cert', 'node'], ['cert', 'client'], ['version']
    ]
    for (const c of commands) {
      const r = await ukai(...c, '--help')
      assert.equal(r.code, 0, `${c.join(' ')} --help: ${r.stderr}`)
      assert.match(r.stdout, new RegExp(`^Usage: ${['ukai', ...c].join(' ')} `), `${c.join(' ')} --help`)
      assert.equal(r.stderr, '')
    }
    // Options are listed with their help; -h is image create's hypervisor, not help.
    const create = (await ukai('image', 'create', '--help')).stdout
    for (const o of ['-s, --size <SIZE>', '-b, --block-size <SIZE>', '-l, --location <LOCATION>', '-h, --hypervisor <HYPERVISOR>', '--config <PATH>']) assert.ok(create.includes(o), o)
    for (const c of [['image', 'list'], ['image', 'info'], ['nodes', 'list'], ['nodes', 'best'], ['nodes', 'errors'], ['stats'], ['sync']]) {
      assert.match((await ukai(...c, '--help')).stdout, /--json/, `${c.join(' ')} takes --json`)
    }
    assert.match((await ukai('image', 'help', 'create')).stdout, /^Usage: ukai image create /)
    assert.match((await ukai('help', 'sync')).stdout, /^Usage: ukai sync /)
    assert.match((await ukai('--version')).stdout, /^ukai \d+\.\d+\.\d+\n$/)
    for (const c of [[], ['image'], ['nodes'], ['cert']]) {
      const r = await ukai(...c)
      assert.equal(r.code, 2, c.join(' '))
      assert.equal(r.stdout, '')
      assert.match(r.stderr, /^Usage: ukai/)
    }
  })

  test('listings take --json offline too; stats, sync and nodes errors need a running node (exit 10)', async () => {
    const r = await ukai('nodes', 'list', '--json')
    assert.equal(r.code, 0, r.stderr)
    assert.deepEqual(JSON.parse(r.stdout), [])
    assert.deepEqual(JSON.parse((await ukai('image', 'list', '--json')).stdout).filter((s: { name: string }) => s.name === 'nothing'), [])
    for (const c of [['stats', 'small', '--json'], ['sync', 'small', '--json'], ['nodes', 'errors', '--json']]) {
      const e = await ukai(...c)
      assert.equal(e.code, 10, `${c.join(' ')}: ${e.stderr}`)
      assert.match(e.stderr, /no node is running at 127\.0\.0\.1:\d+/)
    }
  })

  test('a bad config is an error naming the key, exit 2', async () => {
    const cases: Array<[unknown, RegExp]> = [
      [{ colour: 'blue' }, /config key 'colour': unknown key/],
      [{ control_port: 'x' }, /config key 'control_port': must be an integer port/],
      [{ proxy_port: 70000 }, /config key 'proxy_port'/],
      [{ blockname_format: '%s' }, /config key 'blockname_format'/],
      [{ image_root: '' }, /config key 'image_root'/],
      // image_root and metadata_root apart (issue 9: equal ones were taken, then 'image create' said "already exists").
      [{ image_root: 'same', metadata_root: 'same' }, /config key 'metadata_root': must not be image_root/],
      [{ image_root: 'm/images', metadata_root: 'm' }, /config key 'metadata_root': must not/],
      [{ default_block_size: '3000' }, /config key 'default_block_size': must be a power of two/]
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
