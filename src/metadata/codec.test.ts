import { test, describe } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import fc from 'fast-check'
import { UkaiError } from '../errors.js'
import {
  STORED_FORMAT_VERSION, decodeStored, encodeStored, exportPerBlock, importAny, importPerBlock, type StoredImage
} from './codec.js'
import { ImageMeta } from './image.js'

const PORT = 22222
// dist/src/metadata/ -> repository root.
const SEED = JSON.parse(readFileSync(new URL('../../../test/fixtures/seed-image01.json', import.meta.url), 'utf8')) as Record<string, unknown>

const clone = <T>(v: T): T => structuredClone(v)

/** Asserts `fn` throws UKAI_ERR_INVALID_METADATA with a message matching `message`. */
function invalid (fn: () => unknown, message: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof UkaiError, `expected a UkaiError, got ${String(err)}`)
    assert.equal(err.code, 'UKAI_ERR_INVALID_METADATA', err.message)
    assert.match(err.message, message)
    return true
  })
}

/** A per-block document in the later spelling. */
function ukaiDoc (blocks: Array<Record<string, number>>, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    name: 'vm1',
    // A last partial block, except for a single block (block_size may not exceed size).
    size: blocks.length === 1 ? 100 : blocks.length * 100 - 30,
    block_size: 100,
    used_size: 42,
    hypervisors: ['10.0.0.1', '10.0.0.2:7000'],
    blocks: blocks.map((b) => Object.fromEntries(Object.entries(b).map(([loc, s]) => [loc, { sync_status: s }]))),
    ...extra
  }
}

describe('seed format', () => {
  test('the seed README example imports', () => {
    const meta = importPerBlock(clone(SEED), PORT)
    assert.equal(meta.name, 'image01')
    assert.equal(meta.size, 8000000000)
    assert.equal(meta.blockSize, 50000000)
    assert.equal(meta.blockCount, 160)
    assert.equal(meta.usedSize, 8000000000)
    assert.deepEqual(meta.hypervisors, [])
    assert.deepEqual([...meta.locations.keys()], ['192.168.0.100'])
    const st = meta.locations.get('192.168.0.100')!
    assert.deepEqual(st.blocks.toJSON(), [[0, 160]])
    assert.deepEqual(st.outOfSync.toJSON(), [])
    for (let i = 0; i < 160; i++) assert.deepEqual(meta.replicasOf(i), [{ location: '192.168.0.100', inSync: true }])
    assert.equal(meta.blockLength(159), 50000000)
  })

  test("exportPerBlock(meta, 'seed') gives back the fixture exactly", () => {
    const meta = importPerBlock(clone(SEED), PORT)
    assert.deepEqual(exportPerBlock(meta, 'seed'), SEED)
    assert.deepEqual(exportPerBlock(importAny(clone(SEED), PORT), 'seed'), SEED)
  })

  test('synced false imports as out of sync and exports back', () => {
    const doc = clone(SEED) as { blocks: Array<Record<string, { synced: boolean }>> }
    doc.blocks[3] = { '192.168.0.100': { synced: false }, '192.168.0.101:22223': { synced: true } }
    const meta = importPerBlock(doc, PORT)
    assert.deepEqual(meta.replicasOf(3), [
      { location: '192.168.0.100', inSync: false },
      { location: '192.168.0.101:22223', inSync: true }
    ])
    assert.deepEqual(meta.locations.get('192.168.0.100')!.outOfSync.toJSON(), [[3, 4]])
    assert.deepEqual(exportPerBlock(meta, 'seed'), doc)
  })

  test('a last partial block', () => {
    const meta = importPerBlock({ name: 'p', size: 250, block_size: 100, blocks: [{ h: { synced: true } }, { h: { synced: true } }, { h: { synced: true } }] }, PORT)
    assert.equal(meta.blockCount, 3)
    assert.equal(meta.blockLength(2), 50)
  })
})

