#!/usr/bin/env bash
# `make demo`: build a small Nix closure with the local nix, compose its image with
# stowaway, run it in a private containerd, and print the layer table.
set -euo pipefail
cd "$(dirname "$0")/.."
STOWAWAY=.venv/bin/stowaway
work=$(mktemp -d /tmp/stowaway-demo.XXXXXX)
cleanup() {
  if [[ -f $work/containerd.pid ]]; then
    kill "$(cat "$work/containerd.pid")" 2>/dev/null || true
    sleep 0.5
  fi
  umount -R "$work/root" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> building the demo closure with nix"
# no binary cache: the demo builds from local sources (a fresh machine reaches none)
app=$(nix-build fixtures/demo.nix --no-out-link --option substituters "" 2>/dev/null)
nix-store -qR "$app" | sed 's/^/    /'

echo "==> composing the image (layers are cached: run the demo twice and nothing is re-tarred)"
$STOWAWAY build "$app" --entrypoint "$app/bin/demo" -o "oci-archive:$work/demo.tar:demo"

echo "==> running it in a private containerd"
cat > "$work/config.toml" <<CFG
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.ttrpc.sock"
CFG
containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
echo $! >"$work/containerd.pid"
for _ in $(seq 50); do [[ -S $work/containerd.sock ]] && break; sleep 0.1; done
ctr() { command ctr -a "$work/containerd.sock" -n stowaway-demo "$@"; }
ctr image import --base-name docker.io/library/stowaway-demo "$work/demo.tar" >/dev/null
ref=$(ctr image ls -q | head -1)
echo "    image: $ref"
ctr run --rm "$ref" demo-run | sed 's/^/    container says: /'
