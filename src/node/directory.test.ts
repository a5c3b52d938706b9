/**
 * The RTT answer's bound (NodeDirectory.recentRtt, rtt): a real node and
 * its control API in this process, and a second registered node that is a
 * small HTTP server of the test's own on loopback, counting the probes it
 * gets. However often GET /v1/nodes/rtt is asked, the node probes each
 * node at most once per freshness period, and concurrent requests share
 * one round.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { createServer, request, type Server } from 'node:http'
import type { Lease } from '../metadata/core.js'
import type { UkaiNode } from './node.js'
import { RTT_FRESH_MS } from './directory.js'
import { startControlNode, type ControlNode } from '../../test/helpers/control-node.js'
import { freePort } from '../../test/helpers/node-process.js'

const PEER = '127.0.0.1:1'

async function get (port: number, path: string, token: string): Promise<unknown> {
  return await new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, method: 'GET', path, headers: { authorization: `Bearer ${token}` } }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8')
        if (res.statusCode !== 200) reject(new Error(`GET ${path}: ${res.statusCode ?? '?'} ${text}`))
        else resolve(JSON.parse(text))
      })
    })
    req.on('error', reject)
    req.setTimeout(10_000, () => req.destroy(new Error(`GET ${path}: no answer in 10 s`)))
    req.end()
  })
}

type Row = { id: string, alive: boolean, reachable: boolean, rtt_ms?: Record<string, number>, error?: string }

describe('RTT between nodes: bounded probes', () => {
  let api: ControlNode
  let node: UkaiNode
  let port: number
  let token: string
  let peer: Server
  let lease: Lease
  /** Probes (GET /v1/ping) and RTT asks (GET /v1/rtt) the peer got. */
  const seen = { ping: 0, rtt: 0 }

  before(async () => {
    api = await startControlNode('ukai-rtt-')
    ;({ node, port, token } = api)
    peer = createServer((req, res) => {
      res.setHeader('content-type', 'application/json')
      if (req.url === '/v1/ping') { seen.ping++; res.end(JSON.stringify({ id: PEER, time: Date.now() })); return }
      if (req.url === '/v1/node') { res.end(JSON.stringify({ id: PEER, capacity: { total: 1, free: 1, available: 1 }, open_images: [] })); return }
      if (req.url === '/v1/rtt') { seen.rtt++; res.end(JSON.stringify({ node: PEER, measured: Date.now(), rtt_ms: { [PEER]: 0.5 }, errors: {} })); return }
      res.statusCode = 404
      res.end(JSON.stringify({ error: { code: 'UKAI_ERR_NOT_FOUND', message: 'no such API path', details: {} } }))
    })
    const peerPort = await freePort()
    await new Promise<void>((resolve) => peer.listen(peerPort, '127.0.0.1', resolve))
    lease = await node.images.store.grantLease(30)
    const r = await node.images.store.registerNode({ id: PEER, control_address: '127.0.0.1', control_port: peerPort, started: new Date().toISOString() }, lease)
    assert.equal(r.registered, true)
  })
  after(async () => {
    await lease?.revoke().catch(() => {})
    await new Promise<void>((resolve) => peer?.close(() => resolve()))
    await api?.close()
  })

  test('two quick GET /v1/nodes/rtt, then two at once, make one round of probes; the answer keeps its shape', async () => {
    assert.ok(RTT_FRESH_MS >= 1000, 'the period is long enough for the calls below')
    const d = node.images.directory
    const rounds = d.rttRounds
    const first = await get(port, '/v1/nodes/rtt', token) as Row[]
    const second = await get(port, '/v1/nodes/rtt', token) as Row[]
    const [third, fourth] = await Promise.all([get(port, '/v1/nodes/rtt', token), get(port, '/v1/nodes/rtt', token)]) as Row[][]
    assert.equal(seen.ping, 1, 'the peer was probed once')
    assert.equal(d.rttRounds - rounds, 1, 'one round of probes')
    for (const rows of [first, second, third!, fourth!]) {
      assert.deepEqual(rows.map((r) => r.id).sort(), [node.config.id, PEER].sort())
      const self = rows.find((r) => r.id === node.config.id)!
      assert.equal(self.reachable, true, JSON.stringify(self))
      assert.deepEqual(Object.keys(self.rtt_ms!).sort(), [node.config.id, PEER].sort())
      for (const v of Object.values(self.rtt_ms!)) assert.ok(typeof v === 'number' && v >= 0)
      assert.deepEqual(rows.find((r) => r.id === PEER), { id: PEER, alive: true, reachable: true, rtt_ms: { [PEER]: 0.5 } })
    }
    // The same measurements in all four answers: none was probed again.
    assert.deepEqual(second, first)
    assert.deepEqual(fourth, third)
    assert.deepEqual(third, first)
  })

  test('once the measurements are stale a request probes again, and concurrent ones share that round', async () => {
    const d = node.images.directory
    d.rttFreshMs = 0
    try {
      const pings = seen.ping
      const rounds = d.rttRounds
      const [a, b] = await Promise.all([d.recentRtt(), d.recentRtt()])
      assert.equal(a, b, 'one round for both')
      assert.equal(seen.ping - pings, 1)
      assert.equal(d.rttRounds - rounds, 1)
      await d.recentRtt()
      assert.equal(seen.ping - pings, 2, 'stale: probed again')
    } finally {
      d.rttFreshMs = RTT_FRESH_MS
    }
  })

  test("GET /v1/nodes's probes are a round of measurements: /v1/rtt answers them without probing", async () => {
    const d = node.images.directory
    d.rttFreshMs = 0
    await d.recentRtt()
    d.rttFreshMs = RTT_FRESH_MS
    const pings = seen.ping
    const rounds = d.rttRounds
    const list = await get(port, '/v1/nodes', token) as Array<{ id: string, rtt_ms?: number }>
    assert.equal(seen.ping - pings, 1, 'GET /v1/nodes probes every node, as before')
    const mine = await get(port, '/v1/rtt', token) as { node: string, measured: number, rtt_ms: Record<string, number>, errors: Record<string, string> }
    assert.equal(seen.ping - pings, 1, 'no new probe')
    assert.equal(d.rttRounds, rounds)
    assert.equal(mine.node, node.config.id)
    assert.deepEqual(mine.errors, {})
    assert.deepEqual(mine.rtt_ms, Object.fromEntries(list.map((n) => [n.id, n.rtt_ms])))
  })
})
