#!/usr/bin/env bash
# The README's first command: set up what is missing, then run a UKAI node
# on the embedded metadata store with one disk image served through a FUSE
# mount and an NBD socket. Everything lives under ./var (override with
# UKAI_HOME); Ctrl-C stops the node and unmounts.
#
#   UKAI_IMAGE=demo UKAI_IMAGE_SIZE=1G UKAI_BLOCK_SIZE=64M npm start
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

home=${UKAI_HOME:-$PWD/var}
image=${UKAI_IMAGE:-demo}
mkdir -p "$home"
config="$home/config.json"
if [ ! -f "$config" ]; then
  cat > "$config" <<JSON
{
  "image_root": "images",
  "metadata_root": "metadata",
  "control_port": ${UKAI_CONTROL_PORT:-22221},
  "proxy_port": ${UKAI_PROXY_PORT:-22222}
}
JSON
  echo "start: wrote $config"
fi

ukai=(node dist/src/cli/main.js --config "$config")
if ! "${ukai[@]}" image info "$image" >/dev/null 2>&1; then
  "${ukai[@]}" image create "$image" -s "${UKAI_IMAGE_SIZE:-1G}" -b "${UKAI_BLOCK_SIZE:-64M}"
fi

cat <<TEXT
start: serving image '$image'
  FUSE file:  $home/mnt/$image       (qemu-img info $home/mnt/$image)
  NBD export: nbd+unix:///$image?socket=$home/nbd.sock
  CLI:        node dist/src/cli/main.js --config $config image list
TEXT
exec "${ukai[@]}" server --mount "$home/mnt" --nbd "$home/nbd.sock"
