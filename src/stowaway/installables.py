"""Turn what a user names on the command line into store paths.

Accepted: store paths (``/nix/store/<hash>-<name>``, also a file below one), symlinks
to store paths such as ``./result``, and ``-f FILE.nix [-A ATTR]`` which is built
with ``nix-build`` when nix is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from stowaway.errors import StowawayError
from stowaway.store.model import STORE_DIR
from stowaway.store.paths import parse_store_path


def resolve(installables: Sequence[str], *, store_dir: str = STORE_DIR) -> list[str]:
    """Store paths for the given strings, in order, without duplicates."""
    out: list[str] = []
    for item in installables:
        target = item
        if not item.startswith(store_dir + "/") and os.path.lexists(item):
            target = os.path.realpath(item)
        if not target.startswith(store_dir + "/"):
            raise StowawayError(
                f"{item!r} is not a store path or a link to one",
                hint=f"pass a path under {store_dir}/, a ./result link, or -f FILE.nix",
            )
        sp = parse_store_path(target, store_dir=store_dir, strict=False)
        if sp.path not in out:
            out.append(sp.path)
    return out


def build_nix_file(file: str, attrs: Sequence[str]) -> list[str]:
    """Build ``file`` (optionally attributes of it) with nix-build; return the outputs."""
    if shutil.which("nix-build") is None:
        raise StowawayError(
            f"cannot evaluate {file}: nix-build is not installed",
            hint="install nix (Debian: apt-get install nix-bin) or pass store paths instead",
        )
    if not os.path.exists(file):
        raise StowawayError(f"Nix file {file!r} does not exist")
    cmd = ["nix-build", file, "--no-out-link"]
    for a in attrs:
        cmd += ["-A", a]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise StowawayError(f"nix-build {file} failed (exit {proc.returncode}):\n{tail}")
    return [line for line in proc.stdout.split() if line.startswith("/")]
