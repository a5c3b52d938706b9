/**
 * Preloaded with `node --import` (test/cli-without-fuse.test.ts): from
 * here on, importing 'fuse-native' fails as it does on a host where the
 * package or its binding is not installed.
 */
import { register } from 'node:module'

register('./no-fuse-native-hooks.js', import.meta.url)
