/**
 * The dashboard (issue 13) in a real browser: Debian's chromium, driven by
 * puppeteer-core, against a real three-node cluster with one image on
 * every node and one location out of sync. The page shows the nodes, the
 * cells of the block map in the states the metadata gives them; a sync
 * started from the page turns the cells in sync; the live counters move
 * while a client writes; a node in the error state shows its retry_after.
 * The API rules hold: the static files need no token, every data call
 * does, and a state-changing call is refused unless its Origin is the
 * node's own.
 *
 * With UKAI_UI_SCREENSHOTS=DIR the test also saves a screenshot of each
 * view there (scripts/ui-screenshots.sh makes docs/ui-*.png that way).
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import puppeteer, { type Browser, type Page } from 'puppeteer-core'
import { Cluster } from './helpers/cluster.js'
import { CLI, TestNode, run } from './helpers/node-process.js'
import { NbdClient } from '../src/peer/nbd-client.js'

const CHROMIUM = '/usr/bin/chromium'
const MiB = 2 ** 20
const BLOCKS = 32
/** C holds blocks FROM..BLOCKS-1, out of sync until the page syncs them. */
const FROM = 16
/** The block a client writes before the page opens: in the dirty-block log while the client has the image open. */
const DIRTY = 2
const SHOTS = process.env.UKAI_UI_SCREENSHOTS

interface ErrorBody { error?: { code: string, message: string } }

/** The browser's tests skip without it; the API's rules are tested all the same. */
const NO_BROWSER = existsSync(CHROMIUM) ? false : `${CHROMIUM} is not installed (scripts/setup.sh --tests installs it)`

