#!/usr/bin/env bash
# Builds the native addons with node-gyp against the installed Node.js
# headers (nothing is downloaded): the file addon (native/ukai-fs.c ->
# build/Release/ukai_fs.node) and, when libfuse 3's headers are there
# (Debian: libfuse3-dev), the native FUSE engine (native/ukai-fuse.c ->
# build/Release/ukai_fuse.node). Without them the install goes on and the
# FUSE mount uses fuse-native. Run by `npm ci` (the package's install
# script) and by setup.sh when a source is newer than its addon.
set -euo pipefail
cd "$(dirname "$0")/.."
nodedir=()
prefix=$(dirname "$(dirname "$(command -v node)")")
for d in "$prefix" /usr /usr/local; do
  if [ -f "$d/include/node/node_api.h" ]; then nodedir=(--nodedir="$d"); break; fi
done
if [ "${#nodedir[@]}" = 0 ]; then
  echo "build-native: Node.js headers (include/node/node_api.h) not found; install Node.js with its headers" >&2
  exit 1
fi
gyp=node-gyp
command -v node-gyp >/dev/null 2>&1 || gyp="node $(dirname "$(command -v npm)")/../lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js"
if ! pkg-config --exists fuse3 2>/dev/null; then
  echo "build-native: libfuse 3 headers not found (Debian: apt-get install libfuse3-dev pkg-config): the native FUSE engine is not built; a FUSE mount uses fuse-native (fuse_engine \"fuse-native\")" >&2
fi
$gyp rebuild "${nodedir[@]}" --loglevel=error >/dev/null
test -f build/Release/ukai_fs.node
