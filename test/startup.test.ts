/**
 * Start-up without races (issue 9): nodes that start together, an offline
 * command next to a running node, a node given ports already taken. Each
 * of these once failed: a store opening deleted other processes' temp
 * files, and a node re-registered another's id before finding its port
 * taken.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { CLI, TestNode, freePort, run } from './helpers/node-process.js'

describe('start-up', { timeout: 180_000 }, () => {
  let dir: string
  before(async () => { dir = await mkdtemp(join(tmpdir(), 'ukai-startup-')) })
  after(async () => { await rm(dir, { recursive: true, force: true }) })

  test('two nodes sharing a metadata directory start together, ten times over', async () => {
    const metadata = join(dir, 'shared-metadata')
    for (let round = 0; round < 10; round++) {
      const nodes = await Promise.all([0, 1].map(async () => await TestNode.start({ config: { metadata_root: metadata } })))
      for (const n of nodes) await n.destroy()
    }
  })

  test('offline commands next to a running node never fail its writes', async () => {
    const metadata = join(dir, 'busy-metadata')
    const a = await TestNode.start({ mount: true, config: { metadata_root: metadata } })
    const b = await TestNode.start({ config: { metadata_root: metadata } })
    try {
      // Two replicas: writes to new blocks change the dirty-block log (metadata writes).
      const c = await a.cli('image', 'create', 'vm', '-s', '64M', '-b', '4K', '-l', a.id, '-l', b.id)
      assert.equal(c.code, 0, c.stderr)
      const offline = join(dir, 'offline.json')
      await writeFile(offline, JSON.stringify({ image_root: join(dir, 'offline-images'), metadata_root: metadata, control_port: await freePort(), proxy_port: await freePort() }))
      const writer = spawn(process.execPath, ['-e', `
        const fs = require('node:fs')
        const fd = fs.openSync(process.argv[1], 'r+')
        let n = 0
        for (let i = 0; i < 3000; i++) {
          fs.writeSync(fd, Buffer.alloc(512, i % 251), 0, 512, (i * 7919 % 16384) * 4096)
          n++
        }
        process.stdout.write(String(n))
      `, join(a.mountpoint!, 'vm')], { stdio: ['ignore', 'pipe', 'pipe'] })
      let out = ''
      let err = ''
      writer.stdout.on('data', (d: Buffer) => { out += d.toString() })
      writer.stderr.on('data', (d: Buffer) => { err += d.toString() })
      const closed = once(writer, 'close')
      let lists = 0
      while (writer.exitCode === null) {
        const r = await run(process.execPath, [CLI, '--config', offline, 'image', 'list'])
        assert.equal(r.code, 0, r.stderr)
        lists++
      }
      const [code] = await closed as [number]
      assert.equal(code, 0, `a write failed while offline commands ran: ${err}`)
      assert.equal(out, '3000')
      assert.ok(lists > 0)
    } finally {
      await a.destroy()
      await b.destroy()
    }
  })

  test('a node given a running node\'s proxy port exits 5 before it registers anything', async () => {
    const metadata = join(dir, 'ports-metadata')
    const a = await TestNode.start({ config: { metadata_root: metadata } })
    try {
      const before = await a.cli('nodes', 'list', '--json')
      const config = join(dir, 'same-proxy.json')
      await writeFile(config, JSON.stringify({ image_root: join(dir, 'c-images'), metadata_root: metadata, control_port: await freePort(), proxy_port: a.config.proxy_port }))
      const r = await run(process.execPath, [CLI, '--config', config, 'server'])
      assert.equal(r.code, 5, r.stderr)
      assert.match(r.stderr, /proxy_port.*another process listens there/)
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr)
      const now = await a.cli('nodes', 'list', '--json')
      const strip = (s: string): unknown => (JSON.parse(s) as Array<Record<string, unknown>>).map(({ rtt_ms: _r, capacity: _c, ...rest }) => rest)
      assert.deepEqual(strip(now.stdout), strip(before.stdout), 'the running node\'s registration changed')
      // The control port in use: exit 5 as well.
      await writeFile(config, JSON.stringify({ image_root: join(dir, 'c-images'), metadata_root: metadata, control_port: a.config.control_port, proxy_port: await freePort() }))
      const r2 = await run(process.execPath, [CLI, '--config', config, 'server'])
      assert.equal(r2.code, 5, r2.stderr)
      assert.match(r2.stderr, /control_port.*another process listens there/)
    } finally {
      await a.destroy()
    }
  })
})
