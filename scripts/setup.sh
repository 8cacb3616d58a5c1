#!/usr/bin/env bash
# Install everything stowaway's demo, tests and benchmarks need on a fresh Debian 12
# (bookworm) or 13 (trixie) machine, as root. Idempotent: a second run installs nothing
# and says nothing. What it changes on the machine, each said when done:
#   - Debian packages (the list below; on Debian 13 also docker-cli and docker-buildx,
#     which hold the docker client there);
#   - the nixbld group and build users nixbld1..4 (what root's nix builds run as), and
#     /nix/var/nix/{gcroots,profiles};
#   - the project's .venv, from requirements/dev.lock (exact versions);
#   - for multi-arch images: a qemu-aarch64 binfmt registration, binfmt_misc mounted, and
#     an arm64 busybox under /usr/local/lib/stowaway-fixtures (its block below says how).
# It writes no nix.conf and no other machine-wide setting but that binfmt entry: the
# fixtures build in Nix's default sandbox, and the tests and the demo pass their nix
# options on the command line.
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
  # multi-arch images (tests/test_multiarch.py): arm64 binaries run under qemu, and podman
  # is a client that must pick its platform from an index (`podman pull --arch`)
  qemu-user-static podman
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

# fetch_deb POOL_PATH SHA256 DIR: a Debian .deb from the archive's pool, checked against
# its pinned hash, saved in DIR (for packages the release lacks, and foreign-arch files).
fetch_deb() {
  curl -fsSL -o "$3/${1##*/}" "http://deb.debian.org/debian/pool/main/$1"
  echo "$2  $3/${1##*/}" | sha256sum -c --quiet -
}

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
    tmp=$(mktemp -d)
    fetch_deb c/cosign/cosign_2.5.0-2+b5_amd64.deb \
      3b6eadd27f3c4c00bfa7eab5c2397a6a15a763630c7a1d40d06ff60d24799eef "$tmp"
    fetch_deb o/oras/oras_1.2.0-1+b9_amd64.deb \
      5f138419f0e4bc128ee4717b06190dc5770cf120ab7e3a991e5b3e9158f3189e "$tmp"
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

# --- multi-arch images (tests/test_multiarch.py, fixtures/multiarch.nix) -------------------
# A real aarch64-linux closure is built here and run under qemu. What this changes:
#   - mounts binfmt_misc on /proc/sys/fs/binfmt_misc when it is not mounted;
#   - registers qemu-aarch64 with the kernel unless an entry with the F flag is there
#     (one without F is replaced). F makes the kernel open the interpreter now, so
#     Nix's build sandbox and chroots (the clean rooms) run arm64 binaries without a
#     qemu of their own. The registration is the kernel's: it lasts until reboot.
#   - puts Debian's arm64 busybox-static (the .deb, pinned by sha256) at
#     /usr/local/lib/stowaway-fixtures/aarch64-linux/busybox: the arm64 fixture's builder.
binfmt=/proc/sys/fs/binfmt_misc
if [[ ! -e $binfmt/register ]]; then
  echo "setup: mounting binfmt_misc on $binfmt"
  mount -t binfmt_misc binfmt_misc "$binfmt"
fi
if ! grep -qs '^flags:.*F' "$binfmt/qemu-aarch64"; then
  if [[ -e $binfmt/qemu-aarch64 ]]; then
    echo "setup: replacing the qemu-aarch64 binfmt entry (it lacks the F flag)"
    echo -1 > "$binfmt/qemu-aarch64"
  fi
  conf=/usr/lib/binfmt.d/qemu-aarch64.conf
  if [[ -f $conf ]]; then
    line=$(grep -v '^#' "$conf" | head -n1)
  else
    line=":qemu-aarch64:M::\\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:$(command -v qemu-aarch64-static || command -v qemu-aarch64):"
  fi
  [[ ${line##*:} == *F* ]] || line="${line}F"
  echo "setup: registering qemu-aarch64 with binfmt_misc (flags ${line##*:})"
  printf '%s' "$line" > "$binfmt/register"
fi
arm_dir=/usr/local/lib/stowaway-fixtures/aarch64-linux
if [[ ! -x $arm_dir/busybox ]]; then
  deb=busybox-static_1.35.0-4+deb12u1+b1_arm64.deb
  echo "setup: fetching Debian's arm64 busybox-static into $arm_dir"
  tmp=$(mktemp -d)
  fetch_deb "b/busybox/$deb" 732c9135564fc71337e0e05fb4da4d11e6c28c1834bce3e405e575afef2a52f5 "$tmp"
  dpkg-deb -x "$tmp/$deb" "$tmp/x"
  mkdir -p "$arm_dir"
  install -m 0755 "$tmp/x/bin/busybox" "$arm_dir/busybox.new" && mv "$arm_dir/busybox.new" "$arm_dir/busybox"
  rm -rf "$tmp"
fi
