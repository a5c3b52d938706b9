#!/usr/bin/env bash
# `npm run bench`: installs what the benchmark needs (Debian fio, bindfs, Ceph,
# qemu-utils, nbdkit, libnbd-bin; npm packages; the compiled node) through
# the project's own setup script, then runs the driver. Arguments go to the
# driver: `npm run bench -- --quick`, `npm run bench -- --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --bench
exec node bench/bench.mjs "$@"