describe('dashboard', { timeout: 300_000 }, () => {
  let cluster: Cluster
  let A: TestNode, B: TestNode, C: TestNode
  let client: NbdClient
  let browser: Browser | undefined
  let browserPid: number | undefined
  let profile: string
  let page: Page
  let token: string
  const pageErrors: string[] = []

  before(async () => {
    cluster = await Cluster.start({ nodes: 3, nbd: [0], tls: false, config: { io_timeout: 2, retry_after: 120 } })
    ;[A, B, C] = cluster.nodes as [TestNode, TestNode, TestNode]
    token = await A.controlToken()
    await A.cliOk('image', 'create', 'vm1', '-s', `${BLOCKS}M`, '-b', '1M', '-l', A.id, '-l', B.id, '-h', A.id)
    await A.cliOk('image', 'add-location', 'vm1', C.id, '-s', String(FROM), '-e', String(BLOCKS - 1))
    client = await NbdClient.connect({ path: A.nbdSocket! }, 'vm1', { timeoutMs: 30_000 })
    await client.write(DIRTY * MiB, Buffer.alloc(64 * 1024, 7))
    await client.flush()
    if (NO_BROWSER !== false) return
    profile = await mkdtemp(join(tmpdir(), 'ukai-ui-chromium-'))
    browser = await puppeteer.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync', `--user-data-dir=${profile}`]
    })
    browserPid = browser.process()?.pid
    page = await browser.newPage()
    await page.setViewport({ width: 1366, height: 768 })
    page.on('pageerror', (err) => pageErrors.push(String(err)))
  })

  after(async () => {
    await browser?.close().catch(() => {})
    // The browser this test started, by its PID, should close() have left it.
    if (browserPid !== undefined) { try { process.kill(browserPid, 'SIGKILL') } catch {} }
    await client?.close().catch(() => {})
    await cluster?.destroy()
    if (profile !== undefined) await rm(profile, { recursive: true, force: true })
  })

  const base = (): string => `http://127.0.0.1:${A.controlPort}`
  async function shot (name: string): Promise<void> {
    if (SHOTS !== undefined) await page.screenshot({ path: join(SHOTS, `ui-${name}.png`) })
  }
  /** Waits until `fn` (run in the page) answers true. */
  async function until (fn: string, timeout = 20_000): Promise<void> {
    try {
      await page.waitForFunction(fn, { timeout, polling: 100 })
    } catch (err) {
      // What the page showed, to tell why.
      const shown = await page.evaluate(() => ({ errors: [...document.querySelectorAll('#errors .error')].map((e) => e.textContent), task: document.getElementById('task-detail')?.textContent, summary: document.getElementById('block-summary')?.textContent, map: [...document.querySelectorAll('#block-map .location')].map((r) => [...r.querySelectorAll('.cell')].map((c) => (c as HTMLElement).dataset.state![0]).join('')) }))
      throw new Error(`${(err as Error).message}: waiting for ${fn}; the page shows ${JSON.stringify(shown)}`)
    }
  }

  test('the static files need no token, every data call does; a foreign Origin cannot change anything, the node\'s own can', async () => {
    const host = { host: `127.0.0.1:${A.controlPort}` }
    const html = await A.apiText('GET', '/ui/', undefined, { token: null, headers: host })
    assert.equal(html.status, 200)
    assert.match(String(html.headers['content-type']), /^text\/html/)
    assert.match(String(html.headers['content-security-policy']), /default-src 'none'.*frame-ancestors 'none'/)
    assert.match(html.text, /<script type="module" src="app.js">/)
    const redirect = await A.apiText('GET', '/ui', undefined, { token: null, headers: host })
    assert.equal(redirect.status, 301)
    assert.equal(redirect.headers.location, '/ui/')
    for (const path of ['/ui/nothing.js', '/ui/..%2fpackage.json', '/ui/sub/app.js', '/ui/.hidden.js']) {
      const r = await A.api<ErrorBody>('GET', path, undefined, { token: null, headers: host })
      assert.equal(r.status, 404, path)
      assert.equal(r.body.error?.code, 'UKAI_ERR_NOT_FOUND')
    }
    // A dot segment is resolved before the route is chosen: an API path, which wants the token.
    assert.equal((await A.apiText('GET', '/ui/%2e%2e/package.json', undefined, { token: null, headers: host })).status, 401)
    // The Host rule holds for the page too.
    const rebound = await A.api<ErrorBody>('GET', '/ui/', undefined, { token: null, headers: { host: `evil.example:${A.controlPort}` } })
    assert.equal(rebound.status, 403)
    for (const path of ['/v1/images', '/v1/stats', '/v1/nodes/stats', '/v1/nodes/rtt', '/v1/live']) {
      const r = await A.api<ErrorBody>('GET', path, undefined, { token: null })
      assert.equal(r.status, 401, path)
      assert.equal(r.body.error?.code, 'UKAI_ERR_UNAUTHENTICATED')
    }
    const badInterval = await A.api<ErrorBody>('GET', '/v1/live?interval=5')
    assert.equal(badInterval.status, 400)
    assert.match(badInterval.body.error!.message, /'interval' must be a number of milliseconds from 250 to 60000, got "5"/)

    // A state-changing call: a hypervisor added (then removed, below).
    const add = async (origin: string): Promise<{ status: number, body: ErrorBody }> =>
      await A.api<ErrorBody>('POST', '/v1/images/vm1/hypervisors', { hypervisor: '127.0.0.1:1' }, { headers: { origin } })
    const foreign = ['http://evil.example', `http://127.0.0.1:${B.controlPort}`, `https://127.0.0.1:${A.controlPort}`, `${base()}/`, 'null', `http://127.0.0.1:${A.controlPort}.evil.example`]
    for (const origin of foreign) {
      const r = await add(origin)
      assert.equal(r.status, 403, `Origin ${origin}: ${JSON.stringify(r.body)}`)
      assert.match(r.body.error!.message, /a state-changing call from a web page \(Origin .*\) is refused/)
    }
    assert.deepEqual((await cluster.state('vm1')).meta.hypervisors, [A.id])
    for (const origin of [base(), `http://localhost:${A.controlPort}`]) {
      const r = await add(origin)
      assert.equal(r.status, 200, `Origin ${origin}: ${JSON.stringify(r.body)}`)
      const del = await A.api<ErrorBody>('DELETE', '/v1/images/vm1/hypervisors', { hypervisor: '127.0.0.1:1' }, { headers: { origin } })
      assert.equal(del.status, 200, JSON.stringify(del.body))
    }
    // Without the token, the node's own Origin is not enough.
    const noToken = await A.api<ErrorBody>('POST', '/v1/images/vm1/hypervisors', { hypervisor: '127.0.0.1:1' }, { token: null, headers: { origin: base() } })
    assert.equal(noToken.status, 401)
    assert.deepEqual((await cluster.state('vm1')).meta.hypervisors, [A.id])
  })

  test('without the token, or with a wrong one, the page says so; the token from #token= is taken out of the URL', { skip: NO_BROWSER }, async () => {
    await page.goto(`${base()}/ui/`)
    await until("document.querySelector('#errors .error[data-code=\"NO_TOKEN\"]') !== null")
    // One banner for it, not one per call the view makes.
    assert.equal(await page.$$eval('#errors .error', (e) => e.length), 1)
    await page.type('#token', 'not-the-clusters-token-0123456789')
    await page.click('#token-form button[type=submit]')
    await until("document.querySelector('#errors .error[data-code=\"UKAI_ERR_UNAUTHENTICATED\"]') !== null")
    await page.goto(`${base()}/ui/#token=${encodeURIComponent(token)}`)
    await page.reload()
    await until("document.getElementById('node-id').textContent !== ''")
    assert.equal(await page.$eval('#node-id', (e) => e.textContent), `node ${A.id}`)
    assert.ok(!page.url().includes(token), `the token is still in the URL: ${page.url()}`)
    assert.equal(new URL(page.url()).hash, '#cluster')
    assert.equal(await page.$$eval('#errors .error', (e) => e.length), 0)
  })

  test('cluster view: the three nodes, alive, with address, space and RTT; the RTT between every two', { skip: NO_BROWSER }, async () => {
    await page.goto(`${base()}/ui/#cluster`)
    await until("document.querySelectorAll('#nodes tbody tr').length === 3 && document.querySelectorAll('#rtt tbody td').length === 9 && [...document.querySelectorAll('#rtt tbody td')].every((td) => td.textContent !== '–')")
    const rows = await page.$$eval('#nodes tbody tr', (trs) => trs.map((tr) => ({ id: tr.getAttribute('data-node'), cells: [...tr.querySelectorAll('td')].map((td) => td.textContent ?? '') })))
    assert.deepEqual(rows.map((r) => r.id).sort(), [A.id, B.id, C.id].sort())
    for (const r of rows) {
      const n = cluster.nodeById(r.id!)!
      assert.equal(r.cells[1], `127.0.0.1:${n.controlPort}`)
      assert.equal(r.cells[2], 'alive')
      assert.match(r.cells[3]!, /\d+(\.\d+)? [KMGT]iB/, 'free space')
      assert.match(r.cells[6]!, /^\d+\.\d\d ms$/, 'RTT')
    }
    const rtt = await page.$$eval('#rtt tbody td', (tds) => tds.map((td) => td.textContent))
    for (const v of rtt) assert.match(v!, /^\d+\.\d\d$/)
    await shot('cluster')
  })

  test('images view: size, block size, locations, hypervisors, the writer and readers; filter and sort', { skip: NO_BROWSER }, async () => {
    await A.cliOk('image', 'create', 'small', '-s', '4M', '-b', '1M', '-l', B.id)
    await page.goto(`${base()}/ui/#images`)
    await until("document.querySelectorAll('#images tbody tr').length === 2 && document.querySelector('#images tr[data-image=vm1] .writer').textContent !== '–'")
    const cells = await page.$$eval('#images tr[data-image=vm1] td', (tds) => tds.map((td) => td.textContent))
    assert.deepEqual(cells.slice(0, 5), ['vm1', '32.0 MiB', '1.00 MiB', String(BLOCKS), '32.0 MiB'])
    assert.equal(cells[5], [A.id, B.id, C.id].join(', '))
    assert.equal(cells[6], A.id)
    assert.match(cells[7]!, new RegExp(`^${A.id} \\(gen \\d+\\)$`), 'the NBD client on A writes it')
    assert.equal(cells[8], `${A.id}: 1 writer`, 'the NBD client on A has it open')
    assert.equal(cells[9], String(BLOCKS - FROM))
    assert.equal(cells[10], '1')
    // Sort by size: the small image first, then, clicked again, last.
    await page.click('#images th[data-key=size]')
    assert.deepEqual(await page.$$eval('#images tbody tr', (trs) => trs.map((tr) => tr.getAttribute('data-image'))), ['small', 'vm1'])
    await page.click('#images th[data-key=size]')
    assert.deepEqual(await page.$$eval('#images tbody tr', (trs) => trs.map((tr) => tr.getAttribute('data-image'))), ['vm1', 'small'])
    await page.type('#image-filter', C.id)
    assert.deepEqual(await page.$$eval('#images tbody tr', (trs) => trs.map((tr) => tr.getAttribute('data-image'))), ['vm1'])
    await shot('images')
    await page.$eval('#image-filter', (e) => { (e as HTMLInputElement).value = '' })
    await A.cliOk('image', 'destroy', 'small')
  })

  /** Each location's cell states, in block order, from the page. */
  async function cellStates (): Promise<Record<string, string[]>> {
    return await page.$$eval('#block-map .location', (rows) => Object.fromEntries(rows.map((r) => [r.getAttribute('data-location'),
      [...r.querySelectorAll('.cell')].map((c) => c.getAttribute('data-state'))])))
  }

  test('block map: every cell in the state the metadata gives it; a sync started from the page turns the out-of-sync cells in sync', { skip: NO_BROWSER }, async () => {
    await page.goto(`${base()}/ui/#blocks/vm1`)
    await until(`document.querySelectorAll('#block-map .cell').length === ${3 * BLOCKS}`)
    const want = (f: (b: number) => string): string[] => Array.from({ length: BLOCKS }, (_, b) => f(b))
    const placed = (b: number): string => b === DIRTY ? 'dirty' : 'in-sync'
    const synced = (): string => 'in-sync'
    // Checked against the cluster's own metadata first: this is the state the page must show.
    const st = await cluster.state('vm1')
    assert.deepEqual(st.dirty.toJSON(), [[DIRTY, DIRTY + 1]])
    assert.deepEqual((await cluster.image('vm1')).locations[C.id]!.out_of_sync, [[FROM, BLOCKS]])
    assert.deepEqual(await cellStates(), {
      [A.id]: want(placed),
      [B.id]: want(placed),
      [C.id]: want((b) => b < FROM ? 'not-placed' : 'out-of-sync')
    })
    // Hover: the block's byte range and state.
    await page.hover(`#block-map .location[data-location="${C.id}"] .cell[data-block="${FROM + 1}"]`)
    assert.equal(await page.$eval('#block-hover', (e) => e.textContent),
      `block ${FROM + 1} · bytes ${(FROM + 1) * MiB}–${(FROM + 2) * MiB - 1} (1.00 MiB) · ${C.id}: out of sync`)

    // A range selected (click, shift-click), a sync started and confirmed.
    await select(FROM, BLOCKS - 1)
    assert.equal(await page.$eval('#block-selection', (e) => e.textContent),
      `blocks ${FROM}–${BLOCKS - 1} selected (bytes ${FROM * MiB}–${BLOCKS * MiB - 1}, 16.0 MiB)`)
    await shot('blocks')
    // The client goes: its writer's close empties the dirty-block log, and the page follows.
    await client.close()
    await until(`document.querySelector('#block-map .location[data-location="${A.id}"] .cell[data-block="${DIRTY}"]').dataset.state === 'in-sync'`)
    assert.deepEqual((await cluster.state('vm1')).dirty.toJSON(), [])
    // A sync run by a writer logs the blocks it copies as dirty while it runs; none is left after.
    await page.click('#sync-range')
    await until("document.getElementById('confirm').open")
    assert.match(await page.$eval('#confirm-title', (e) => e.textContent ?? ''), new RegExp(`^Sync blocks ${FROM}–${BLOCKS - 1} of vm1\\?$`))
    await page.click('#confirm-ok')
    await until("document.getElementById('task').dataset.state === 'done'", 60_000)
    // Nothing was written there yet: the copy skips holes (0 bytes).
    assert.equal(await page.$eval('#task-detail', (e) => e.textContent), `done: ${BLOCKS - FROM} of ${BLOCKS - FROM} blocks, 0 B`)
    await until(`[...document.querySelectorAll('#block-map .location[data-location="${C.id}"] .cell')].filter((c) => c.dataset.state === 'in-sync').length === ${BLOCKS - FROM}`)
    assert.deepEqual(await cellStates(), {
      [A.id]: want(synced),
      [B.id]: want(synced),
      [C.id]: want((b) => b < FROM ? 'not-placed' : 'in-sync')
    })
    assert.deepEqual(await cluster.outOfSync('vm1'), { [A.id]: 0, [B.id]: 0, [C.id]: 0 })
    assert.deepEqual(await cluster.checkReplicas('vm1'), [])
  })

  /** Selects blocks first..last on the block map (click, shift-click). */
  async function select (first: number, last: number): Promise<void> {
    await page.click(`#block-map .location[data-location="${A.id}"] .cell[data-block="${first}"]`)
    await page.keyboard.down('Shift')
    await page.click(`#block-map .location[data-location="${A.id}"] .cell[data-block="${last}"]`)
    await page.keyboard.up('Shift')
  }

  test('block map: a move the node refuses shows its error; one from B to C started from the page moves the cells', { skip: NO_BROWSER }, async () => {
    await select(4, 7)
    await page.select('#move-to', C.id)
    await page.click('#move-range')
    await until("document.getElementById('confirm').open")
    await page.click('#confirm-ok')
    // Blocks 4..7 are on A and B: the node wants to know which one to move away from.
    await until("document.getElementById('task').dataset.state === 'failed'")
    const banner = await page.$eval('#errors .error[data-key=task]', (e) => ({ code: e.getAttribute('data-code'), text: e.textContent }))
    assert.equal(banner.code, 'UKAI_ERR_INVALID_ARGUMENT')
    assert.match(banner.text ?? '', /blocks 4\.\.7 are on .*; name the one to move away from/)
    await page.click('#errors .error[data-key=task] .close')

    await select(4, 7)
    await page.select('#move-from', B.id)
    await page.select('#move-to', C.id)
    await page.click('#move-range')
    await until("document.getElementById('confirm').open")
    assert.equal(await page.$eval('#confirm-title', (e) => e.textContent), `Move blocks 4–7 of vm1 to ${C.id}?`)
    await page.click('#confirm-ok')
    await until("document.getElementById('task').dataset.state === 'done'", 60_000)
    const row = (loc: string): string => `[...document.querySelectorAll('#block-map .location[data-location="${loc}"] .cell')].slice(4, 8).map((c) => c.dataset.state).join()`
    await until(`${row(C.id)} === 'in-sync,in-sync,in-sync,in-sync' && ${row(B.id)} === 'not-placed,not-placed,not-placed,not-placed'`)
    const doc = await cluster.image('vm1')
    assert.deepEqual(doc.locations[B.id]!.blocks, [[0, 4], [8, BLOCKS]])
    assert.deepEqual(doc.locations[C.id]!.blocks, [[4, 8], [FROM, BLOCKS]])
    assert.deepEqual(await cluster.checkReplicas('vm1'), [])
  })

  test('block map of an image of more blocks than cells: a cell per run of blocks, its hover tells what the run holds', { skip: NO_BROWSER }, async () => {
    // 4,096 blocks of 4 KiB: two blocks a cell.
    await A.cliOk('image', 'create', 'many', '-s', '16M', '-b', '4K', '-l', A.id, '-l', B.id)
    await A.cliOk('image', 'add-location', 'many', C.id, '-s', '1', '-e', '2')
    await page.goto(`${base()}/ui/#blocks/many`)
    await until("document.querySelectorAll('#block-map .location').length === 3 && document.querySelectorAll('#block-map .cell').length === 3 * 2048")
    assert.match(await page.$eval('#block-summary', (e) => e.textContent ?? ''), /^4096 blocks of 4.00 KiB, 3 locations, 2 block replicas out of sync, 0 dirty; a cell is 2 blocks/)
    const cells = `#block-map .location[data-location="${C.id}"] .cell`
    assert.deepEqual(await page.$$eval(cells, (cs) => cs.slice(0, 3).map((c) => c.getAttribute('data-state'))), ['out-of-sync', 'out-of-sync', 'not-placed'])
    await page.hover(`${cells}[data-block="0"]`)
    assert.equal(await page.$eval('#block-hover', (e) => e.textContent), `blocks 0–1 · bytes 0–8191 (8.00 KiB) · ${C.id}: 1 not placed, 1 out of sync`)
    await A.cliOk('image', 'destroy', 'many')
  })

  test('live I/O: the counters of the image on the writing node move while a client writes', { skip: NO_BROWSER }, async () => {
    client = await NbdClient.connect({ path: A.nbdSocket! }, 'vm1', { timeoutMs: 30_000 })
    await page.goto(`${base()}/ui/#live`)
    const row = `#live tr[data-node="${A.id}"][data-image="vm1"]`
    await until(`document.querySelector('${row} .writes-total') !== null && Number(document.getElementById('live-status').dataset.events) >= 2`)
    const before = Number(await page.$eval(`${row} .writes-total`, (e) => e.textContent))
    const api = await A.api<{ writes: number }>('GET', '/v1/images/vm1/stats')
    assert.ok(before <= api.body.writes, `page ${before}, node ${api.body.writes}`)
    let writes = 0
    let writing = true
    const writer = (async () => {
      while (writing) {
        await client.write((writes % BLOCKS) * MiB, Buffer.alloc(16 * 1024, writes))
        writes++
        await client.read(((writes * 7) % BLOCKS) * MiB, Buffer.alloc(64 * 1024))
        await new Promise((resolve) => setTimeout(resolve, 20))
      }
    })()
    try {
      await until(`Number(document.querySelector('${row} .writes-total').textContent) >= ${before + 20} && Number(document.querySelector('${row} td:nth-child(4)').textContent) > 0`)
      // The charts of a screenshot get some history.
      if (SHOTS !== undefined) { await new Promise((resolve) => setTimeout(resolve, 15_000)); await shot('live') }
    } finally {
      writing = false
      await writer
    }
    const after = Number(await page.$eval(`${row} .writes-total`, (e) => e.textContent))
    assert.ok(after >= before + 20 && after <= before + writes, `page counter ${before} -> ${after}, ${writes} writes`)
    // The replica on B took them too, as the peer writes of B's row tell.
    await until(`document.querySelector('#live tr[data-node="${B.id}"][data-image="vm1"]') !== null`)
    assert.ok(await page.$eval(`${row} svg.spark polyline.writes`, (e) => (e.getAttribute('points') ?? '').split(' ').length >= 2))
    assert.ok(Number(await page.$eval(`${row} .reads-total`, (e) => e.textContent)) > 0, 'the reads counted too')
  })

  test('cluster view: a node that does not answer in io_timeout is in the error state, with its retry_after countdown', { skip: NO_BROWSER }, async () => {
    C.proc!.kill('SIGSTOP')
    try {
      // A write to a block C holds: C does not answer, A marks it out of sync and skips it.
      await client.write((FROM + 1) * MiB, Buffer.alloc(4096, 9))
    } finally {
      C.proc!.kill('SIGCONT')
    }
    await page.goto(`${base()}/ui/#cluster`)
    const cell = `#nodes tr[data-node="${C.id}"] li[data-seen-by="${A.id}"]`
    await until(`document.querySelector('${cell} .countdown') !== null`)
    const text = await page.$eval(cell, (e) => e.textContent ?? '')
    assert.match(text, new RegExp(`^error seen by ${A.id.replace(/\./g, '\\.')}: .+; retried in (\\d+ min \\d+ s|\\d+ s)$`))
    const first = await page.$eval(`${cell} .countdown`, (e) => e.textContent)
    await until(`document.querySelector('${cell} .countdown').textContent !== ${JSON.stringify(first)}`, 5000)
    await shot('cluster-error')
    assert.deepEqual(pageErrors, [])
  })
})

describe('dashboard API on a node with tls_dir', { timeout: 120_000 }, () => {
  let dir: string
  let node: TestNode

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ukai-ui-tls-'))
    const r = await run(process.execPath, [CLI, 'cert', 'ca', join(dir, 'ca')])
    assert.equal(r.code, 0, r.stderr)
    node = await TestNode.start({ tlsCa: join(dir, 'ca') })
    await node.cliOk('image', 'create', 'vm', '-s', '4M', '-b', '1M')
  })
  after(async () => {
    await node?.destroy()
    if (dir !== undefined) await rm(dir, { recursive: true, force: true })
  })

  test('the page is served over HTTPS, and only the https:// origin of the node may change state', async () => {
    const page = await node.apiText('GET', '/ui/', undefined, { token: null })
    assert.equal(page.status, 200)
    const add = async (origin: string): Promise<number> =>
      (await node.api('POST', '/v1/images/vm/hypervisors', { hypervisor: '127.0.0.1:1' }, { headers: { origin } })).status
    assert.equal(await add(`http://127.0.0.1:${node.controlPort}`), 403)
    assert.equal(await add(`https://127.0.0.1:${node.controlPort}`), 200)
  })
})
