#!/usr/bin/env bash
# Install everything stowaway's demo, tests and benchmarks need on a fresh Debian
# bookworm machine (run as root). Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(
  python3 python3-venv python3-dev gcc
  nix-bin containerd runc skopeo umoci busybox-static docker-registry docker.io
  containernetworking-plugins apache2-utils iptables
  pigz xz-utils zstd bzip2 patchelf time curl ca-certificates
  debootstrap iproute2 util-linux sqlite3
)

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
getent group nixbld >/dev/null || { groupadd -r nixbld; for i in 1 2 3 4; do useradd -r -g nixbld -G nixbld -M -N -s /usr/sbin/nologin "nixbld$i" 2>/dev/null || true; done; }

# The project's virtualenv, rebuilt only when pyproject.toml changes.
stamp=.venv/.stowaway-deps
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -x .venv/bin/python || ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "setup: creating .venv with the Python dependencies"
  /usr/bin/python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
