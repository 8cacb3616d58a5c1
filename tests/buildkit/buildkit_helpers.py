"""Helpers the end-to-end BuildKit tests share: image scripts, nix reference builds,
and reading BuildKit's plain progress log."""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
from collections.abc import Mapping
from pathlib import Path

from daemons import Dockerd

ROOT = Path(__file__).resolve().parents[2]
GRAPH = ROOT / "fixtures" / "buildkit" / "graph.nix"


def script_image(dockerd: Dockerd, script: str, *args: str, timeout: int = 900) -> str:
    """Run scripts/``script`` (frontend-image.sh, nix-image.sh) against ``dockerd``;
    the image tag it printed last."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        env=dockerd.client_env(),
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()[-1]


def out_path(nix_file: Path, attr: str, argstrs: Mapping[str, str]) -> str:
    """``attr``'s output path in ``nix_file`` called with ``argstrs`` (evaluation only)."""
    args = "".join(f"{k} = {json.dumps(v)}; " for k, v in argstrs.items())
    expr = f"(import {nix_file} {{ {args}}}).{attr}.outPath"
    out = subprocess.run(
        ["nix-instantiate", "--eval", "--json", "--expr", expr],
        check=True,
        capture_output=True,
        text=True,
    )
    return str(json.loads(out.stdout))


def nix_build(attr: str, salt: str = "") -> str:
    """Build ``attr`` of the graph fixture locally: the reference BuildKit must match."""
    out = subprocess.run(
        ["nix-build", str(GRAPH), "-A", attr, "--no-out-link", "--argstr", "salt", salt],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.split()[-1]


def cached_steps(log: str) -> dict[str, bool]:
    """nix-build <name> → whether BuildKit reported the step CACHED."""
    names: dict[str, str] = {}
    cached: set[str] = set()
    for line in log.splitlines():
        m = re.match(r"#(\d+) nix-build (\S+) /nix/store/", line)
        if m:
            names[m.group(1)] = m.group(2)
        m = re.match(r"#(\d+) CACHED$", line)
        if m:
            cached.add(m.group(1))
    return {name: num in cached for num, name in names.items()}


def _exported(dockerd: Dockerd, tag: str) -> bytes:
    """The image's filesystem as a tar (docker create + export)."""
    cid = dockerd.docker("create", tag).stdout.decode().strip()
    try:
        return dockerd.docker("export", cid).stdout
    finally:
        dockerd.docker("rm", cid)


def export(dockerd: Dockerd, tag: str, dest: Path) -> None:
    """The image's filesystem, unpacked into ``dest``."""
    # tar(1), not tarfile: Debian 12's Python 3.11.2 has no extraction filters, and
    # 3.13 warns without one; as root, tar keeps owners and modes
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=_exported(dockerd, tag), check=True)


def exported_modes(dockerd: Dockerd, tag: str) -> dict[str, int]:
    """Path (no leading /) → permission bits (with setuid/setgid/sticky) of every member
    of the image's filesystem as `docker export` writes it."""
    with tarfile.open(fileobj=io.BytesIO(_exported(dockerd, tag))) as tf:
        return {m.name.strip("/"): m.mode & 0o7777 for m in tf.getmembers()}
