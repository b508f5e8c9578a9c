#!/usr/bin/env bash
# Build the ballast image from deploy/Dockerfile (tag ballast:dev unless --tag).
#
#   deploy/build-image.sh              from source: compiled in rust:1-bookworm, run on
#                                      debian:bookworm-slim (the way users build it; both
#                                      images come from a registry)
#   deploy/build-image.sh --prebuilt   `cargo build --bins` here, then that binary on
#                                      debian:bookworm-slim (or --base IMAGE)
#   deploy/build-image.sh --offline    `cargo build --bins` here, then that binary on a base made
#                                      here from its shared libraries, the dynamic loader, /bin/sh,
#                                      sleep and the docker-plugin's tools (nbdfuse, losetup,
#                                      mkfs.ext4, blkid, mount, umount, fusermount3; nbd-client if
#                                      installed) (tagged ballast-base:offline): pulls nothing
#
# Options: --tag TAG; --binary PATH uses that binary instead of building one;
# --base IMAGE the image to run on (default debian:bookworm-slim).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=source tag=ballast:dev binary="" base=debian:bookworm-slim
offline_base=ballast-base:offline
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --offline) mode=offline ;;
    --prebuilt) mode=prebuilt ;;
    --tag) tag=${2:?--tag needs a value}; shift ;;
    --binary) binary=${2:?--binary needs a path}; shift ;;
    --base) base=${2:?--base needs an image}; shift ;;
    -h|--help) usage ;;
    *) echo "build-image: unknown argument $1" >&2; usage ;;
  esac
  shift
done

if [ "$mode" = source ]; then
  echo "build-image: compiling from source in the Dockerfile (context: $(pwd)) to run on $base"
  exec docker build -f deploy/Dockerfile --build-arg "BASE=$base" -t "$tag" .
fi

if [ -z "$binary" ]; then
  # shellcheck source=scripts/env.sh
  . scripts/env.sh
  echo "build-image: cargo build --bins"
  cargo build --bins
  binary="$CARGO_TARGET_DIR/debug/ballast"
fi
[ -x "$binary" ] || { echo "build-image: no executable binary at $binary" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The shared objects an ELF file loads, the dynamic loader included, one path a line.
libs_of() {
  ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
}

# The tools `ballast docker-plugin` runs to attach and mount a volume.
plugin_tools=(nbdfuse losetup mkfs.ext4 blkid mount umount fusermount3)
optional_tools=(nbd-client)

# A root file system with just what the binary (and the compose init
# service's shell loop) needs: its shared libraries, the loader, /bin/sh,
# sleep; and the docker-plugin's tools with theirs, at their paths here.
make_rootfs() {
  local root=$1 sh sleep f t tools=()
  sh=$(readlink -f /bin/sh) sleep=$(command -v sleep)
  mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/usr/local/bin"
  chmod 1777 "$root/tmp"
  cp "$sh" "$root/bin/sh"
  cp "$sleep" "$root/bin/sleep"
  for t in "${plugin_tools[@]}"; do
    f=$(PATH="$PATH:/usr/sbin:/sbin" command -v "$t") || { echo "build-image: $t not found (scripts/setup.sh test installs it)" >&2; exit 1; }
    tools+=("$f")
  done
  for t in "${optional_tools[@]}"; do
    if f=$(PATH="$PATH:/usr/sbin:/sbin" command -v "$t"); then tools+=("$f"); fi
  done
  for f in "${tools[@]}"; do
    # A link (mkfs.ext4 -> mke2fs) becomes a file of the link's name: mke2fs
    # picks ext4 from the name it is called by.
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
  done
  for f in /etc/mke2fs.conf /etc/fuse.conf; do
    if [ -e "$f" ]; then cp "$f" "$root$f"; fi
  done
  ln -s /proc/self/mounts "$root/etc/mtab"
  {
    libs_of "$binary"; libs_of "$sh"; libs_of "$sleep"
    for f in "${tools[@]}"; do libs_of "$f"; done
    # Host lookups: glibc's NSS modules, where this glibc still ships them apart.
    for f in /lib/x86_64-linux-gnu/libnss_dns.so.2 /lib/x86_64-linux-gnu/libnss_files.so.2; do
      if [ -e "$f" ]; then echo "$f"; fi
    done
  } | sort -u | while read -r f; do
    cp -L --parents "$f" "$root/"
  done
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  printf 'root:x:0:0:root:/root:/bin/sh\nballast:x:10001:10001:ballast:/data:/bin/sh\n' >"$root/etc/passwd"
  printf 'root:x:0:\nballast:x:10001:\n' >"$root/etc/group"
}

import_rootfs() { tar -C "$1" --numeric-owner --owner=0 --group=0 -cf - . | docker import - "$2" >/dev/null; }
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
# Drop an image a rebuild untagged, unless something still uses it.
drop_if_replaced() { if [ -n "$1" ] && [ "$1" != "$(image_id "$2")" ]; then docker rmi "$1" >/dev/null 2>&1 || true; fi; }
old_image=$(image_id "$tag") old_base=$(image_id "$offline_base")

# The base to run on (offline) and the builder image that hands the Dockerfile
# the binary: the same files, plus the binary and /empty in the builder.
root="$work/rootfs"
make_rootfs "$root"
if [ "$mode" = offline ]; then
  import_rootfs "$root" "$offline_base"
  echo "build-image: imported $offline_base ($(du -sh "$root" | cut -f1), $(find "$root" -type f | wc -l) files)"
  base=$offline_base
fi
builder=ballast-builder:prebuilt
install -m 0755 "$binary" "$root/usr/local/bin/ballast"
mkdir "$root/empty"
import_rootfs "$root" "$builder"
mkdir "$work/context"
echo "build-image: $binary ($(du -h "$binary" | cut -f1)) on $base -> $tag"
docker build -q -f deploy/Dockerfile --build-arg "BUILDER=$builder" --build-arg "BASE=$base" -t "$tag" "$work/context" >/dev/null
docker rmi "$builder" >/dev/null
docker images -q -f dangling=true -f label=org.ballast.stage=build | xargs -r docker rmi >/dev/null 2>&1 || true
drop_if_replaced "$old_image" "$tag"
drop_if_replaced "$old_base" "$offline_base"
docker run --rm "$tag" --version
