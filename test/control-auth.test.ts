/**
 * The control API trusts nobody by default (issue 10): every call needs
 * the cluster's bearer token, a Host that is not the node's is refused (a
 * DNS-rebinding page), and so is a state-changing call with a browser's
 * Origin. The token never shows in the node's output or in an error, nor
 * does what a token file holds when it is not a token.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdir, mkdtemp, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { CLI, TestNode, freePort, run } from './helpers/node-process.js'

interface ErrorBody { error?: { code: string, message: string } }

describe('control API authentication', { timeout: 120_000 }, () => {
  let node: TestNode
  let token: string
  let host: string

  before(async () => {
    node = await TestNode.start()
    token = await node.controlToken()
    host = `127.0.0.1:${node.controlPort}`
    const r = await node.cli('image', 'create', 'vm', '-s', '4M', '-b', '1M')
    assert.equal(r.code, 0, r.stderr)
  })
  after(async () => { await node?.destroy() })

  /** One request with exactly these headers (no token unless they carry one). */
  const call = async (method: string, path: string, headers: Record<string, string>, body?: string): Promise<{ status: number, headers: Record<string, string | string[] | undefined>, body: ErrorBody }> =>
    await node.api<ErrorBody>(method, path, body, { token: null, headers, timeoutMs: 10_000 })

  const locations = async (): Promise<unknown> => {
    const r = await node.api<{ locations: unknown }>('GET', '/v1/images/vm')
    assert.equal(r.status, 200)
    return r.body.locations
  }

  test('a call without the token, or with another one, is refused (401, UKAI_ERR_UNAUTHENTICATED) and changes nothing', async () => {
    assert.ok(token.length >= 32)
    const before = await locations()
    const tries: Array<Record<string, string>> = [{ host }, { host, authorization: 'Bearer not-the-clusters-token-at-all' }, { host, authorization: `Basic ${token}` }]
    for (const headers of tries) {
      for (const [method, path, body] of [
        ['GET', '/v1/images', undefined],
        ['DELETE', '/v1/images/vm', undefined],
        ['POST', '/v1/images/vm/locations', JSON.stringify({ location: '127.0.0.1:1' })]
      ] as const) {
        const r = await call(method, path, { ...headers, 'content-type': 'application/json' }, body)
        assert.equal(r.status, 401, `${method} ${path} with ${JSON.stringify(Object.keys(headers))}: ${JSON.stringify(r.body)}`)
        assert.equal(r.body.error?.code, 'UKAI_ERR_UNAUTHENTICATED')
        assert.match(String(r.headers['www-authenticate']), /^Bearer/)
        assert.ok(!JSON.stringify(r.body).includes(token), 'the token was in an answer')
      }
    }
    assert.deepEqual(await locations(), before)
  })

  test('two text/plain POSTs from a web page (foreign Origin and Host) cannot add a location and sync to it', async () => {
    const before = await locations()
    const page = { host: `evil.example:${node.controlPort}`, origin: 'http://evil.example', 'content-type': 'text/plain' }
    const add = await call('POST', '/v1/images/vm/locations', page, JSON.stringify({ location: '127.0.0.1:1' }))
    const sync = await call('POST', '/v1/images/vm/sync', page, '{}')
    for (const r of [add, sync]) {
      assert.equal(r.status, 403, JSON.stringify(r.body))
      assert.equal(r.body.error?.code, 'UKAI_ERR_PERMISSION')
    }
    // Even with the token (a page cannot have it, but the rules hold on their own).
    const withToken = await call('POST', '/v1/images/vm/locations', { ...page, host, authorization: `Bearer ${token}` }, JSON.stringify({ location: '127.0.0.1:1' }))
    assert.equal(withToken.status, 403)
    assert.match(withToken.body.error!.message, /a state-changing call from a web page \(Origin "http:\/\/evil.example"\) is refused/)
    assert.deepEqual(await locations(), before)
  })

  test('a Host that is not the node\'s is refused, whatever the method (DNS rebinding)', async () => {
    for (const h of [`evil.example:${node.controlPort}`, 'evil.example', `127.0.0.1:${node.controlPort + 1}`, '']) {
      const r = await call('GET', '/v1/images', { host: h, authorization: `Bearer ${token}` })
      assert.equal(r.status, 403, `Host ${h}: ${JSON.stringify(r.body)}`)
      assert.match(r.body.error!.message, /does not name this node's control API/)
    }
    for (const h of [host, `localhost:${node.controlPort}`, `[::1]:${node.controlPort}`]) {
      const r = await call('GET', '/v1/images', { host: h, authorization: `Bearer ${token}` })
      assert.equal(r.status, 200, `Host ${h}: ${JSON.stringify(r.body)}`)
    }
    // A GET from a page with the token is fine (a browser's cross-origin GET cannot carry it).
    const r = await call('GET', '/v1/images', { host, origin: 'http://evil.example', authorization: `Bearer ${token}` })
    assert.equal(r.status, 200)
  })

  test('the CLI with another token: one line, exit 14; the token is never in the node\'s output', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ukai-auth-'))
    try {
      const file = join(dir, 'token')
      await writeFile(file, 'another-clusters-token-0123456789\n')
      const config = JSON.parse(await readFile(node.configPath, 'utf8')) as Record<string, unknown>
      const cfg = join(dir, 'config.json')
      await writeFile(cfg, JSON.stringify({ ...config, image_root: node.imageRoot, metadata_root: node.metadataRoot, control_token_file: file }))
      const before = await locations()
      const r = await run(process.execPath, [CLI, '--config', cfg, 'image', 'destroy', 'vm'])
      assert.equal(r.code, 14, r.stderr)
      assert.equal(r.stderr, "ukai: the bearer token is not this cluster's\n")
      assert.deepEqual(await locations(), before)
    } finally { await rm(dir, { recursive: true, force: true }) }
    assert.ok(!node.output.includes(token), 'the token is in the node\'s output')
  })

  test('control_token_file: made (0600) when missing and used by the node and the CLI; a file that holds no token is refused without showing it', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ukai-auth-'))
    let own: TestNode | undefined
    try {
      const file = join(dir, 'secret', 'token')
      await writeFile(join(dir, 'shadow'), 'root:$6$averysecrethash:19000:0:99999:7:::\n')
      await symlink(join(dir, 'shadow'), join(dir, 'not-a-token'))
      const proxy = await freePort()
      const base = { image_root: 'images', metadata_root: 'metadata', control_port: await freePort(), proxy_port: proxy, id: `127.0.0.1:${proxy}` }
      // A file that is not a token: refused with exit 2, its contents never shown.
      await writeFile(join(dir, 'bad.json'), JSON.stringify({ ...base, control_token_file: 'not-a-token' }))
      const bad = await run(process.execPath, [CLI, '--config', join(dir, 'bad.json'), 'control-token'])
      assert.equal(bad.code, 2, bad.stderr)
      assert.match(bad.stderr, /^ukai: control_token_file .*not-a-token: does not hold a token/)
      assert.ok(!bad.stderr.includes('secret') && !bad.stderr.includes('root:'), bad.stderr)
      // A missing file (its directory there) is made, readable by its owner only.
      await writeFile(join(dir, 'config.json'), JSON.stringify({ ...base, control_token_file: join('secret', 'token') }))
      await mkdir(join(dir, 'secret'))
      own = await TestNode.start({ dir })
      assert.equal((await stat(file)).mode & 0o777, 0o600)
      const t = (await readFile(file, 'utf8')).trim()
      assert.equal(await own.controlToken(), t)
      const r = await own.api('GET', '/v1/images')
      assert.equal(r.status, 200)
      const wrong = await own.api('GET', '/v1/images', undefined, { token: null })
      assert.equal(wrong.status, 401)
    } finally {
      await own?.destroy()
      await rm(dir, { recursive: true, force: true })
    }
  })
})
