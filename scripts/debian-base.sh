#!/bin/bash
# Print the path of a plain Debian minbase rootfs tarball (this machine's Debian release),
# debootstrapping it once into the cache if missing: the real base image of the
# `stowaway build --from` tests (tests/sinks/test_base_image.py).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/rootfs.sh
ROOTFS_TAR="$CACHE/debian-base-$SUITE.tar"
ensure_rootfs "$ROOTFS_TAR" "" \
  "debian-base: debootstrap $SUITE minbase (once; cached in $ROOTFS_TAR)" prune
echo "$ROOTFS_TAR"
