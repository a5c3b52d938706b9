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

# The dashboard's address, from the config as the node reads it (an existing
# config may name another port or address, or tls_dir: then https).
ui=$(node --input-type=module -e '
const { loadConfig } = await import("./dist/src/config/config.js")
const c = loadConfig(process.argv[1])
const wild = c.control_address === "0.0.0.0" || c.control_address === "::" || c.control_address === ""
const host = wild ? "127.0.0.1" : c.control_address.includes(":") ? `[${c.control_address}]` : c.control_address
process.stdout.write(`${c.tls_dir === undefined ? "http" : "https"}://${host}:${c.control_port}/ui/`)
' "$config")

# The token is the cluster's long-lived secret: it is not printed here (this
# output may end up in a log), only the command that prints it.
cat <<TEXT
start: serving image '$image'
  FUSE file:  $home/mnt/$image       (qemu-img info $home/mnt/$image)
  NBD export: nbd+unix:///$image?socket=$home/nbd.sock
  CLI:        node dist/src/cli/main.js --config $config image list
  Dashboard:  $ui
              token: node dist/src/cli/main.js --config $config control-token
              (paste it into the page's Token field, or open $ui#token=TOKEN once)
TEXT
exec "${ukai[@]}" server --mount "$home/mnt" --nbd "$home/nbd.sock"