describe('later UKAI format', () => {
  test('sync_status, used_size and hypervisors import and export back', () => {
    const doc = ukaiDoc([{ a: 0, b: 0 }, { a: 2, b: 0 }, { a: 0 }, { b: 2 }])
    const meta = importPerBlock(clone(doc), PORT)
    assert.equal(meta.usedSize, 42)
    assert.equal(meta.size, 370)
    assert.deepEqual(meta.hypervisors, ['10.0.0.1', '10.0.0.2:7000'])
    assert.deepEqual(meta.replicasOf(1), [{ location: 'a', inSync: false }, { location: 'b', inSync: true }])
    assert.deepEqual(meta.replicasOf(3), [{ location: 'b', inSync: false }])
    assert.deepEqual(exportPerBlock(meta, 'ukai'), doc)
  })

  test('sync_status 1 (syncing) imports as out of sync and exports as 2', () => {
    const doc = ukaiDoc([{ a: 1, b: 0 }, { a: 0, b: 1 }])
    const meta = importPerBlock(clone(doc), PORT)
    assert.deepEqual(meta.replicasOf(0), [{ location: 'a', inSync: false }, { location: 'b', inSync: true }])
    assert.deepEqual(meta.replicasOf(1), [{ location: 'a', inSync: true }, { location: 'b', inSync: false }])
    const out = exportPerBlock(meta, 'ukai') as { blocks: unknown }
    assert.deepEqual(out.blocks, [
      { a: { sync_status: 2 }, b: { sync_status: 0 } },
      { a: { sync_status: 0 }, b: { sync_status: 2 } }
    ])
    assert.notDeepEqual(out, doc)
  })

  test('hypervisors kept as an object keyed by address (the later spelling) import as a list', () => {
    const doc = ukaiDoc([{ a: 0 }], { size: 100, used_size: 10, hypervisors: { '10.0.0.1': {}, '10.0.0.3': { x: 1 } } })
    const meta = importPerBlock(doc, PORT)
    assert.deepEqual(meta.hypervisors, ['10.0.0.1', '10.0.0.3'])
    assert.deepEqual((exportPerBlock(meta, 'ukai') as { hypervisors: unknown }).hypervisors, ['10.0.0.1', '10.0.0.3'])
  })

  test('duplicate hypervisors are kept once', () => {
    const meta = importPerBlock(ukaiDoc([{ a: 0 }], { size: 100, used_size: 10, hypervisors: ['h1', 'h1', 'h2'] }), PORT)
    assert.deepEqual(meta.hypervisors, ['h1', 'h2'])
  })

  test("the seed export drops used_size and hypervisors; the 'ukai' export of a seed image fills them in", () => {
    const meta = importPerBlock(ukaiDoc([{ a: 0 }, { a: 2 }]), PORT)
    assert.deepEqual(exportPerBlock(meta, 'seed'), {
      name: 'vm1', size: 170, block_size: 100, blocks: [{ a: { synced: true } }, { a: { synced: false } }]
    })
    const seed = importPerBlock(clone(SEED), PORT)
    const u = exportPerBlock(seed, 'ukai') as { used_size: number, hypervisors: string[], blocks: unknown[] }
    assert.equal(u.used_size, 8000000000)
    assert.deepEqual(u.hypervisors, [])
    assert.deepEqual(u.blocks[0], { '192.168.0.100': { sync_status: 0 } })
  })

  test('any per-block placement round-trips through import, stored format and export', () => {
    const locs = ['10.0.0.1', '10.0.0.2:22223', 'node3', '[::1]:9']
    const block = fc.dictionary(fc.constantFrom(...locs), fc.constantFrom(0, 2), { minKeys: 1 })
    fc.assert(fc.property(fc.array(block, { minLength: 1, maxLength: 30 }), fc.integer({ min: 1, max: 100 }), (blocks, tail) => {
      const size = (blocks.length - 1) * 100 + (blocks.length === 1 ? 100 : tail)
      const doc = ukaiDoc(blocks, { size, used_size: Math.min(size, 42) })
      const meta = importPerBlock(clone(doc), PORT)
      assert.deepEqual(exportPerBlock(meta, 'ukai'), doc)
      const stored = JSON.parse(JSON.stringify(encodeStored(meta))) as unknown
      const again = decodeStored(stored, PORT)
      assert.deepEqual(exportPerBlock(again, 'ukai'), exportPerBlock(meta, 'ukai'))
      assert.deepEqual(encodeStored(again), encodeStored(meta))
    }), { numRuns: 200 })
  })
})

