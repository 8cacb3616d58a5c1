#!/bin/bash
# Build the stowaway BuildKit frontend image and load it into the docker daemon at
# $DOCKER_HOST (default: the system one).
#
#   scripts/frontend-image.sh [-t TAG] [-o ARCHIVE]
#
# Image = a Debian minbase (this machine's release) rootfs with python3, python3-grpcio, python3-protobuf
# (nothing else: the frontend imports only those and the stdlib) + the frontend's modules
# under /opt/stowaway, ENTRYPOINT python3 -m stowaway.buildkit.frontend.
#
# Caching (/var/cache/stowaway, override with STOWAWAY_CACHE): the debootstrap rootfs
# tarball is made once; the finished image is saved as a `docker save` archive named by
# the hash of rootfs + code, so later runs (and other daemons) just `docker load` it.
# Prints the image tag on stdout. Push it with `docker tag` + `docker push` as usual.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/rootfs.sh
parse_flags "$@"
ROOTFS_TAR="$CACHE/frontend-rootfs-$SUITE.tar"

# The frontend's modules: stdlib-only parts of stowaway plus the generated stubs (the
# package __init__ files import nothing heavy: stowaway.store's exports are lazy).
FILES=(
  src/stowaway/__init__.py
  src/stowaway/errors.py
  src/stowaway/store/__init__.py
  src/stowaway/store/model.py
  src/stowaway/store/drv.py
  src/stowaway/image/__init__.py
  src/stowaway/image/model.py
  src/stowaway/image/digest.py
  src/stowaway/image/config.py
  src/stowaway/image/ownership.py
  src/stowaway/image/platform.py
  src/stowaway/layering/*.py
  src/stowaway/buildkit/__init__.py
  src/stowaway/buildkit/drv.py
  src/stowaway/buildkit/llb.py
  src/stowaway/buildkit/spec.py
  src/stowaway/buildkit/evaluate.py
  src/stowaway/buildkit/llb_graph.py
  src/stowaway/buildkit/frontend.py
  src/stowaway/buildkit/gateway.py
  src/stowaway/buildkit/pb.py
  src/stowaway/buildkit/proto/__init__.py
  src/stowaway/buildkit/proto/*_pb2.py
  src/stowaway/buildkit/proto/*_pb2_grpc.py
)

ensure_rootfs "$ROOTFS_TAR" python3,python3-grpcio,python3-protobuf \
  "frontend-image: debootstrap $SUITE minbase (once; cached in $ROOTFS_TAR)" prune

hash=$( (sha256sum "$ROOTFS_TAR" | cut -d' ' -f1; sha256sum "${FILES[@]}" scripts/frontend-image.sh scripts/lib/rootfs.sh) \
  | sha256sum | cut -c1-16)
TAG="${TAG:-stowaway-frontend:$hash}"
SAVED="$CACHE/stowaway-frontend-$hash.tar"

if [ ! -s "$SAVED" ]; then
  echo "frontend-image: assembling $TAG" >&2
  work=$(mktemp -d "$CACHE/image.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  cp "$ROOTFS_TAR" "$work/image.tar"
  mkdir -p "$work/add/opt/stowaway"
  for f in "${FILES[@]}"; do
    dest="$work/add/opt/stowaway/${f#src/}"
    mkdir -p "$(dirname "$dest")"
    cp "$f" "$dest"
  done
  # bytecode made here saves the frontend ~0.08 s of compiling on every build: this
  # machine's /usr/bin/python3 is the image's (same Debian release); unchecked-hash .pycs
  # do not depend on file times, so the image stays reproducible
  /usr/bin/python3 -m compileall -q --invalidation-mode unchecked-hash -d /opt/stowaway \
    "$work/add/opt/stowaway" >&2
  tar -C "$work/add" --numeric-owner --owner=0 --group=0 --mtime=@1 --sort=name \
    -rf "$work/image.tar" ./opt/stowaway
  tmp_tag="stowaway-frontend-build:$hash"
  "$DOCKER" import \
    --change 'ENV PATH=/usr/bin:/bin' \
    --change 'ENV PYTHONPATH=/opt/stowaway' \
    --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
    --change 'ENTRYPOINT ["/usr/bin/python3", "-m", "stowaway.buildkit.frontend"]' \
    "$work/image.tar" "$tmp_tag" >&2
  "$DOCKER" save -o "$work/saved.tar" "$tmp_tag"
  # only the current code's image is worth keeping: drop archives of older versions
  find "$CACHE" -maxdepth 1 -name 'stowaway-frontend-*.tar' ! -name "${SAVED##*/}" -delete
  mv "$work/saved.tar" "$SAVED"
  "$DOCKER" rmi "$tmp_tag" >/dev/null
  rm -rf "$work"
  trap - EXIT
fi

load_image "$SAVED" "stowaway-frontend-build:$hash"
