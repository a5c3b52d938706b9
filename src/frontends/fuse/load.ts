/**
 * The FUSE mount, loaded only when a node mounts. fuse-native loads its
 * addon, and the addon libfuse.so.2, when it is imported: on a host
 * without libfuse 2 that import throws, so nothing else in UKAI imports
 * it, and every command that mounts nothing works there.
 */
import { UkaiError } from '../../errors.js'

export type { FuseMount } from './mount.js'

/** The FuseMount class; UKAI_ERR_NOT_SUPPORTED (one line, exit 8) when fuse-native or libfuse 2 cannot be loaded. */
export async function loadFuseMount (): Promise<typeof import('./mount.js').FuseMount> {
  try {
    // The binding first, on its own: a failed addon load inside the import
    // of an ES module graph (mount.js importing it) escapes as an uncaught
    // exception on Node.js 20 even when the import's promise is caught;
    // imported alone, it rejects here, and mount.js then finds it loaded.
    await import('fuse-native')
  } catch (err) {
    // dlopen's message names the library and why: "libfuse.so.2: cannot open shared object file: ...".
    const why = ((err as Error).message ?? String(err)).split('\n')[0]!
    throw new UkaiError('UKAI_ERR_NOT_SUPPORTED',
      `FUSE is not available: libfuse.so.2 or the fuse-native binding cannot be loaded (${why}); install libfuse2 (Debian: apt-get install libfuse2), or serve the images over NBD (--nbd) instead of --mount`,
      undefined, { cause: err })
  }
  return (await import('./mount.js')).FuseMount
}
