/**
 * Directory changes that survive a power loss. A file's fsync makes its
 * data durable, not its name: the directory entry is durable only once
 * the directory itself is fsynced (POSIX; ext4's journal usually hides
 * this, other file systems do not). Every place that makes, removes or
 * renames something the node relies on after a crash goes through here.
 */
import { promises as fsp } from 'node:fs'
import { dirname } from 'node:path'

export async function fsyncDir (dir: string): Promise<void> {
  const dh = await fsp.open(dir, 'r')
  try { await dh.sync() } finally { await dh.close() }
}

/** mkdir -p, each directory made durable in its parent. */
export async function mkdirDurable (dir: string): Promise<void> {
  const made = await fsp.mkdir(dir, { recursive: true })
  if (made === undefined) return
  // `made` is the first directory created: its parent and every directory
  // below it down to `dir` hold a new entry.
  const chain: string[] = []
  for (let d = dir; ; d = dirname(d)) {
    chain.push(d)
    if (d === made || dirname(d) === d) break
  }
  for (const d of chain.reverse()) await fsyncDir(dirname(d))
}

/** rm -rf, the removal made durable in the parent. */
export async function rmDurable (path: string): Promise<void> {
  await fsp.rm(path, { recursive: true, force: true })
  await fsyncDir(dirname(path)).catch(() => {})
}

/**
 * Replaces `path` with `text` atomically and durably: written to `tmp` (in
 * the same directory), fsynced, renamed over `path`, the directory
 * fsynced. A crash leaves the old file or the new one.
 */
export async function replaceFileDurable (path: string, tmp: string, text: string): Promise<void> {
  const fh = await fsp.open(tmp, 'w', 0o644)
  try {
    await fh.writeFile(text)
    await fh.sync()
  } finally {
    await fh.close()
  }
  try {
    await fsp.rename(tmp, path)
  } catch (err) {
    await fsp.rm(tmp, { force: true })
    throw err
  }
  await fsyncDir(dirname(path))
}