describe('stored format', () => {
  function sample (): ImageMeta {
    const meta = new ImageMeta({ name: 'img-1', size: 10_000, blockSize: 1000, usedSize: 2500, hypervisors: ['10.0.0.9'], revision: 7 })
    meta.addLocation('10.0.0.1', 0, 10, true)
    meta.addLocation('10.0.0.2:22223', 0, 4, false)
    meta.addLocation('10.0.0.2:22223', 4, 10, true)
    meta.setSync('10.0.0.1', 6, 8, false)
    return meta
  }

  test('encodes ranges per location and decodes to the same image', () => {
    const meta = sample()
    const stored = encodeStored(meta)
    assert.deepEqual(stored, {
      format: STORED_FORMAT_VERSION,
      name: 'img-1',
      size: 10_000,
      block_size: 1000,
      used_size: 2500,
      hypervisors: ['10.0.0.9'],
      revision: 7,
      locations: {
        '10.0.0.1': { blocks: [[0, 10]], out_of_sync: [[6, 8]] },
        '10.0.0.2:22223': { blocks: [[0, 10]], out_of_sync: [[0, 4]] }
      }
    } satisfies StoredImage)
    // The revision is the store's, not the document's: decoding leaves it 0.
    const back = decodeStored(JSON.parse(JSON.stringify(stored)), PORT)
    assert.deepEqual(encodeStored(back), { ...stored, revision: 0 })
    assert.equal(back.revision, 0)
    assert.deepEqual(back.replicasOf(6), [{ location: '10.0.0.1', inSync: false }, { location: '10.0.0.2:22223', inSync: true }])
    assert.deepEqual(encodeStored(importAny(JSON.parse(JSON.stringify(stored)), PORT)), { ...stored, revision: 0 })
  })

  test('optional keys: out_of_sync, revision (generation in older exports) and hypervisors may be absent', () => {
    const meta = decodeStored({ format: 1, name: 'a', size: 10, block_size: 5, used_size: 0, locations: { h: { blocks: [[0, 2]] } } }, PORT)
    assert.equal(meta.revision, 0)
    assert.deepEqual(meta.hypervisors, [])
    assert.deepEqual(meta.replicasOf(1), [{ location: 'h', inSync: true }])
  })

  test('a 1 TiB image with 1 MiB blocks on one location is small', () => {
    const meta = new ImageMeta({ name: 'big', size: 2 ** 40, blockSize: 2 ** 20 })
    meta.addLocation('192.168.0.100:22222', 0, meta.blockCount, true)
    assert.equal(meta.blockCount, 2 ** 20)
    const text = JSON.stringify(encodeStored(meta))
    assert.ok(text.length < 1024, `stored JSON is ${text.length} bytes`)
    const back = decodeStored(JSON.parse(text), PORT)
    assert.equal(back.blockCount, 2 ** 20)
    assert.deepEqual(back.replicasOf(2 ** 20 - 1), [{ location: '192.168.0.100:22222', inSync: true }])
  })

  test('a 1 TiB image with a few scattered out-of-sync blocks stays small', () => {
    const meta = new ImageMeta({ name: 'big', size: 2 ** 40, blockSize: 2 ** 20 })
    meta.addLocation('10.0.0.1', 0, meta.blockCount, true)
    meta.addLocation('10.0.0.2', 0, meta.blockCount, true)
    for (const b of [5, 6, 7, 1000, 500000]) meta.setSync('10.0.0.2', b, b + 1, false)
    assert.ok(JSON.stringify(encodeStored(meta)).length < 1024)
  })
})

