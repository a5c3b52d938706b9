/**
 * nbd-server: a real NbdServer (server.ts, connection.ts, handshake.ts,
 * transmission.ts) on a real node in this process (test/helpers/nbd.ts
 * startNbd), over a unix socket. Each case is one connection: random or
 * mutated handshakes, or a valid handshake followed by random or mutated
 * request frames, sent in random pieces; the client then half-closes (or
 * vanishes). Every so often, and at the end, a well-formed client must
 * be served (write, flush, read back, block status) with every fuzzed
 * connection gone and the fuzzed image released.
 */
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import fc from 'fast-check'
import { TestClient, descriptors, enterTransmission, sendInPieces, startNbd, until, type NbdFixture } from '../../helpers/nbd.js'
import { NBD_CMD_BLOCK_STATUS, NBD_CMD_FLUSH } from '../../../src/frontends/nbd/protocol.js'
import { crash, hang, violation, type Target } from '../harness.js'
import { hex } from '../gen.js'
import { optionStream } from './nbd-options.js'
import { requestStream } from './nbd-requests.js'

const SIZE = 1 << 20
const BLOCK = 64 * 1024

/** The handshake of a client that enters transmission on 'fuzz'. */
const enter = (structured: boolean, byName: boolean): Buffer => enterTransmission('fuzz', structured, byName)

export interface ServerInput {
  bytes: Buffer
  /** Sizes of the pieces sent one by one; the rest goes in one. */
  pieces: number[]
  /** How the client leaves: half-close and wait for the server to close, or vanish. */
  leave: 'end' | 'destroy'
}

const inputArb: fc.Arbitrary<ServerInput> = fc.record({
  bytes: fc.oneof(
    { arbitrary: optionStream, weight: 1 },
    { arbitrary: fc.tuple(fc.boolean(), fc.boolean(), requestStream(SIZE)).map(([s, n, tail]) => Buffer.concat([enter(s, n), tail])), weight: 2 }
  ),
  pieces: fc.array(fc.integer({ min: 1, max: 64 }), { maxLength: 6 }),
  leave: fc.oneof({ arbitrary: fc.constant('end' as const), weight: 5 }, { arbitrary: fc.constant('destroy' as const), weight: 1 })
})

interface Ctx { fx: NbdFixture, warnings: string[] }

export const nbdServer: Target<ServerInput, Ctx> = {
  name: 'nbd-server',
  summary: 'a real NbdServer on a real node in-process (test/helpers/nbd.ts startNbd), over a unix socket: random/mutated handshakes, or a valid handshake then random/mutated requests, in random pieces; then a well-formed client',
  contract: 'crash: the node reports an internal error (a "warning": an exception while serving a connection), or the process dies; hang: the server keeps the connection open 10 s after the client half-closed (case limit 15 s), or the well-formed client is not served; violation: after the storm a connection is left open, the fuzzed image is not released, or the well-formed client reads back other data',
  defaultCases: 30_000,
  shardSize: 15_000,
  msPerCase: 4.5,
  cpuShare: 0.7,
  caseTimeoutMs: 15_000,
  sliceCases: 60,
  checkEvery: 1000,
  arbitrary: inputArb,
  setup: async () => {
    const fx = await startNbd()
    const warnings: string[] = []
    fx.node.on('warning', (m: string) => warnings.push(m))
    await fx.node.createImage({ name: 'fuzz', size: SIZE, block_size: BLOCK })
    await fx.node.createImage({ name: 'disk', size: SIZE, block_size: BLOCK })
    return { fx, warnings }
  },
  run: async ({ bytes, pieces, leave }, { fx, warnings }, { signal }) => {
    const { socket: s, closed } = await sendInPieces(fx.socket, bytes, pieces, leave === 'end' ? 'end' : 'destroy', signal)
    let timer: NodeJS.Timeout | undefined
    try {
      await Promise.race([closed, new Promise((_resolve, reject) => {
        timer = setTimeout(() => reject(hang('the server kept the connection open 10 s after the client half-closed')), 10_000)
      })])
    } finally {
      clearTimeout(timer)
      s.destroy()
    }
    if (warnings.length > 0) {
      const w = warnings.splice(0)
      throw crash(`the node reported an internal error: ${w[0]!.split('\n').slice(0, 3).join(' | ')}`)
    }
  },
  check: async ({ fx, warnings }) => {
    try {
      await until(() => fx.server.connectionCount === 0, 'every fuzzing connection to end', 10_000)
    } catch {
      throw violation(`${fx.server.connectionCount} fuzzing connection(s) still open 10 s after their clients left`)
    }
    try {
      await until(() => !fx.node.isOpen('fuzz'), 'the fuzzed image to be released', 10_000)
    } catch {
      throw violation('the fuzzed image is still open after every client left')
    }
    if (warnings.length > 0) throw crash(`the node reported an internal error: ${warnings.splice(0)[0]!.split('\n')[0]}`)
    const c = await TestClient.connect(fx.socket)
    try {
      await c.greet()
      await c.go('disk')
      const data = randomBytes(3 * BLOCK + 5)
      assert.equal((await c.writeAt(BLOCK - 7, data)).error, 0)
      assert.equal((await c.send(NBD_CMD_FLUSH)).error, 0)
      const r = await c.read(BLOCK - 7, data.length)
      if (r.data?.equals(data) !== true) throw violation('the well-formed client read back other data than it wrote')
      const st = await c.send(NBD_CMD_BLOCK_STATUS, { offset: 0, length: SIZE })
      if (st.error !== 0 || descriptors(st).length === 0) throw violation(`BLOCK_STATUS for the well-formed client failed (error ${st.error})`)
    } finally { await c.close() }
  },
  teardown: async ({ fx }) => { await fx.cleanup() },
  show: (i) => `${hex(i.bytes, 300)}; pieces ${JSON.stringify(i.pieces)}; client ${i.leave === 'end' ? 'half-closes' : 'vanishes'}`
}
