import { test, describe } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync } from 'node:fs'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { UkaiError } from '../errors.js'
import { canonicalLocation } from '../metadata/names.js'
import { tmpDir } from '../../test/helpers/tmp.js'
import { DEFAULT_CONFIG_PATH, defaultConfig, isLocalLocation, loadConfig, parseConfig } from './config.js'

/** Asserts `fn` throws UKAI_ERR_INVALID_CONFIG (exit 2) with a message matching `message`, naming `key` when given. */
function rejects (fn: () => unknown, message: RegExp, key?: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof UkaiError, `expected a UkaiError, got ${String(err)}`)
    assert.equal(err.code, 'UKAI_ERR_INVALID_CONFIG')
    assert.equal(err.mapping.exit, 2)
    assert.match(err.message, message)
    if (key !== undefined) {
      assert.match(err.message, new RegExp(`config key '${key}'`))
      assert.equal(err.details?.key, key)
    }
    return true
  })
}

describe('parseConfig defaults', () => {
  test('an empty object gives the seed defaults and loopback addresses', () => {
    const c = parseConfig({}, '/etc/ukai')
    assert.equal(c.control_port, 22221)
    assert.equal(c.proxy_port, 22222)
    assert.equal(c.blockname_format, '%016d')
    assert.equal(c.control_address, '127.0.0.1')
    assert.equal(c.proxy_address, '127.0.0.1')
    assert.equal(c.id, '127.0.0.1:22222')
    assert.equal(c.metadata_backend, 'file')
    assert.equal(c.image_root, '/var/lib/ukai/images')
    assert.equal(c.metadata_root, '/var/lib/ukai/metadata')
    assert.equal(c.retry_after, 60)
    assert.equal(c.io_timeout, 10)
    assert.equal(c.default_block_size, 64 * 2 ** 20)
    assert.equal(c.source, undefined)
    assert.deepEqual(c, defaultConfig())
  })

  test('id is derived from proxy_address and proxy_port when not given', () => {
    assert.equal(parseConfig({ proxy_port: 3000 }, '/').id, '127.0.0.1:3000')
    assert.equal(parseConfig({ proxy_address: '10.0.0.5', tls_dir: 'tls' }, '/').id, '10.0.0.5:22222')
    assert.equal(parseConfig({ proxy_address: 'node1.example', proxy_port: 4000, tls_dir: 'tls' }, '/').id, 'node1.example:4000')
  })

  test('a derived id from an IPv6 proxy_address is a valid location', () => {
    const c = parseConfig({ proxy_address: '::1' }, '/')
    assert.equal(c.id, '[::1]:22222')
    assert.equal(canonicalLocation(c.id, c.proxy_port), '[::1]:22222')
    assert.equal(isLocalLocation(c, '[::1]'), true)
  })

  test('a given id is kept', () => {
    const c = parseConfig({ id: '192.168.0.100' }, '/')
    assert.equal(c.id, '192.168.0.100')
    assert.equal(isLocalLocation(c, '192.168.0.100:22222'), true)
    assert.equal(isLocalLocation(c, '192.168.0.101:22222'), false)
    assert.equal(isLocalLocation(c, '192.168.0.100:22223'), false)
  })

  test('every key can be set', () => {
    const c = parseConfig({
      image_root: '/srv/images',
      metadata_root: '/srv/meta',
      blockname_format: 'blk-%08d.raw',
      control_port: 1000,
      proxy_port: 1001,
      control_address: '0.0.0.0',
      proxy_address: '192.168.0.100',
      id: '192.168.0.100:1001',
      tls_dir: 'tls',
      retry_after: 5,
      io_timeout: 0.5,
      metadata_backend: 'file',
      default_block_size: '1M'
    }, '/')
    assert.equal(c.image_root, '/srv/images')
    assert.equal(c.metadata_root, '/srv/meta')
    assert.equal(c.blockname_format, 'blk-%08d.raw')
    assert.equal(c.control_port, 1000)
    assert.equal(c.proxy_port, 1001)
    assert.equal(c.control_address, '0.0.0.0')
    assert.equal(c.proxy_address, '192.168.0.100')
    assert.equal(c.id, '192.168.0.100:1001')
    assert.equal(c.tls_dir, '/tls')
    assert.equal(c.retry_after, 5)
    assert.equal(c.io_timeout, 0.5)
    assert.equal(c.default_block_size, 2 ** 20)
    assert.equal(parseConfig({ default_block_size: 4096 }, '/').default_block_size, 4096)
  })

  test('metadata_servers selects etcd', () => {
    const c = parseConfig({ metadata_servers: ['http://10.0.0.1:2379', 'https://[fd00::1]:2379/'], metadata_prefix: 'site-a', lease_ttl: 5 }, '/')
    assert.equal(c.metadata_backend, 'etcd')
    assert.deepEqual(c.metadata_servers, ['http://10.0.0.1:2379', 'https://[fd00::1]:2379'])
    assert.equal(c.metadata_prefix, 'site-a')
    assert.equal(c.lease_ttl, 5)
    assert.equal(parseConfig({ metadata_servers: ['http://h:2379'], metadata_backend: 'etcd' }, '/').metadata_backend, 'etcd')
    rejects(() => parseConfig({ metadata_servers: ['http://h:2379'], metadata_backend: 'file' }, '/'), /is "file" but metadata_servers names etcd servers/, 'metadata_backend')
    const d = parseConfig({}, '/')
    assert.deepEqual([d.metadata_backend, d.metadata_servers, d.metadata_prefix, d.lease_ttl], ['file', [], 'ukai', 10])
  })

  test('data_root is an alias of image_root', () => {
    const c = parseConfig({ data_root: '/srv/data' }, '/')
    assert.equal(c.image_root, '/srv/data')
    assert.equal('data_root' in c, false)
  })

  test('relative paths are resolved against the base directory', () => {
    const c = parseConfig({ image_root: 'images', metadata_root: '../meta' }, '/etc/ukai')
    assert.equal(c.image_root, '/etc/ukai/images')
    assert.equal(c.metadata_root, '/etc/meta')
    assert.equal(parseConfig({ data_root: './d' }, '/x/y').image_root, '/x/y/d')
  })

  test('control and proxy may share a port on different addresses', () => {
    const c = parseConfig({ control_port: 5000, proxy_port: 5000, control_address: '127.0.0.1', proxy_address: '127.0.0.2' }, '/')
    assert.equal(c.control_port, c.proxy_port)
  })

  test('a peer port off loopback needs a TLS identity (tls_dir)', () => {
    for (const address of ['10.0.0.1', '0.0.0.0', '::', 'node1.example']) {
      rejects(() => parseConfig({ proxy_address: address }, '/'), /not a loopback address: the peer port speaks plain text only on loopback/, 'proxy_address')
      assert.equal(parseConfig({ proxy_address: address, tls_dir: '/etc/ukai/tls' }, '/').tls_dir, '/etc/ukai/tls')
    }
    for (const address of ['127.0.0.1', '127.1.2.3', '::1', 'localhost']) assert.equal(parseConfig({ proxy_address: address }, '/').tls_dir, undefined)
  })
})