describe('rejections', () => {
  test('block count that does not match ceil(size / block_size)', () => {
    const doc = clone(SEED) as { blocks: unknown[] }
    doc.blocks.pop()
    invalid(() => importPerBlock(doc, PORT), /image 'image01': 'blocks' has 159 entries but size 8000000000 \/ block_size 50000000 needs 160/)
    doc.blocks.push({ '192.168.0.100': { synced: true } }, { '192.168.0.100': { synced: true } })
    invalid(() => importPerBlock(doc, PORT), /'blocks' has 161 entries .* needs 160/)
    invalid(() => importPerBlock({ ...doc, blocks: [] }, PORT), /'blocks' has 0 entries/)
    // One byte more than 160 blocks needs a 161st, partial block.
    invalid(() => importPerBlock({ ...clone(SEED), size: 8000000001 }, PORT), /'blocks' has 160 entries but size 8000000001 \/ block_size 50000000 needs 161/)
    invalid(() => importPerBlock({ ...clone(SEED), block_size: 40000000 }, PORT), /'blocks' has 160 entries .* needs 200/)
  })

  test('size and block_size must be positive integers', () => {
    for (const key of ['size', 'block_size']) {
      for (const v of [0, -1, 1.5, '8000000000', null, true, 2 ** 53, Infinity]) {
        const doc = { ...clone(SEED), [key]: v }
        invalid(() => importPerBlock(doc, PORT), new RegExp(`image 'image01': '${key}' must be a positive integer, got `))
      }
      const doc = clone(SEED)
      delete doc[key]
      invalid(() => importPerBlock(doc, PORT), new RegExp(`'${key}' must be a positive integer, got undefined`))
    }
    const stored = encodeStored(importPerBlock(clone(SEED), PORT)) as unknown as Record<string, unknown>
    invalid(() => decodeStored({ ...stored, size: 0 }, PORT), /'size' must be a positive integer, got 0/)
    invalid(() => decodeStored({ ...stored, block_size: 0.5 }, PORT), /'block_size' must be a positive integer, got 0.5/)
  })

  test('block_size larger than size', () => {
    invalid(() => importPerBlock({ name: 'a', size: 10, block_size: 20, blocks: [{ h: { synced: true } }] }, PORT),
      /'block_size' 20 is larger than 'size' 10/)
  })

  test('unknown sync states', () => {
    const cases: Array<[unknown, RegExp]> = [
      [{ sync_status: 3 }, /block 0 location h: unknown sync_status 3 \(0 in sync, 1 syncing, 2 out of sync\)/],
      [{ sync_status: -1 }, /unknown sync_status -1/],
      [{ sync_status: '0' }, /unknown sync_status "0"/],
      [{ sync_status: null }, /unknown sync_status null/],
      [{ synced: 'yes' }, /block 0 location h: 'synced' must be true or false, got "yes"/],
      [{ synced: 1 }, /'synced' must be true or false, got 1/],
      [{ synced: null }, /'synced' must be true or false/],
      [{}, /state has neither 'synced' nor 'sync_status'/],
      [{ synced: true, sync_status: 0 }, /give either 'synced' or 'sync_status', not both/],
      [{ sync: true }, /unknown key 'sync'/],
      [true, /state must be an object such as \{"synced": true\}/],
      [null, /state must be an object/],
      [0, /state must be an object/]
    ]
    for (const [state, message] of cases) {
      invalid(() => importPerBlock({ name: 'a', size: 10, block_size: 10, blocks: [{ h: state }] }, PORT), message)
    }
  })

  test('a block with no location, or not an object', () => {
    const doc = clone(SEED) as { blocks: unknown[] }
    doc.blocks[42] = {}
    invalid(() => importPerBlock(doc, PORT), /image 'image01' block 42: has no location/)
    for (const entry of [null, [], 'x', 1]) {
      doc.blocks[42] = entry
      invalid(() => importPerBlock(doc, PORT), /image 'image01' block 42: must be an object mapping locations to states/)
    }
    for (const blocks of [undefined, {}, 'x', null]) {
      invalid(() => importPerBlock({ ...clone(SEED), blocks }, PORT), /'blocks' must be a list with one entry per block/)
    }
  })

  test('bad image names', () => {
    for (const name of ['..', '../etc', 'a/b', '/etc', '', '.hidden', 'a\0', 'x'.repeat(129), 5, undefined]) {
      invalid(() => importPerBlock({ ...clone(SEED), name }, PORT), /^metadata: invalid image name/)
      const stored = encodeStored(importPerBlock(clone(SEED), PORT)) as unknown as Record<string, unknown>
      invalid(() => decodeStored({ ...stored, name }, PORT), /^metadata: invalid image name/)
    }
  })

  test('bad locations and hypervisors', () => {
    for (const loc of ['a b', '192.168.0.100:99999', 'host:0', '../x', '::1', 'a/b']) {
      invalid(() => importPerBlock({ name: 'a', size: 10, block_size: 10, blocks: [{ [loc]: { synced: true } }] }, PORT),
        /image 'a': invalid location .*expected host or host:port/)
      invalid(() => decodeStored({ format: 1, name: 'a', size: 10, block_size: 10, used_size: 0, locations: { [loc]: { blocks: [[0, 1]] } } }, PORT),
        /image 'a': invalid location/)
    }
    invalid(() => importPerBlock(ukaiDoc([{ a: 0 }], { size: 100, used_size: 0, hypervisors: ['bad host'] }), PORT),
      /image 'vm1': hypervisor: invalid location "bad host"/)
    invalid(() => importPerBlock(ukaiDoc([{ a: 0 }], { size: 100, used_size: 0, hypervisors: [1] }), PORT),
      /'hypervisors' must be a list of node addresses/)
    invalid(() => importPerBlock(ukaiDoc([{ a: 0 }], { size: 100, used_size: 0, hypervisors: 'h1' }), PORT),
      /'hypervisors' must be a list of node addresses/)
  })

  test('used_size larger than size, or not a non-negative integer', () => {
    invalid(() => importPerBlock(ukaiDoc([{ a: 0 }], { size: 100, used_size: 101 }), PORT),
      /image 'vm1': 'used_size' 101 is larger than 'size' 100/)
    for (const used of [-1, 1.5, '10', true]) {
      invalid(() => importPerBlock(ukaiDoc([{ a: 0 }], { size: 100, used_size: used }), PORT),
        /'used_size' must be a non-negative integer/)
    }
    assert.equal(importPerBlock(ukaiDoc([{ a: 0 }], { size: 100, used_size: 0 }), PORT).usedSize, 0)
  })

  test('unknown keys', () => {
    invalid(() => importPerBlock({ ...clone(SEED), blocksize: 1 }, PORT), /^metadata: unknown key 'blocksize' \(allowed: name, size, block_size/)
    const stored = encodeStored(importPerBlock(clone(SEED), PORT)) as unknown as Record<string, unknown>
    invalid(() => decodeStored({ ...stored, extra: 1 }, PORT), /^stored metadata: unknown key 'extra'/)
    invalid(() => decodeStored({ ...stored, locations: { h: { blocks: [[0, 160]], sync: [] } } }, PORT),
      /image 'image01' location h: unknown key 'sync'/)
  })

  test('documents that are not objects', () => {
    for (const doc of [null, [], 'x', 1]) {
      invalid(() => importPerBlock(doc, PORT), /metadata must be a JSON object with name, size, block_size and blocks/)
      invalid(() => decodeStored(doc, PORT), /stored metadata must be a JSON object/)
      invalid(() => importAny(doc, PORT), /must be a JSON object/)
    }
  })

  test('stored format: version, ranges and coverage', () => {
    const base = { format: 1, name: 'a', size: 1000, block_size: 100, used_size: 0, generation: 3 }
    const good = { ...base, locations: { h: { blocks: [[0, 10]], out_of_sync: [] } } }
    assert.equal(decodeStored(good, PORT).revision, 0)
    assert.equal(decodeStored({ ...good, generation: undefined, revision: 9 }, PORT).revision, 0)
    invalid(() => decodeStored({ ...good, generation: -1 }, PORT), /'generation' must be a non-negative integer/)
    invalid(() => decodeStored({ ...good, format: 2 }, PORT), /stored metadata format 2 is not supported \(expected 1\)/)
    invalid(() => decodeStored({ ...good, format: '1' }, PORT), /format "1" is not supported/)
    for (const r of [[3, 2], [2, 2], [-1, 2], [0], [0, 1, 2], ['0', '1'], [0.5, 2], 'x', null]) {
      invalid(() => decodeStored({ ...base, locations: { h: { blocks: [[0, 10], r] } } }, PORT), /location h blocks: .* is not a range \[start, end\) with 0 <= start < end/)
    }
    invalid(() => decodeStored({ ...base, locations: { h: { blocks: 'all' } } }, PORT), /location h blocks: expected a list of \[start, end\) ranges/)
    invalid(() => decodeStored({ ...base, locations: { h: { blocks: [[0, 10]], out_of_sync: {} } } }, PORT), /location h out_of_sync: expected a list/)
    invalid(() => decodeStored({ ...base, locations: { h: { blocks: [[0, 11]] } } }, PORT), /location h holds block 10 but the image has 10 blocks/)
    invalid(() => decodeStored({ ...base, locations: { h: { blocks: [[0, 4], [5, 10]] } } }, PORT), /image 'a': block 4 has no location/)
    invalid(() => decodeStored({ ...base, locations: {} }, PORT), /block 0 has no location/)
    invalid(() => decodeStored({ ...base, locations: { h: { blocks: [[0, 5]], out_of_sync: [[4, 6]] } } }, PORT),
      /location h marks blocks \[4, 6\) out of sync but does not hold them all/)
    invalid(() => decodeStored({ ...base, locations: [] }, PORT), /'locations' must be an object/)
    invalid(() => decodeStored({ ...base, locations: { h: [[0, 10]] } }, PORT), /location h must be an object/)
    for (const generation of [-1, 1.5, '3', true]) {
      invalid(() => decodeStored({ ...good, generation }, PORT), /'generation' must be a non-negative integer/)
    }
  })
})

describe('fuzzing', () => {
  /** Every decoder either returns a valid image or throws UKAI_ERR_INVALID_METADATA; nothing else. */
  function decodesOrRejects (fn: () => ImageMeta): void {
    try {
      const meta = fn()
      assert.ok(meta instanceof ImageMeta)
    } catch (err) {
      assert.ok(err instanceof UkaiError, `threw ${String(err)}`)
      assert.equal(err.code, 'UKAI_ERR_INVALID_METADATA')
    }
  }

  test('arbitrary JSON', () => {
    fc.assert(fc.property(fc.jsonValue(), (v) => {
      decodesOrRejects(() => importAny(v, PORT))
      decodesOrRejects(() => importPerBlock(v, PORT))
      decodesOrRejects(() => decodeStored(v, PORT))
    }), { numRuns: 300 })
  })

  test('valid documents with one value replaced', () => {
    const small = { name: 'a', size: 25, block_size: 10, used_size: 5, hypervisors: ['h'], blocks: [{ x: { synced: true } }, { x: { sync_status: 2 }, y: { synced: true } }, { y: { sync_status: 0 } }] }
    const stored = encodeStored(importPerBlock(small, PORT)) as unknown as Record<string, unknown>
    const paths = (v: unknown, prefix: string[] = []): string[][] => {
      if (typeof v !== 'object' || v === null) return [prefix]
      return [prefix, ...Object.keys(v).flatMap((k) => paths((v as Record<string, unknown>)[k], [...prefix, k]))]
    }
    const replace = (doc: unknown, path: string[], value: unknown): unknown => {
      if (path.length === 0) return value
      const copy = clone(doc) as Record<string, unknown>
      copy[path[0]!] = replace(copy[path[0]!], path.slice(1), value)
      return copy
    }
    for (const doc of [small, stored]) {
      fc.assert(fc.property(fc.constantFrom(...paths(doc)), fc.jsonValue({ maxDepth: 2 }), (path, value) => {
        const mutated = replace(doc, path, value)
        decodesOrRejects(() => importAny(mutated, PORT))
      }), { numRuns: 300 })
    }
  })
})
