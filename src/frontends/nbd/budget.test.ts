/**
 * The process-wide buffer budget on its own: the reserve, the limit, who
 * goes first when bytes are released, and that nobody is left waiting.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { BufferBudget, type Ledger } from './budget.js'

class L implements Ledger {
  accounted = 0
  constructor (private readonly b: BufferBudget) {}
  hold (n: number): void { this.b.adjust(n); this.accounted += n }
}

const turn = async (): Promise<void> => await new Promise((resolve) => setImmediate(resolve))

test('budget: within the limit everyone is admitted; past it only what fits in a connection\'s reserve', () => {
  const b = new BufferBudget({ limit: 1000, reserve: 100 })
  const a = new L(b)
  const c = new L(b)
  assert.equal(b.admit(a, 900), true)
  a.hold(900)
  assert.equal(b.admit(c, 200), false, 'over the limit')
  assert.equal(b.admit(c, 100), true, 'within the reserve')
  c.hold(100)
  assert.equal(b.admit(c, 1), false, 'the reserve is used up')
  assert.equal(b.used, 1000)
  assert.equal(b.peak, 1000)
  a.hold(-900)
  assert.equal(b.admit(c, 500), true)
})

test('budget: a request larger than the whole budget runs once nothing else is held', () => {
  const b = new BufferBudget({ limit: 1000, reserve: 0 })
  const a = new L(b)
  const c = new L(b)
  a.hold(1)
  assert.equal(b.admit(c, 5000), false)
  a.hold(-1)
  assert.equal(b.admit(c, 5000), true)
})

test('budget: released bytes go to the waiter holding least, first come first served among equals, never overtaken', async () => {
  const b = new BufferBudget({ limit: 1000, reserve: 10 })
  const big = new L(b)
  big.hold(1000)
  const heavy = new L(b)
  heavy.hold(5) // over the limit through its reserve
  const first = new L(b)
  const second = new L(b)
  const woken: string[] = []
  for (const [name, l] of [['heavy', heavy], ['first', first], ['second', second]] as const) {
    assert.equal(b.admit(l, 300), false)
    b.wait(l, 300, () => woken.push(name))
  }
  assert.equal(b.waiting, 3)
  big.hold(-500)
  await turn()
  // first and second hold nothing; first came first.
  assert.deepEqual(woken, ['first'])
  assert.equal(b.admit(second, 300), false, 'second may not overtake first')
  assert.equal(b.admit(heavy, 300), false)
  assert.equal(b.admit(first, 300), true)
  b.cancel(first)
  first.hold(300)
  woken.length = 0
  first.hold(-300)
  await turn()
  assert.deepEqual(woken, ['second'])
  b.cancel(second)
  big.hold(-500)
  await turn()
  assert.deepEqual(woken, ['second', 'heavy'])
  assert.equal(b.admit(heavy, 300), true)
  b.cancel(heavy)
  assert.equal(b.waiting, 0)
})

test('budget: a waiter that leaves passes its turn on', async () => {
  const b = new BufferBudget({ limit: 100, reserve: 0 })
  const holder = new L(b)
  holder.hold(100)
  const gone = new L(b)
  const next = new L(b)
  let woke = false
  b.wait(gone, 50, () => {})
  b.wait(next, 50, () => { woke = true })
  holder.hold(-60)
  b.cancel(gone)
  await turn()
  assert.equal(woke, true)
})