describe('parseConfig rejections name the key', () => {
  test('a config that is not an object', () => {
    for (const raw of [null, [], 'x', 42, true]) {
      rejects(() => parseConfig(raw, '/'), /config must be a JSON object/)
    }
  })

  test('unknown keys', () => {
    rejects(() => parseConfig({ imageroot: '/x' }, '/'), /unknown key \(known keys: image_root, data_root/, 'imageroot')
    rejects(() => parseConfig({ control_port: 1, Proxy_Port: 2 }, '/'), /unknown key/, 'Proxy_Port')
    rejects(() => parseConfig({ __proto__x: 1 }, '/'), /unknown key/, '__proto__x')
  })

  test('wrong types', () => {
    const cases: Array<[string, unknown, RegExp]> = [
      ['image_root', 5, /must be a non-empty path string/],
      ['image_root', '', /must be a non-empty path string/],
      ['data_root', ['a'], /must be a non-empty path string/],
      ['metadata_root', null, /must be a non-empty path string/],
      ['metadata_root', 'a\0b', /must not contain NUL/],
      ['blockname_format', 16, /must be a string such as "%016d"/],
      ['control_port', '22221', /must be an integer port number 1-65535, got "22221"/],
      ['proxy_port', null, /must be an integer port number 1-65535, got null/],
      ['control_address', 127001, /must be a host name or IP address/],
      ['proxy_address', 'a b', /must be a host name or IP address, got "a b"/],
      ['proxy_address', '', /must be a host name or IP address/],
      ['retry_after', '60', /must be a number of seconds/],
      ['io_timeout', null, /must be a number of seconds/],
      ['metadata_backend', 'zookeeper', /must be "file" or "etcd", got "zookeeper"/],
      ['metadata_backend', 1, /must be "file" or "etcd"/],
      ['metadata_backend', 'etcd', /is "etcd" but metadata_servers names no etcd server/],
      ['metadata_servers', 'http://10.0.0.1:2379', /must be a list of etcd client URLs/],
      ['metadata_servers', ['10.0.0.1:2379'], /must be a list of etcd client URLs/],
      ['metadata_servers', ['http://a b'], /must be a list of etcd client URLs/],
      ['metadata_prefix', '', /must be 1-64 letters/],
      ['metadata_prefix', 'a/b', /must be 1-64 letters/],
      ['lease_ttl', 1, /from 2 to 3600/],
      ['lease_ttl', 2.5, /from 2 to 3600/],
      ['lease_ttl', '10', /from 2 to 3600/],
      ['default_block_size', true, /must be a positive size in bytes or a string such as "64M"/],
      ['default_block_size', 'lots', /default_block_size 'lots' is not a size/],
      ['id', 22222, /must be this node's address as "host" or "host:port", got 22222/],
      ['id', 'not a host', /must be this node's address/]
    ]
    for (const [key, value, message] of cases) {
      rejects(() => parseConfig({ [key]: value }, '/'), message, key)
    }
  })

  test('impossible values', () => {
    const cases: Array<[string, unknown, RegExp]> = [
      ['control_port', 0, /port number 1-65535, got 0/],
      ['proxy_port', 0, /port number 1-65535, got 0/],
      ['control_port', 70000, /got 70000/],
      ['proxy_port', 65536, /got 65536/],
      ['proxy_port', -1, /got -1/],
      ['proxy_port', 22222.5, /got 22222.5/],
      ['retry_after', 0, /greater than 0 and at most 86400, got 0/],
      ['retry_after', -1, /got -1/],
      ['io_timeout', 86401, /got 86401/],
      ['default_block_size', 0, /must be a positive size/],
      ['default_block_size', -4096, /must be a positive size/],
      ['default_block_size', 1.5, /must be a positive size/],
      ['default_block_size', '0', /must be greater than zero/],
      ['id', 'host:0', /must be this node's address/],
      ['id', 'host:70000', /must be this node's address/]
    ]
    for (const [key, value, message] of cases) {
      rejects(() => parseConfig({ [key]: value }, '/'), message, key)
    }
  })

  test('block name formats that are not "%0Nd" or could leave the image directory', () => {
    for (const format of ['%d', '%s', '%016s', '%16d', '../%016d', '%016d/x', 'a/%016d', '/%016d', '%016d%016d', '%%016d', '', 'block', '%0d', '%0123d']) {
      rejects(() => parseConfig({ blockname_format: format }, '/'), /blockname_format/, 'blockname_format')
    }
    rejects(() => parseConfig({ blockname_format: '%d' }, '/'), /is not of the form "%0Nd"/, 'blockname_format')
    rejects(() => parseConfig({ blockname_format: '%021d' }, '/'), /width must be 1-20, got 21/, 'blockname_format')
    rejects(() => parseConfig({ blockname_format: '%00d' }, '/'), /width must be 1-20, got 0/, 'blockname_format')
  })

  test('both image_root and data_root', () => {
    rejects(() => parseConfig({ image_root: '/a', data_root: '/b' }, '/'), /alias of image_root; give only one of them/, 'data_root')
  })

  test('control_port equal to proxy_port on the same address', () => {
    rejects(() => parseConfig({ control_port: 22222 }, '/'), /must differ from proxy_port \(22222\)/, 'control_port')
    rejects(() => parseConfig({ control_port: 9, proxy_port: 9 }, '/'), /must differ from proxy_port/, 'control_port')
  })
})

describe('loadConfig', () => {
  test('reads a named file and resolves relative paths against its directory', async (t) => {
    const dir = await tmpDir(t)
    const file = join(dir, 'config')
    await writeFile(file, JSON.stringify({ data_root: 'images', metadata_root: 'meta', proxy_port: 3333 }))
    const c = loadConfig(file)
    assert.equal(c.image_root, join(dir, 'images'))
    assert.equal(c.metadata_root, join(dir, 'meta'))
    assert.equal(c.proxy_port, 3333)
    assert.equal(c.id, '127.0.0.1:3333')
    assert.equal(c.source, file)
  })

  test('takes $UKAI_CONFIG when no path is given', async (t) => {
    const dir = await tmpDir(t)
    const file = join(dir, 'env-config')
    await writeFile(file, JSON.stringify({ control_port: 4444 }))
    const saved = process.env.UKAI_CONFIG
    t.after(() => { if (saved === undefined) delete process.env.UKAI_CONFIG; else process.env.UKAI_CONFIG = saved })
    process.env.UKAI_CONFIG = file
    assert.equal(loadConfig().control_port, 4444)
    process.env.UKAI_CONFIG = join(dir, 'missing')
    rejects(() => loadConfig(), /cannot read config file .*missing/)
  })

  test('without a path or $UKAI_CONFIG, a missing default file means the defaults', (t) => {
    if (existsSync(DEFAULT_CONFIG_PATH)) { t.skip(`${DEFAULT_CONFIG_PATH} exists on this machine`); return }
    const saved = process.env.UKAI_CONFIG
    t.after(() => { if (saved !== undefined) process.env.UKAI_CONFIG = saved })
    delete process.env.UKAI_CONFIG
    assert.deepEqual(loadConfig(), defaultConfig())
  })

  test('a named file that is missing is an error', async (t) => {
    const dir = await tmpDir(t)
    const file = join(dir, 'nope.json')
    assert.throws(() => loadConfig(file), (err: unknown) => {
      assert.ok(err instanceof UkaiError)
      assert.equal(err.code, 'UKAI_ERR_INVALID_CONFIG')
      assert.equal(err.mapping.exit, 2)
      assert.match(err.message, /^cannot read config file .*nope\.json: .*ENOENT/)
      assert.deepEqual(err.details, { path: file })
      return true
    })
  })

  test('a directory given as the config file is an error', async (t) => {
    const dir = await tmpDir(t)
    rejects(() => loadConfig(dir), /cannot read config file/)
  })

  test('bad JSON is an error', async (t) => {
    const dir = await tmpDir(t)
    for (const text of ['{', '', '{"control_port": 1,}', "{'a': 1}", 'control_port = 1']) {
      const file = join(dir, 'bad')
      await writeFile(file, text)
      assert.throws(() => loadConfig(file), (err: unknown) => {
        assert.ok(err instanceof UkaiError)
        assert.equal(err.code, 'UKAI_ERR_INVALID_CONFIG')
        assert.equal(err.mapping.exit, 2)
        assert.match(err.message, /^config file .*bad is not valid JSON \(invalid JSON/)
        return true
      })
    }
    // The message never quotes the file (issue 10: a config path linked to /etc/shadow printed part of it).
    const secret = join(dir, 'secret')
    await writeFile(secret, 'root:$6$S3CR3T:19000:0:99999:7:::\n')
    assert.throws(() => loadConfig(secret), (err: unknown) => {
      assert.ok(err instanceof UkaiError)
      assert.doesNotMatch(err.message, /root|S3CR3T|\$6\$/)
      return true
    })
  })

  test('a file with a bad key fails with the key named', async (t) => {
    const dir = await tmpDir(t)
    const file = join(dir, 'config')
    await writeFile(file, JSON.stringify({ proxy_port: 0 }))
    rejects(() => loadConfig(file), /port number/, 'proxy_port')
    await writeFile(file, '[]')
    rejects(() => loadConfig(file), /config must be a JSON object/)
  })
})
