/**
 * What the full fuzz run (`npm run fuzz`, fuzz/results/latest.md) found,
 * each minimal counterexample kept as a test of its own: a real node and
 * its control API in this process.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { request } from 'node:http'
import { importAny } from '../src/metadata/codec.js'
import type { UkaiNode } from '../src/node/node.js'
import { startControlNode, type ControlNode } from './helpers/control-node.js'

interface Answer { status: number, body: { error?: { code: string, message: string, details: Record<string, unknown> } } & Record<string, unknown> }

let token = ''

async function call (port: number, method: string, path: string, body: string): Promise<Answer> {
  return await new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, method, path, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), authorization: `Bearer ${token}` } }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8')
        try {
          resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) })
        } catch {
          reject(new Error(`${method} ${path}: ${res.statusCode ?? '?'} is not JSON: ${text.slice(0, 200)}`))
        }
      })
    })
    req.on('error', reject)
    // An answer that never comes fails the test, not the run.
    req.setTimeout(10_000, () => req.destroy(new Error(`${method} ${path}: no answer in 10 s`)))
    req.end(body)
  })
}

describe('fuzz findings, kept', () => {
  let api: ControlNode
  let node: UkaiNode
  let port: number

  before(async () => {
    api = await startControlNode('ukai-findings-')
    ;({ node, port, token } = api)
    await node.createImage({ name: 'fx', size: 1 << 20, block_size: 1 << 16 })
  })
  after(async () => { await api?.close() })

  test('a refresh to a revision the image never had is refused as bad input (was 500 UKAI_ERR_INTERNAL)', async () => {
    const r = await call(port, 'POST', '/v1/images/fx/refresh', '{"revision":2147483648}')
    assert.equal(r.status, 400, JSON.stringify(r.body))
    assert.equal(r.body.error?.code, 'UKAI_ERR_INVALID_ARGUMENT')
    assert.match(r.body.error!.message, /revision 2147483648 was never written/)
    // A revision it has reached is answered.
    const ok = await call(port, 'POST', '/v1/images/fx/refresh', '{"revision":1}')
    assert.equal(ok.status, 200, JSON.stringify(ok.body))
  })

  test('an image name nested 4,112 lists deep gets a 400 with its error body (was a stack overflow while sending the error)', async () => {
    const name = '['.repeat(4112) + '0' + ']'.repeat(4112)
    const r = await call(port, 'POST', '/v1/images', `{"name":${name},"size":4096,"locations":[]}`)
    assert.equal(r.status, 400, JSON.stringify(r.body).slice(0, 300))
    assert.equal(r.body.error?.code, 'UKAI_ERR_INVALID_NAME')
    assert.match(r.body.error!.message, /invalid image name \(a list nested too deeply to show\)/)
    assert.deepEqual(node.imageNames(), ['fx'])
  })

  test('an image of 2^28 blocks (1 TiB of 4 KiB): its per-block export is refused as too big, remove-location works range by range (both held the event loop for good)', async () => {
    await node.createImage({ name: 'big', size: 2 ** 40, block_size: 4096 })
    const far = '127.0.0.1:1'
    await node.images.addLocation('big', far, 0, 2 ** 28)
    for (const format of ['seed', 'ukai']) {
      const r = await call(port, 'GET', `/v1/images/big?format=${format}`, '')
      assert.equal(r.status, 413, JSON.stringify(r.body))
      assert.equal(r.body.error?.code, 'UKAI_ERR_TOO_BIG')
      assert.match(r.body.error!.message, /268435456 blocks; the '(seed|ukai)' format lists every block and is limited to 1048576 \(use the stored format\)/)
    }
    const stored = await call(port, 'GET', '/v1/images/big?format=stored', '')
    assert.equal(stored.status, 200)
    // The far copy is not in sync yet: the local one cannot go, and the first block it alone holds is named.
    const refused = await call(port, 'DELETE', '/v1/images/big/locations', JSON.stringify({ location: node.config.id }))
    assert.equal(refused.status, 403, JSON.stringify(refused.body))
    assert.match(refused.body.error!.message, /would leave block 0 of image 'big' without an in-sync replica/)
    const gone = await call(port, 'DELETE', '/v1/images/big/locations', JSON.stringify({ location: far }))
    assert.equal(gone.status, 200, JSON.stringify(gone.body))
    assert.deepEqual([...(await node.images.info('big')).locations.keys()], [node.config.id])
    await node.images.destroy('big')
  })

  test('a stored document with a location that holds no block imports as the per-block formats see it: without that location', () => {
    const meta = importAny({
      format: 1,
      name: 'vm01',
      size: 1,
      block_size: 1,
      used_size: 0,
      hypervisors: ['10.0.0.9'],
      revision: 3,
      locations: { '10.0.0.1': { blocks: [[0, 1]], out_of_sync: [] }, '[::1]:5': { blocks: [], out_of_sync: [] } }
    }, 22222)
    assert.deepEqual([...meta.locations.keys()], ['10.0.0.1'])
    // A bad name is refused all the same, with or without blocks.
    assert.throws(() => importAny({ format: 1, name: 'vm01', size: 1, block_size: 1, locations: { '10.0.0.1': { blocks: [[0, 1]] }, 'a/b': { blocks: [] } } }, 22222),
      (err: Error & { code?: string }) => err.code === 'UKAI_ERR_INVALID_METADATA')
  })
})
