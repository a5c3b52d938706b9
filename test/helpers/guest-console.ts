/**
 * Watching the test guest's console (test/helpers/guest.ts) from the host:
 * waiting for its rounds, and the check that it saw no I/O error.
 */
import assert from 'node:assert/strict'
import { setTimeout as sleep } from 'node:timers/promises'
import { parseGuestLog, type GuestLog } from './guest.js'
import type { Qemu } from './qemu.js'

/** Polls the console (after `from`) until an `ok` line of seq >= minSeq; fails at once on a guest or kernel I/O error. */
export async function waitForRounds (vm: Qemu, minSeq: number, timeoutMs: number, from = 0): Promise<GuestLog> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const log = parseGuestLog(vm.serial.slice(from))
    if (log.errors.length > 0 || log.ioErrors.length > 0) {
      assert.fail(`${vm.name}: errors on the console:\n${[...log.errors, ...log.ioErrors].slice(0, 10).join('\n')}`)
    }
    if (log.oks.some((s) => s >= minSeq)) return log
    if (!vm.running) assert.fail(`${vm.name}: QEMU exited (${String(vm.exitCode ?? vm.exitSignal)}):\n${vm.stderr}\n${vm.serial.slice(-2000)}`)
    if (Date.now() > deadline) assert.fail(`${vm.name}: no ok line of seq >= ${minSeq} in ${timeoutMs} ms; last output:\n${vm.serial.slice(-2000)}`)
    await sleep(100)
  }
}

export function assertClean (log: GuestLog, what: string): void {
  assert.deepEqual(log.errors, [], `${what}: UKAI-GUEST error lines`)
  assert.deepEqual(log.ioErrors, [], `${what}: kernel I/O error lines`)
}
