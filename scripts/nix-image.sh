#!/bin/bash
# Build the Nix image the stowaway frontend evaluates `.nix` files in (`docker build -f
# app.nix --build-arg nix-image=TAG …`, see docs/buildkit.md) and load it into the docker
# daemon at $DOCKER_HOST (default: the system one).
#
#   scripts/nix-image.sh [-t TAG] [-o ARCHIVE]
#
# From the Debian minbase + nix-bin + busybox-static rootfs of scripts/nix-rootfs.sh
# (this machine's Debian release: Nix 2.8 or 2.26), the image keeps only what evaluation runs:
# /usr/bin/nix (as nix-instantiate, nix-store) with the shared libraries `ldd` lists,
# and busybox (/usr/bin/busybox, which the fixtures import with builtins.path, and the
# sh/sed/cp/mkdir of the eval script). ~70 MB instead of 350: `docker load` of the full
# rootfs alone cost ~20 s per test daemon.
#
# Caching (/var/cache/stowaway, override with STOWAWAY_CACHE): the debootstrap rootfs
# tarball is made once and shared with bench/buildkit_bench.py; the
# finished image is saved as a `docker save` archive named by the hash of rootfs + this
# script, so later runs (and other daemons) just `docker load` it. Prints the image tag.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/rootfs.sh
parse_flags "$@"
ROOTFS_TAR=$(bash scripts/nix-rootfs.sh)

# The rootfs is hashed by size + mtime, not content: 350 MB through sha256sum costs
# seconds on every run, and the tarball is only ever replaced as a whole (ensure_rootfs).
hash=$( (stat -c '%s %Y' "$ROOTFS_TAR"; sha256sum scripts/nix-image.sh scripts/nix-rootfs.sh scripts/lib/rootfs.sh) | sha256sum | cut -c1-16)
TAG="${TAG:-stowaway-nix:$hash}"
SAVED="$CACHE/stowaway-nix-$hash.tar"
BUILD_TAG="stowaway-nix-build:$hash"

if [ ! -s "$SAVED" ]; then
  echo "nix-image: assembling $TAG" >&2
  work=$(mktemp -d "$CACHE/nix-image.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  mkdir "$work/root" "$work/slim"
  tar -C "$work/root" -xf "$ROOTFS_TAR" ./usr ./lib ./lib64 ./bin ./etc/ld.so.cache
  slim="$work/slim"
  mkdir -p "$slim/usr/bin" "$slim/usr/lib" "$slim/usr/lib64" "$slim/etc" "$slim/tmp"
  for l in bin lib lib64 sbin; do ln -s "usr/$l" "$slim/$l"; done
  cp "$work/root/usr/bin/nix" "$work/root/usr/bin/busybox" "$slim/usr/bin/"
  for t in nix-instantiate nix-store; do ln -s nix "$slim/usr/bin/$t"; done
  for t in sh sed cp mkdir cat ls; do ln -s busybox "$slim/usr/bin/$t"; done
  # every library the dynamic loader resolves for nix, at its /usr path (merged /usr)
  chroot "$work/root" /usr/bin/ldd /usr/bin/nix \
    | awk '$3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u \
    | while read -r lib; do
        dest="/usr${lib#/usr}"
        mkdir -p "$slim$(dirname "$dest")"
        cp -L "$work/root$lib" "$slim$dest"
      done
  printf 'root:x:0:0:root:/tmp:/bin/sh\n' > "$slim/etc/passwd"
  printf 'root:x:0:\n' > "$slim/etc/group"
  chmod 1777 "$slim/tmp"
  tar -C "$slim" --numeric-owner --owner=0 --group=0 --mtime=@1 --sort=name \
    -cf "$work/image.tar" .
  "$DOCKER" import --change 'ENV PATH=/usr/bin:/bin' "$work/image.tar" "$BUILD_TAG" >&2
  "$DOCKER" save -o "$work/saved.tar" "$BUILD_TAG"
  find "$CACHE" -maxdepth 1 -name 'stowaway-nix-*.tar' ! -name "${SAVED##*/}" -delete
  mv "$work/saved.tar" "$SAVED"
  "$DOCKER" rmi "$BUILD_TAG" >/dev/null
  rm -rf "$work"
  trap - EXIT
fi

load_image "$SAVED" "$BUILD_TAG"
