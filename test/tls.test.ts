/**
 * Node identity and TLS (issue 10, items 1, 2 and 4), on real processes:
 * the project's own `ukai cert`, nodes that speak mutual TLS on the peer
 * port, and the hypervisor-facing NBD export over TLS as QEMU and libnbd
 * speak it (qemu-img, qemu-io, nbdinfo, nbdcopy with x509 credentials).
 *
 * Refused, each with the reason a user can act on: a client without a
 * certificate, with another CA's certificate, with a hypervisor's
 * certificate on the peer port, claiming another node's id (a certificate
 * of another CA), writing as the image's writer from another node, and a
 * server that is not the node its location names.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm, writeFile, cp } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createSecureContext } from 'node:tls'
import { Cluster } from './helpers/cluster.js'
import { CLI, freePort, run, issueNodeCert, type TestNode } from './helpers/node-process.js'
import { NbdClient, type ClientTls } from '../src/peer/nbd-client.js'
import { expectNode } from '../src/tls/identity.js'
import { TestClient } from './helpers/nbd.js'
import {
  NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_REP_ACK, NBD_REP_ERR_INVALID,
  NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_UNSUP
} from '../src/frontends/nbd/protocol.js'
import { randomBytes } from 'node:crypto'

const MB = 2 ** 20

async function ukai (...args: string[]): Promise<{ code: number, stdout: string, stderr: string }> {
  return await run(process.execPath, [CLI, ...args])
}

/** TLS credentials of a node or client directory, checking that the server is node `id` (any node when undefined). */
async function credentials (dir: string, role: 'node' | 'client', id?: string): Promise<ClientTls> {
  const context = createSecureContext({
    ca: await readFile(join(dir, 'ca-cert.pem')),
    cert: await readFile(join(dir, `${role}-cert.pem`)),
    key: await readFile(join(dir, `${role}-key.pem`))
  })
  return { context, checkServerIdentity: id === undefined ? () => undefined : expectNode(id, 22222) }
}

async function peer (node: TestNode, exportName: string, tls?: ClientTls): Promise<NbdClient> {
  return await NbdClient.connect({ host: '127.0.0.1', port: node.config.proxy_port as number }, exportName, { timeoutMs: 5000, tls })
}

describe('ukai cert', () => {
  let dir: string
  before(async () => { dir = await mkdtemp(join(tmpdir(), 'ukai-cert-')) })
  after(async () => { await rm(dir, { recursive: true, force: true }) })

  test('makes a CA, node and client certificates; refuses to overwrite one and refuses bad names', async () => {
    const ca = join(dir, 'ca')
    let r = await ukai('cert', 'ca', ca)
    assert.equal(r.code, 0, r.stderr)
    assert.match(r.stdout, /OU=ca/)
    r = await ukai('cert', 'node', '127.0.0.1:5000', '--ca', ca, '--out', join(dir, 'n'), '--host', 'node1.example')
    assert.equal(r.code, 0, r.stderr)
    assert.match(r.stdout, /OU=node, CN=127\.0\.0\.1:5000 \(IP Address:127\.0\.0\.1, DNS:node1\.example\)/)
    r = await ukai('cert', 'client', 'hv1', '--ca', ca, '--out', join(dir, 'c'))
    assert.equal(r.code, 0, r.stderr)
    assert.match(r.stdout, /OU=client, CN=hv1/)
    // The key files are the owner's only.
    for (const f of [join(ca, 'ca-key.pem'), join(dir, 'n', 'node-key.pem'), join(dir, 'c', 'client-key.pem')]) {
      const { mode } = await import('node:fs').then((fs) => fs.statSync(f))
      assert.equal(mode & 0o077, 0, `${f} is readable by others`)
    }
    const key = await readFile(join(ca, 'ca-key.pem'))
    r = await ukai('cert', 'ca', ca)
    assert.equal(r.code, 4)
    assert.match(r.stderr, /exists already/)
    assert.ok((await readFile(join(ca, 'ca-key.pem'))).equals(key), 'the CA key was overwritten')
    r = await ukai('cert', 'node', 'x/y', '--ca', ca, '--out', join(dir, 'bad'))
    assert.equal(r.code, 2)
    r = await ukai('cert', 'client', 'a=b', '--ca', ca, '--out', join(dir, 'bad'))
    assert.equal(r.code, 2)
    assert.match(r.stderr, /cannot be a certificate name/)
    r = await ukai('cert', 'node', '127.0.0.1:1', '--ca', join(dir, 'none'), '--out', join(dir, 'bad'))
    assert.equal(r.code, 3)
    assert.match(r.stderr, /create the CA first/)
    r = await ukai('cert', 'node', '127.0.0.1:1', '--out', join(dir, 'bad'))
    assert.equal(r.code, 2)
    assert.match(r.stderr, /required option '--ca <DIR>' not specified \(see 'ukai cert node --help'\)/)
  })
})

