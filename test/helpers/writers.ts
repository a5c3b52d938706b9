/**
 * Writers in a process of their own, for crash tests: they write random
 * data as fast as they can until they are killed (or their node goes), so
 * a kill -9 of the node lands between the replicas of some write.
 */
import { writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'

/**
 * Writes the script of an NBD writer with `inflight` writes in flight to
 * export `image` of the unix socket given as its argument, over the first
 * `size` bytes; returns its path. It prints "writing" once connected.
 */
export async function nbdWriterScript (dir: string, image: string, size: number, inflight = 32): Promise<string> {
  const path = join(dir, `nbd-writer-${image}.mjs`)
  await writeFile(path, `
    import { randomBytes } from 'node:crypto'
    const { NbdClient } = await import(${JSON.stringify(resolve('dist/src/peer/nbd-client.js'))})
    const c = await NbdClient.connect({ path: process.argv[2] }, ${JSON.stringify(image)}, { timeoutMs: 30000 })
    process.stdout.write('writing\\n')
    const one = async () => {
      for (;;) {
        const len = 4096 + Math.floor(Math.random() * 300000)
        const off = Math.floor(Math.random() * (${size} - len))
        await c.write(off, randomBytes(len))
      }
    }
    await Promise.all(Array.from({ length: ${inflight} }, one)).catch(() => process.exit(0))
  `)
  return path
}
