import { test, describe } from 'node:test'
import assert from 'node:assert/strict'
import fc from 'fast-check'
import { UkaiError } from '../errors.js'
import { canonicalLocation, parseLocation, validateImageName, validateLocation } from './names.js'

function invalidName (fn: () => unknown, message: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof UkaiError, `expected a UkaiError, got ${String(err)}`)
    assert.equal(err.code, 'UKAI_ERR_INVALID_NAME')
    assert.match(err.message, message)
    return true
  })
}

describe('validateImageName', () => {
  test('accepts plain names up to 128 characters', () => {
    for (const name of ['image01', 'a', '0', 'vm-01.disk_0', 'A.B', 'x'.repeat(128), 'a..b', 'a-']) {
      assert.equal(validateImageName(name), name)
    }
  })

  test('refuses anything that could leave a root or is not a name', () => {
    const bad: unknown[] = [
      '', '.', '..', '../x', 'a/../../etc', 'a/b', '/etc', '/', 'a\\b', '.hidden', '-rf', '_x',
      'a\0b', '\0', 'x'.repeat(129), 'a b', ' a', 'a\n', 'é', 'a:b', 'a*', '~root', 'a%2fb',
      undefined, null, 5, ['a'], { name: 'a' }
    ]
    for (const name of bad) {
      invalidName(() => validateImageName(name), /^invalid image name .*: use 1-128 letters, digits/)
    }
  })

  test('the message shows the name, and details carry it', () => {
    assert.throws(() => validateImageName('../etc'), (err: unknown) => {
      assert.ok(err instanceof UkaiError)
      assert.match(err.message, /invalid image name "\.\.\/etc"/)
      assert.deepEqual(err.details, { image: '../etc' })
      assert.equal(err.mapping.exit, 2)
      return true
    })
  })

  test('no accepted name contains a path separator, NUL or starts with a dot', () => {
    fc.assert(fc.property(fc.string({ maxLength: 140, unit: 'binary' }), (s) => {
      let ok: boolean
      try { validateImageName(s); ok = true } catch (err) {
        assert.ok(err instanceof UkaiError)
        ok = false
      }
      if (ok) {
        assert.ok(!s.includes('/') && !s.includes('\\') && !s.includes('\0'))
        assert.ok(!s.startsWith('.') && s !== '' && s.length <= 128)
      }
    }))
  })
})

describe('locations', () => {
  test('host, host:port and bracketed IPv6', () => {
    assert.deepEqual(parseLocation('192.168.0.100', 22222), { host: '192.168.0.100', port: 22222 })
    assert.deepEqual(parseLocation('192.168.0.100:1234', 22222), { host: '192.168.0.100', port: 1234 })
    assert.deepEqual(parseLocation('node1', 7), { host: 'node1', port: 7 })
    assert.deepEqual(parseLocation('node1.example.com:65535', 7), { host: 'node1.example.com', port: 65535 })
    assert.deepEqual(parseLocation('[::1]:22222', 1), { host: '[::1]', port: 22222 })
    assert.deepEqual(parseLocation('[::1]', 22222), { host: '[::1]', port: 22222 })
    assert.deepEqual(parseLocation('[fe80::1:2]:80', 1), { host: '[fe80::1:2]', port: 80 })
    assert.equal(validateLocation('127.0.0.1:1', 22222), '127.0.0.1:1')
  })

  test('refuses what is not a host or host:port', () => {
    const bad: unknown[] = [
      '', ':22222', 'host:', 'host:0', 'host:70000', 'host:123456', 'host:-1', 'a b', 'a/b', '../x', 'host:port',
      '::1', '[::1', '[::1]:', '[::1]:0', '[zz::1]', '-host', 'host-', 'a..b', 'a_b', 'host:22:22', 'http://host',
      'h\0', 'x'.repeat(254), undefined, null, 22222, {}
    ]
    for (const loc of bad) {
      invalidName(() => parseLocation(loc, 22222), /^invalid location /)
      invalidName(() => validateLocation(loc, 22222), /^invalid location /)
    }
    invalidName(() => parseLocation('host:0', 22222), /expected host or host:port \(port 1-65535\)/)
    invalidName(() => parseLocation(5, 22222), /not a string/)
  })

  test('canonicalLocation writes host:port in lower case with the default port filled in', () => {
    assert.equal(canonicalLocation('192.168.0.100', 22222), '192.168.0.100:22222')
    assert.equal(canonicalLocation('192.168.0.100:22222', 1), '192.168.0.100:22222')
    assert.equal(canonicalLocation('Node1.Example', 22222), 'node1.example:22222')
    assert.equal(canonicalLocation('[::1]', 22222), '[::1]:22222')
    assert.equal(canonicalLocation('[FE80::1]:5', 22222), '[fe80::1]:5')
    assert.equal(canonicalLocation('NODE', 1), canonicalLocation('node:1', 2))
    assert.notEqual(canonicalLocation('node:1', 1), canonicalLocation('node:2', 1))
    invalidName(() => canonicalLocation('a/b', 1), /invalid location/)
  })

  test('canonicalLocation is idempotent', () => {
    const host = fc.oneof(
      fc.ipV4(),
      fc.domain().filter((d) => d.length <= 253),
      fc.ipV6().map((a) => `[${a}]`)
    )
    fc.assert(fc.property(host, fc.option(fc.integer({ min: 1, max: 65535 })), fc.integer({ min: 1, max: 65535 }), (h, port, dflt) => {
      const loc = port === null ? h : `${h}:${port}`
      let c: string
      try { c = canonicalLocation(loc, dflt) } catch (err) {
        // fc.domain() may produce labels our stricter host rule refuses; that is fine, but only as UKAI_ERR_INVALID_NAME.
        assert.ok(err instanceof UkaiError && err.code === 'UKAI_ERR_INVALID_NAME')
        assert.ok(!h.startsWith('['), `bracketed IPv6 ${h} refused`)
        return
      }
      assert.equal(canonicalLocation(c, 1), c)
      assert.ok(c.endsWith(`:${port ?? dflt}`))
    }))
  })
})