describe('a node checks its own identity at start', () => {
  let dir: string
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ukai-tls-start-'))
    assert.equal((await ukai('cert', 'ca', join(dir, 'ca'))).code, 0)
    assert.equal((await ukai('cert', 'ca', join(dir, 'other-ca'))).code, 0)
  })
  after(async () => { await rm(dir, { recursive: true, force: true }) })

  async function start (name: string, config: Record<string, unknown>): Promise<{ code: number, stderr: string }> {
    const path = join(dir, `${name}.json`)
    await writeFile(path, JSON.stringify({ image_root: join(dir, name, 'images'), metadata_root: join(dir, name, 'metadata'), control_port: await freePort(), ...config }))
    const r = await run(process.execPath, [CLI, '--config', path, 'server'])
    return r
  }

  test("a certificate of another node's id, of another CA, or a missing one: the node does not start (exit 2)", async () => {
    const port = await freePort()
    await issueNodeCert(join(dir, 'ca'), '127.0.0.1:1', join(dir, 'wrong-id'))
    let r = await start('a', { proxy_port: port, tls_dir: join(dir, 'wrong-id') })
    assert.equal(r.code, 2, r.stderr)
    assert.match(r.stderr, /node 127\.0\.0\.1:1's certificate, and this node's id is 127\.0\.0\.1:\d+/)
    // A certificate of another CA next to this cluster's CA certificate.
    await issueNodeCert(join(dir, 'other-ca'), `127.0.0.1:${port}`, join(dir, 'foreign'))
    await cp(join(dir, 'ca', 'ca-cert.pem'), join(dir, 'foreign', 'ca-cert.pem'))
    r = await start('b', { proxy_port: port, tls_dir: join(dir, 'foreign') })
    assert.equal(r.code, 2, r.stderr)
    assert.match(r.stderr, /was not issued by the CA/)
    r = await start('c', { proxy_port: port, tls_dir: join(dir, 'nothing-here') })
    assert.equal(r.code, 2, r.stderr)
    assert.match(r.stderr, /cannot read .*ca-cert\.pem.*ukai cert node/)
  })

  test('without TLS, the peer port and TCP NBD are plain text on loopback only', async () => {
    let r = await start('d', { proxy_port: await freePort(), proxy_address: '0.0.0.0' })
    assert.equal(r.code, 2, r.stderr)
    assert.match(r.stderr, /plain text only on loopback.*tls_dir/)
    const path = join(dir, 'e.json')
    await writeFile(path, JSON.stringify({ image_root: join(dir, 'e', 'images'), metadata_root: join(dir, 'e', 'metadata'), control_port: await freePort(), proxy_port: await freePort() }))
    r = await run(process.execPath, [CLI, '--config', path, 'server', '--nbd', `0.0.0.0:${await freePort()}`])
    assert.equal(r.code, 2, r.stderr)
    assert.match(r.stderr, /plain-text NBD is served only on loopback and unix sockets/)
  })
})

