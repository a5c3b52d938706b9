/**
 * The FUSE mount, loaded only when a node mounts, on one of two engines
 * (config `fuse_engine`):
 *
 * - "native" (the default when the addon is built): native/ukai-fuse.c,
 *   libfuse 3 on threads of its own, reading local in-sync blocks without
 *   the JS thread (native-mount.ts);
 * - "fuse-native": the fuse-native binding over libfuse 2, every request
 *   on the JS thread (mount.ts); what a host without libfuse3-dev at
 *   install time mounts with.
 *
 * fuse-native loads its addon, and the addon libfuse.so.2, when it is
 * imported: on a host without libfuse 2 that import throws, so nothing
 * else in UKAI imports it, and every command that mounts nothing works
 * there.
 */
import { UkaiError } from '../../errors.js'
import type { UkaiNode } from '../../node/node.js'
import type { FuseMountOptions } from './mount.js'
import { loadFuseAddon } from './native-addon.js'

export type FuseEngine = 'native' | 'fuse-native'

export interface FuseMount {
  readonly node: UkaiNode
  readonly mountpoint: string
  readonly engine: FuseEngine
  mount: (options?: FuseMountOptions) => Promise<void>
  unmount: () => Promise<void>
}

export type FuseMountClass = new (node: UkaiNode, mountpoint: string) => FuseMount

/**
 * The FuseMount class of `engine` (undefined: native when its addon is
 * built, else fuse-native); UKAI_ERR_NOT_SUPPORTED (one line, exit 8)
 * when that engine cannot be loaded.
 */
export async function loadFuseMount (engine?: FuseEngine): Promise<FuseMountClass> {
  if (engine !== 'fuse-native') {
    const { addon, error } = loadFuseAddon()
    if (addon !== undefined) {
      const { NativeFuseMount } = await import('./native-mount.js')
      const loaded = addon
      return class extends NativeFuseMount {
        constructor (node: UkaiNode, mountpoint: string) { super(node, mountpoint, loaded) }
      }
    }
    if (engine === 'native') {
      throw new UkaiError('UKAI_ERR_NOT_SUPPORTED',
        `FUSE is not available: the native FUSE engine cannot be loaded (${error ?? 'unknown'}); install libfuse3-dev and run scripts/setup.sh, or set "fuse_engine": "fuse-native"`)
    }
  }
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
