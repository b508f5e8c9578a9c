#!/usr/bin/env bash
# Install what building and testing Ballast needs on a Debian machine, once.
#   scripts/setup.sh build   # compilers' needs only (libclang for RocksDB bindings, protoc)
#   scripts/setup.sh test    # plus the real NBD clients the tests drive
set -euo pipefail
want=(libclang-dev protobuf-compiler ccache)
if [ "${1:-build}" = test ]; then
  want+=(libnbd-bin python3-libnbd fio fuse3 e2fsprogs qemu-utils nbdkit util-linux)
fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
