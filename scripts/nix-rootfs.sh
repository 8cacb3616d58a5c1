#!/bin/bash
# Print the path of the Debian minbase + nix-bin + busybox-static rootfs tarball (this
# machine's Debian release), debootstrapping it once into the cache if missing. Shared by
# scripts/nix-image.sh and bench/buildkit_bench.py. libdbi-perl is named because
# debootstrap does not resolve virtual packages (nix-bin → libdbd-sqlite3-perl →
# perl-dbdabi-94).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/rootfs.sh
ROOTFS_TAR="$CACHE/nix-rootfs-$SUITE.tar"
ensure_rootfs "$ROOTFS_TAR" nix-bin,busybox-static,libdbi-perl \
  "nix-rootfs: debootstrap $SUITE minbase + nix-bin (once; cached in $ROOTFS_TAR)"
echo "$ROOTFS_TAR"