describe('a cluster on mutual TLS', () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode
  let nbdPort: number
  let dir: string
  const SIZE = 8 * MB

  before(async () => {
    nbdPort = await freePort()
    cluster = await Cluster.start({ nodes: 2, nbd: [0] })
    ;[A, B] = cluster.nodes as [TestNode, TestNode]
    dir = await mkdtemp(join(tmpdir(), 'ukai-tls-'))
    const ca = cluster.tlsCa!
    assert.equal((await ukai('cert', 'client', 'hv1', '--ca', ca, '--out', join(dir, 'hv'))).code, 0)
    await issueNodeCert(ca, '127.0.0.1:1', join(dir, 'third'))
    // Another CA's certificates, next to this cluster's CA certificate (they pass nobody's check).
    assert.equal((await ukai('cert', 'ca', join(dir, 'evil-ca'))).code, 0)
    await issueNodeCert(join(dir, 'evil-ca'), A.id, join(dir, 'fake-a'))
    await cp(join(ca, 'ca-cert.pem'), join(dir, 'fake-a', 'ca-cert.pem'))
    assert.equal((await ukai('cert', 'client', 'hv1', '--ca', join(dir, 'evil-ca'), '--out', join(dir, 'evil-hv'))).code, 0)
    await cp(join(ca, 'ca-cert.pem'), join(dir, 'evil-hv', 'ca-cert.pem'))
    await A.cliOk('image', 'create', 'vm', '-s', '8M', '-b', '1M', '-l', A.id, '-l', B.id)
    // A's NBD export for hypervisors, on TCP: TLS only.
    await A.stop()
    A.extraArgs = ['--nbd', `127.0.0.1:${nbdPort}`]
    await A.launch()
  })
  after(async () => {
    await cluster?.destroy()
    await rm(dir, { recursive: true, force: true })
  })

  const tlsObject = (d: string): string => `tls-creds-x509,id=tls0,dir=${d},endpoint=client`
  const imageOpts = `driver=nbd,host=127.0.0.1,port=${0},export=vm,tls-creds=tls0`

  test('qemu-io writes and reads over TLS; the writes reach B through the peer port over TLS', async () => {
    const opts = imageOpts.replace('port=0', `port=${nbdPort}`)
    const r = await run('qemu-io', ['--object', tlsObject(join(dir, 'hv')), '--image-opts', opts,
      '-c', 'write -P 0x5a 0 3M', '-c', 'write -P 0xa5 5M 1M', '-c', 'flush', '-c', 'read -P 0x5a 0 3M'])
    assert.equal(r.code, 0, r.stdout + r.stderr)
    assert.doesNotMatch(r.stdout, /Pattern verification failed/)
    const model = Buffer.alloc(SIZE)
    model.fill(0x5a, 0, 3 * MB)
    model.fill(0xa5, 5 * MB, 6 * MB)
    // Both replicas in sync, the same bytes on both nodes.
    assert.deepEqual(await cluster.checkReplicas('vm', model), [])
    const info = JSON.parse(await A.cliOk('image', 'info', 'vm', '--json')) as { locations: Record<string, { out_of_sync: unknown[] }> }
    for (const [loc, st] of Object.entries(info.locations)) assert.deepEqual(st.out_of_sync, [], `${loc} out of sync`)
  })

  test('qemu-img, nbdinfo and nbdcopy over TLS', async () => {
    const opts = imageOpts.replace('port=0', `port=${nbdPort}`)
    let r = await run('qemu-img', ['info', '--object', tlsObject(join(dir, 'hv')), '--image-opts', opts])
    assert.equal(r.code, 0, r.stderr)
    assert.match(r.stdout, /virtual size: 8 MiB/)
    const uri = `nbds://127.0.0.1:${nbdPort}/vm?tls-certificates=${join(dir, 'hv')}`
    r = await run('nbdinfo', [uri])
    assert.equal(r.code, 0, r.stderr)
    assert.match(r.stdout, /with TLS/)
    const out = join(dir, 'copy.raw')
    r = await run('nbdcopy', [uri, out])
    assert.equal(r.code, 0, r.stderr)
    const copy = await readFile(out)
    assert.equal(copy.length, SIZE)
    assert.ok(copy.subarray(0, 3 * MB).equals(Buffer.alloc(3 * MB, 0x5a)))
  })

  test('the TCP NBD export refuses plain text, no certificate and another CA\'s certificate', async () => {
    let r = await run('qemu-img', ['info', `nbd://127.0.0.1:${nbdPort}/vm`])
    assert.notEqual(r.code, 0)
    assert.match(r.stderr, /speaks only TLS/)
    const noCert = join(dir, 'no-cert')
    await cp(join(dir, 'hv', 'ca-cert.pem'), join(noCert, 'ca-cert.pem'))
    r = await run('nbdinfo', [`nbds://127.0.0.1:${nbdPort}/vm?tls-certificates=${noCert}`])
    assert.notEqual(r.code, 0, 'a client without a certificate was served')
    r = await run('nbdinfo', [`nbds://127.0.0.1:${nbdPort}/vm?tls-certificates=${join(dir, 'evil-hv')}`])
    assert.notEqual(r.code, 0, "a client with another CA's certificate was served")
  })

  test('the peer port: plain text, a hypervisor, and a forged node id are refused; a node reads', async () => {
    // Plain text: NBD_REP_ERR_TLS_REQD.
    await assert.rejects(peer(B, 'replica/vm'), /speaks only TLS/)
    // A hypervisor's certificate is for the NBD export only.
    await assert.rejects(peer(B, 'replica/vm', await credentials(join(dir, 'hv'), 'client')), /serves only nodes of this cluster/)
    // A's id in a certificate of another CA: the TLS handshake fails.
    await assert.rejects(peer(B, 'replica/vm', await credentials(join(dir, 'fake-a'), 'node')))
    // A node of the cluster reads B's replica.
    const c = await peer(B, 'replica/vm', await credentials(join(dir, 'third'), 'node', B.id))
    try {
      const buf = Buffer.alloc(4096)
      await c.read(0, buf)
      assert.ok(buf.equals(Buffer.alloc(4096, 0x5a)))
      assert.ok(c.secure)
    } finally { await c.close() }
  })

  test("only the writer's node writes: another node of the cluster asking for the writer's generation is refused", async () => {
    // A hypervisor holds the writer lease on A while this runs.
    const opts = imageOpts.replace('port=0', `port=${nbdPort}`)
    const qemu = await import('node:child_process').then((cp) => cp.spawn('qemu-io', ['--object', tlsObject(join(dir, 'hv')), '--image-opts', opts], { stdio: ['pipe', 'pipe', 'pipe'] }))
    try {
      qemu.stdin.write('write -P 0x11 1M 4k\n')
      let info: { writer: { node: string, generation: number } | null } = { writer: null }
      for (let i = 0; i < 100 && info.writer === null; i++) {
        info = JSON.parse(await A.cliOk('image', 'info', 'vm', '--json'))
        if (info.writer === null) await new Promise((r) => setTimeout(r, 100))
      }
      assert.equal(info.writer?.node, A.id)
      const third = await credentials(join(dir, 'third'), 'node', B.id)
      await assert.rejects(peer(B, `replica/vm@${info.writer.generation}`, third), /node 127\.0\.0\.1:1 asked to write as generation \d+, which is node 127\.0\.0\.1:\d+'s/)
      // B's replica holds what the writer wrote, and nothing else.
      qemu.stdin.write('flush\n')
    } finally {
      qemu.stdin.end('quit\n')
      await new Promise((r) => qemu.once('close', r))
    }
    const model = Buffer.alloc(SIZE)
    model.fill(0x5a, 0, 3 * MB)
    model.fill(0x11, MB, MB + 4096)
    model.fill(0xa5, 5 * MB, 6 * MB)
    assert.deepEqual(await cluster.checkReplicas('vm', model), [])
  })

  test('option haggling on a TLS-only listener: NBD_REP_ERR_TLS_REQD until NBD_OPT_STARTTLS; unix sockets stay plain text', async () => {
    for (const port of [nbdPort, A.config.proxy_port as number]) {
      const c = await TestClient.connect({ host: '127.0.0.1', port })
      try {
        await c.greet()
        assert.equal((await c.option(NBD_OPT_LIST))[0]!.type, NBD_REP_ERR_TLS_REQD)
        assert.equal((await c.option(NBD_OPT_INFO, Buffer.from([0, 0, 0, 2, 0x76, 0x6d, 0, 0])))[0]!.type, NBD_REP_ERR_TLS_REQD)
        // "The client MUST NOT send any data with this option."
        assert.equal((await c.option(NBD_OPT_STARTTLS, Buffer.from('x')))[0]!.type, NBD_REP_ERR_INVALID)
        assert.equal((await c.option(NBD_OPT_ABORT))[0]!.type, NBD_REP_ACK)
      } finally { c.socket.destroy() }
      // NBD_OPT_EXPORT_NAME has no error reply: the connection ends.
      const d = await TestClient.connect({ host: '127.0.0.1', port })
      await d.greet()
      d.write(Buffer.concat([Buffer.from('49484156454f5054', 'hex'), Buffer.from([0, 0, 0, NBD_OPT_EXPORT_NAME, 0, 0, 0, 2]), Buffer.from('vm')]))
      await d.closed
    }
    const u = await TestClient.connect(A.nbdSocket!)
    try {
      await u.greet()
      assert.equal((await u.option(NBD_OPT_STARTTLS))[0]!.type, NBD_REP_ERR_UNSUP)
    } finally { u.socket.destroy() }
  })

  test('the control API is HTTPS with the node certificate: the token never crosses in clear', async () => {
    const { request: httpRequest } = await import('node:http')
    const { request: httpsRequest } = await import('node:https')
    const token = (await A.cliOk('control-token')).trim()
    // Plain HTTP gets no answer from the API.
    const plain = await new Promise<string>((resolve) => {
      const req = httpRequest({ host: '127.0.0.1', port: A.controlPort, path: '/v1/ping', headers: { authorization: `Bearer ${token}` } }, (res) => resolve(`HTTP ${res.statusCode ?? '?'}`))
      req.on('error', (err) => resolve(`error ${err.message}`))
      req.end()
    })
    assert.doesNotMatch(plain, /HTTP 200/)
    // HTTPS trusting the cluster CA, the certificate A's.
    const ca = await readFile(join(cluster.tlsCa!, 'ca-cert.pem'))
    const answer = await new Promise<{ status: number, body: string, subject: string }>((resolve, reject) => {
      const req = httpsRequest({ host: '127.0.0.1', port: A.controlPort, path: '/v1/ping', ca, checkServerIdentity: () => undefined, headers: { authorization: `Bearer ${token}` } }, (res) => {
        const chunks: Buffer[] = []
        const subject = String((res.socket as import('node:tls').TLSSocket).getPeerCertificate().subject.CN) as string
        res.on('data', (c: Buffer) => chunks.push(c))
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString(), subject }))
      })
      req.on('error', reject)
      req.end()
    })
    assert.equal(answer.status, 200, answer.body)
    assert.equal(answer.subject, A.id)
    assert.equal((JSON.parse(answer.body) as { id: string }).id, A.id)
  })

  test('a node checks that the server at a location is that node', async () => {
    // Asking A's port while expecting B: A's certificate names A.
    const wrong = await credentials(join(dir, 'third'), 'node', B.id)
    await assert.rejects(peer(A, 'replica/vm', wrong), new RegExp(`presented the certificate of node ${A.id.replace(/\./g, '\\.')}, not node ${B.id.replace(/\./g, '\\.')}'s`))
  })

  test('random data through a TLS peer: 2 MiB written on A reads back the same from B alone', async () => {
    const data = randomBytes(2 * MB)
    const file = join(dir, 'data.raw')
    await writeFile(file, data)
    // Copy the file in through the TLS export.
    const r = await run('nbdcopy', [file, `nbds://127.0.0.1:${nbdPort}/vm?tls-certificates=${join(dir, 'hv')}`])
    assert.equal(r.code, 0, r.stderr)
    const c = await peer(B, 'replica/vm', await credentials(join(dir, 'third'), 'node', B.id))
    try {
      const buf = Buffer.alloc(2 * MB)
      await c.read(0, buf)
      assert.ok(buf.equals(data))
    } finally { await c.close() }
  })
})
