#!/usr/bin/env bash
# Builds the native file addon (native/ukai-fs.c -> build/Release/ukai_fs.node)
# with node-gyp against the installed Node.js headers: nothing is downloaded.
# Run by `npm ci` (the package's install script) and by setup.sh when the
# source is newer than the addon.
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
$gyp rebuild "${nodedir[@]}" --loglevel=error >/dev/null
test -f build/Release/ukai_fs.node
