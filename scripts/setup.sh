#!/usr/bin/env bash
# Installs everything UKAI needs on a fresh Debian machine with Node.js 20:
# the Debian packages (FUSE, QEMU's and libnbd's clients), the npm packages
# from the lockfile, and the compiled TypeScript. Safe to run again: each
# step is skipped when what it makes is already there and up to date.
#
#   scripts/setup.sh           what a node needs
#   scripts/setup.sh --tests   also what the tests need (etcd, a QEMU
#                              system emulator, a kernel and busybox for a
#                              small guest VM, and chromium for the dashboard)
#   scripts/setup.sh --bench   also the benchmark's peers (fio, bindfs, nbdkit, Ceph)
#   scripts/setup.sh --force   redo every step (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

want_bench=0
want_tests=0
force=0
for arg in "$@"; do
  case "$arg" in
    --bench) want_bench=1 ;;
    --tests) want_tests=1 ;;
    --force) force=1 ;;
    *) echo "setup.sh: unknown option '$arg'" >&2; exit 2 ;;
  esac
done

# Debian packages: the package that provides each command we need.
declare -A provides=(
  [/usr/lib/x86_64-linux-gnu/libfuse.so.2]=libfuse2
  [fusermount]=fuse3
  # The native FUSE engine (native/ukai-fuse.c) is built against libfuse 3.
  [/usr/include/fuse3/fuse.h]=libfuse3-dev
  [pkg-config]=pkg-config
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [nbdinfo]=libnbd-bin
  [nbdcopy]=libnbd-bin
  [fio]=fio
  # `ukai cert`: the cluster's CA and certificates.
  [openssl]=openssl
)
if [ "$want_tests" = 1 ]; then
  provides[etcd]=etcd-server
  provides[etcdctl]=etcd-client
  # A small guest VM for the live-migration tests.
  provides[qemu-system-x86_64]=qemu-system-x86
  provides[/bin/busybox]=busybox-static
  provides['/boot/vmlinuz-*']=linux-image-amd64
  # The dashboard's browser test (puppeteer-core drives it; no browser is downloaded).
  provides[chromium]=chromium
fi
if [ "$want_bench" = 1 ]; then
  provides[bindfs]=bindfs
  provides[nbdkit]=nbdkit
  provides[qemu-nbd]=qemu-utils
  # The Ceph RBD peer: a throwaway one-host cluster (bench/lib/ceph.mjs),
  # measured with fio's rbd engine (Debian's fio is built with it).
  provides[ceph-mon]=ceph-mon
  provides[ceph-mgr]=ceph-mgr
  provides[ceph-osd]=ceph-osd
  provides[ceph]=ceph-common
  provides[rbd]=ceph-common
  provides[ceph-authtool]=ceph-common
  provides[monmaptool]=ceph-base
fi

missing=()
for what in "${!provides[@]}"; do
  if [ "$force" = 1 ]; then missing+=("${provides[$what]}"); continue; fi
  case "$what" in
    *'*'*) compgen -G "$what" >/dev/null || missing+=("${provides[$what]}") ;;
    /*) [ -e "$what" ] || missing+=("${provides[$what]}") ;;
    *) command -v "$what" >/dev/null 2>&1 || missing+=("${provides[$what]}") ;;
  esac
done
if [ "${#missing[@]}" -gt 0 ]; then
  mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
  sudo_cmd=()
  [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
  echo "setup: installing Debian packages: ${pkgs[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  # Recommends would pull a desktop's worth of packages in with QEMU.
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

# npm packages, exactly as the lockfile says; redone when the lockfile changes.
stamp=node_modules/.ukai-lock-stamp
lock_sum=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ "$force" = 1 ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$lock_sum" ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock_sum" > "$stamp"
fi

# The native addons (npm ci builds them too); rebuilt when a source changed,
# and the FUSE engine's when libfuse 3's headers came after the last build.
stale=0
[ -f build/Release/ukai_fs.node ] || stale=1
[ -n "$(find native binding.gyp -newer build/Release/ukai_fs.node 2>/dev/null)" ] && stale=1
[ -f /usr/include/fuse3/fuse.h ] && [ ! -f build/Release/ukai_fuse.node ] && stale=1
if [ "$force" = 1 ] || [ "$stale" = 1 ]; then
  echo "setup: building the native addons"
  bash scripts/build-native.sh
fi

echo "setup: compiling TypeScript"
npx tsc -p .
