#!/usr/bin/env bash
# Install everything stowaway's demo, tests and benchmarks need on a fresh Debian 12
# (bookworm) or 13 (trixie) machine, as root. Idempotent: a second run installs nothing
# and says nothing. What it changes on the machine, each said when done:
#   - Debian packages (the list below; on Debian 13 also docker-cli and docker-buildx,
#     which hold the docker client there);
#   - the nixbld group and build users nixbld1..4 (what root's nix builds run as), and
#     /nix/var/nix/{gcroots,profiles};
#   - the project's .venv, from requirements/dev.lock (exact versions).
# It writes no nix.conf and no other machine-wide setting: the fixtures build in Nix's
# default sandbox, and the tests and the demo pass their nix options on the command line.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(
  python3 python3-venv python3-dev gcc
  nix-bin containerd runc skopeo umoci busybox-static docker-registry docker.io
  containernetworking-plugins apache2-utils iptables
  golang-docker-credential-helpers pass gnupg
  pigz xz-utils zstd bzip2 patchelf time curl ca-certificates
  debootstrap iproute2 util-linux sqlite3
  systemd  # systemd-analyze verifies the shipped units (tests/test_deploy.py); nothing is started
)

# Debian 13 split the docker client out of docker.io (docker-cli, plus docker-buildx for
# BuildKit builds); Debian 12's docker.io still holds it.
. /etc/os-release
case "${VERSION_CODENAME:-}" in
  bookworm) ;;
  *) DEBS+=(docker-cli docker-buildx) ;;
esac

missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# nix-bin works for root without its daemon; make sure the store and build users exist.
mkdir -p /nix/var/nix/gcroots /nix/var/nix/profiles
if ! getent group nixbld >/dev/null; then
  echo "setup: adding the nixbld group and build users nixbld1..4"
  groupadd -r nixbld
  for i in 1 2 3 4; do useradd -r -g nixbld -G nixbld -M -N -s /usr/sbin/nologin "nixbld$i" 2>/dev/null || true; done
fi

# cosign and oras (image signatures and SBOM referrers; tests/sinks/test_attach.py and
# tests/image/test_signing_keys.py run the real ones):
# Debian 13 packages both; Debian 12 has neither, so there the trixie .debs are fetched
# by pinned hash (each depends only on libc6 >= 2.34, which bookworm has).
if ! command -v cosign >/dev/null || ! command -v oras >/dev/null; then
  echo "setup: installing cosign and oras"
  if [[ ${VERSION_CODENAME:-} == bookworm ]]; then
    pool=http://deb.debian.org/debian/pool/main
    tmp=$(mktemp -d)
    while read -r url sha; do
      curl -fsSL -o "$tmp/${url##*/}" "$pool/$url"
      echo "$sha  $tmp/${url##*/}" | sha256sum -c --quiet -
    done <<'DEBS_EOF'
c/cosign/cosign_2.5.0-2+b5_amd64.deb 3b6eadd27f3c4c00bfa7eab5c2397a6a15a763630c7a1d40d06ff60d24799eef
o/oras/oras_1.2.0-1+b9_amd64.deb 5f138419f0e4bc128ee4717b06190dc5770cf120ab7e3a991e5b3e9158f3189e
DEBS_EOF
    dpkg -i "$tmp"/*.deb >/dev/null
    rm -rf "$tmp"
  else
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cosign oras >/dev/null
  fi
fi

# The project's virtualenv, rebuilt only when pyproject.toml or the lock changes.
stamp=.venv/.stowaway-deps
want=$(cat pyproject.toml requirements/dev.lock | sha256sum | cut -d' ' -f1)
if [[ ! -x .venv/bin/python || ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "setup: creating .venv with the Python dependencies (requirements/dev.lock)"
  rm -rf .venv
  /usr/bin/python3 -m venv .venv
  .venv/bin/pip install -q -c requirements/dev.lock -e '.[test]'
  echo "$want" > "$stamp"
fi
