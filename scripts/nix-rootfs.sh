#!/bin/bash
# Print the path of the Debian minbase + nix-bin + busybox-static rootfs tarball (this
# machine's Debian release), debootstrapping it once into the cache if missing. Shared by
# scripts/nix-image.sh and bench/buildkit_bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/rootfs.sh
ROOTFS_TAR="$CACHE/nix-rootfs-$SUITE.tar"
ensure_rootfs "$ROOTFS_TAR" nix-bin,busybox-static \
  "nix-rootfs: debootstrap $SUITE minbase + nix-bin (once; cached in $ROOTFS_TAR)"
echo "$ROOTFS_TAR"
