/**
 * Temp directories for tests. Each one lives under the OS temp dir and is
 * removed when the test (or suite) that made it ends, pass or fail, so a
 * failing run leaves nothing behind to confuse the next one.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export interface TmpDir {
  path: string
  /** Removes the directory and everything in it; safe to call twice. */
  cleanup: () => Promise<void>
}

/** The part of node:test's TestContext (and SuiteContext hooks) we need. */
interface HasAfter {
  after: (fn: () => Promise<void> | void) => void
}

/** Makes a fresh directory; the caller removes it with `cleanup`. */
export async function makeTmpDir (prefix = 'ukai-test-'): Promise<TmpDir> {
  const path = await mkdtemp(join(tmpdir(), prefix))
  let removed = false
  return {
    path,
    cleanup: async () => {
      if (removed) return
      removed = true
      await rm(path, { recursive: true, force: true })
    }
  }
}

/** Makes a fresh directory that is removed after the test `t` ends. */
export async function tmpDir (t: HasAfter, prefix?: string): Promise<string> {
  const dir = await makeTmpDir(prefix)
  t.after(dir.cleanup)
  return dir.path
}
