/**
 * NBD and the FUSE mount are two doors to one volume: data written through
 * one reads back identical through the other, in a real server process.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { open, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { TestNode, run } from './helpers/node-process.js'

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

describe('NBD export and FUSE mount of one node', () => {
  let node: TestNode
  before(async () => { node = await TestNode.start({ mount: true, nbd: true }) })
  after(async () => { await node?.destroy() })

  test('written through NBD (qemu-img convert), read back identical through the mount; and the other way (nbdcopy)', async () => {
    const size = 24 * 2 ** 20
    // Imported with 3,000,000-byte blocks: block edges off page boundaries.
    const imported = await node.api('POST', '/v1/images/import', {
      format: 1, name: 'shared', size, block_size: 3_000_000, used_size: size, hypervisors: [],
      locations: { [node.id]: { blocks: [[0, Math.ceil(size / 3_000_000)]], out_of_sync: [] } }
    })
    assert.equal(imported.status, 201, JSON.stringify(imported.body))
    const src = join(node.dir, 'src.raw')
    const data = randomBytes(size)
    await writeFile(src, data)
    const uri = `nbd+unix:///shared?socket=${node.nbdSocket!}`
    const conv = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri])
    assert.equal(conv.code, 0, conv.stderr)
    assert.equal(sha(await readFile(join(node.mountpoint!, 'shared'))), sha(data))

    // Now through the mount, and out through NBD.
    const patch = randomBytes(5_000_000)
    const fh = await open(join(node.mountpoint!, 'shared'), 'r+')
    await fh.write(patch, 0, patch.length, 2_999_000)
    await fh.close()
    patch.copy(data, 2_999_000)
    const out = join(node.dir, 'out.raw')
    const copy = await run('nbdcopy', [uri, out])
    assert.equal(copy.code, 0, copy.stderr)
    assert.equal(sha(await readFile(out)), sha(data))
  })
})
