# Sourced by scripts/frontend-image.sh and scripts/nix-image.sh: their shared flags and
# settings, the debootstrap rootfs tarball made once per cache, and loading the saved
# image. Callers run with `set -euo pipefail` from the repository root.

CACHE="${STOWAWAY_CACHE:-/var/cache/stowaway}"
# The Debian mirror: $DEBIAN_MIRROR, else the one this machine's apt uses (deb822 .sources
# or one-line sources.list, as ../shared/cleanroom.sh finds it), else deb.debian.org.
apt_mirror() {
  local m
  m=$(awk '/^URIs:/ && $2 ~ /^https?:/ && $2 !~ /security/ {print $2; exit}' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$m" ] || m=$(awk '$1 == "deb" && $2 ~ /^https?:/ && $2 !~ /security/ {print $2; exit}
    $1 == "deb" && $3 ~ /^https?:/ && $3 !~ /security/ {print $3; exit}' \
    /etc/apt/sources.list 2>/dev/null || true)
  echo "${m:-http://deb.debian.org/debian}"
}
MIRROR="${DEBIAN_MIRROR:-$(apt_mirror)}"
DOCKER="${DOCKER:-/usr/bin/docker}"
# The images are made of this machine's Debian release (Debian 12: python3-grpcio 1.51 and
# Nix 2.8; Debian 13: Python 3.13 and Nix 2.26), so each suite's own packages are tested.
SUITE="${DEBIAN_SUITE:-$(. /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-bookworm}")}"
mkdir -p "$CACHE"

# parse_flags "$@": -t TAG and -o ARCHIVE into $TAG and $ARCHIVE.
parse_flags() {
  TAG=""
  ARCHIVE=""
  local opt OPTIND=1
  while getopts "t:o:" opt; do
    case "$opt" in
      t) TAG="$OPTARG" ;;
      o) ARCHIVE="$OPTARG" ;;
      *) echo "usage: $0 [-t TAG] [-o ARCHIVE]" >&2; exit 2 ;;
    esac
  done
}

# ensure_rootfs TAR PACKAGES MESSAGE [prune]: a $SUITE minbase with the comma-separated
# PACKAGES (none: debootstrap's minbase as is) into TAR unless it exists (made in a temp dir, then mv: a crash never leaves a
# partial TAR); "prune" drops apt's downloaded .debs and lists. The packages are installed
# by apt inside the new root, not by debootstrap's --include, which resolves no virtual
# packages (Debian 13's python3-grpcio needs libre2-11-absl20240722, provided by libre2-11;
# nix-bin needs perl-dbdabi-94).
ensure_rootfs() {
  local tar="$1" packages="$2" message="$3" prune="${4:-}" work
  [ -s "$tar" ] && return 0
  echo "$message" >&2
  work=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  # shellcheck disable=SC2064 # $work is expanded now: it is local and gone at exit
  trap "rm -rf '$work'" EXIT
  debootstrap --variant=minbase "$SUITE" "$work/root" "$MIRROR" >&2
  if [ -n "$packages" ]; then
    cp /etc/resolv.conf "$work/root/etc/resolv.conf"
    chroot "$work/root" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -ec \
      "apt-get update -qq && apt-get install -y -qq --no-install-recommends ${packages//,/ }" >&2
    : > "$work/root/etc/resolv.conf"
  fi
  if [ "$prune" = prune ]; then
    rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
  fi
  tar -C "$work/root" --numeric-owner -cf "$work/rootfs.tar" .
  mv "$work/rootfs.tar" "$tar"
  rm -rf "$work"
  trap - EXIT
}

# load_image SAVED BUILD_TAG: `docker load` the saved archive, retag BUILD_TAG as $TAG,
# write $ARCHIVE if asked, and print $TAG on stdout.
load_image() {
  local saved="$1" build_tag="$2"
  "$DOCKER" load -i "$saved" >&2
  "$DOCKER" tag "$build_tag" "$TAG"
  [ "$TAG" = "$build_tag" ] || "$DOCKER" rmi "$build_tag" >/dev/null
  if [ -n "$ARCHIVE" ]; then
    "$DOCKER" save -o "$ARCHIVE" "$TAG"
  fi
  echo "$TAG"
}
