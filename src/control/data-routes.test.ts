/**
 * The extents route on a large image (a real node and its control API in
 * this process): the control-api-large fuzz target's finding, an extents
 * request without a length on 1 TiB of 4 KiB blocks (2^28 blocks), which
 * built a piece per block and ran the process out of memory. The walk is
 * bounded to MAX_EXTENT_BLOCKS blocks; past them the answer says data.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { request } from 'node:http'
import type { Extent } from '../volume/volume.js'
import { MAX_EXTENT_BLOCKS } from './data-routes.js'
import { startControlNode, type ControlNode } from '../../test/helpers/control-node.js'

const BS = 4096
const SIZE = 2 ** 40

describe('extents of a large image', () => {
  let api: ControlNode

  const call = async (method: string, path: string, body?: Buffer): Promise<{ status: number, body: Buffer }> => await new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port: api.port, method, path, headers: { authorization: `Bearer ${api.token}`, ...(body !== undefined ? { 'content-type': 'application/octet-stream', 'content-length': body.length } : {}) } }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }))
    })
    req.on('error', reject)
    req.setTimeout(60_000, () => req.destroy(new Error(`${method} ${path}: no answer in 60 s`)))
    req.end(body)
  })
  const extents = async (query: string): Promise<Extent[]> => {
    const r = await call('GET', `/v1/images/big/extents${query}`)
    assert.equal(r.status, 200, r.body.toString('utf8').slice(0, 300))
    return JSON.parse(r.body.toString('utf8')) as Extent[]
  }

  before(async () => {
    api = await startControlNode('ukai-extents-')
    await api.node.createImage({ name: 'big', size: SIZE, block_size: BS })
    // Data in one block inside the walk, one past it, and the last block (used_size reaches the end).
    for (const block of [MAX_EXTENT_BLOCKS / 2, MAX_EXTENT_BLOCKS * 3 / 2, SIZE / BS - 1]) {
      const r = await call('PUT', `/v1/images/big/data?offset=${block * BS}`, Buffer.alloc(BS, 7))
      assert.equal(r.status, 200, r.body.toString('utf8'))
    }
  })
  after(async () => { await api?.close() })

  test('the whole image, no length: answered, the first MAX_EXTENT_BLOCKS blocks in detail, data past them, the range tiled', async () => {
    const list = await extents('')
    const walked = MAX_EXTENT_BLOCKS * BS
    const data = MAX_EXTENT_BLOCKS / 2 * BS
    assert.deepEqual(list, [
      { offset: 0, length: data, hole: true, zero: true },
      { offset: data, length: BS, hole: false, zero: false },
      { offset: data + BS, length: walked - data - BS, hole: true, zero: true },
      { offset: walked, length: SIZE - walked, hole: false, zero: false }
    ])
  })

  test('asked MAX_EXTENT_BLOCKS blocks at a time (as the export does), every extent is exact', async () => {
    const from = MAX_EXTENT_BLOCKS * BS
    const list = await extents(`?offset=${from}&length=${from}`)
    const data = MAX_EXTENT_BLOCKS * 3 / 2 * BS
    assert.deepEqual(list, [
      { offset: from, length: data - from, hole: true, zero: true },
      { offset: data, length: BS, hole: false, zero: false },
      { offset: data + BS, length: 2 * from - data - BS, hole: true, zero: true }
    ].filter((e) => e.length > 0))
    const end = await extents(`?offset=${SIZE - 2 * BS}&length=${2 * BS}`)
    assert.deepEqual(end, [{ offset: SIZE - 2 * BS, length: BS, hole: true, zero: true }, { offset: SIZE - BS, length: BS, hole: false, zero: false }])
  })
})
