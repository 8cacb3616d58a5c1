"""Incremental rebuild after one leaf change in fixtures/buildkit/graph.nix.

Three ways to rebuild after the leaf ``alpha`` changes (a warm build of the previous
version comes first in each case):

* stowaway frontend: one BuildKit ExecOp per derivation; only alpha and its dependents run.
* monolithic (buildkit-nix's approach): a Dockerfile on a Debian+nix image copies the
  expression in and runs one ``nix-build`` in one RUN step, with /nix in a cache mount
  so earlier outputs are reused (what buildkit-nix does).
* local ``nix-build``.

Runs a private containerd + dockerd (own netns); prints times and ratios.
Usage: .venv/bin/python bench/buildkit_bench.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "buildkit")]

from dockerd_netns import NetnsDockerd  # noqa: E402

from daemons import Containerd  # noqa: E402
from stowaway.buildkit.context import make_context  # noqa: E402
from stowaway.image.config import ImageOptions  # noqa: E402

GRAPH = ROOT / "fixtures" / "buildkit" / "graph.nix"
CACHE = Path(os.environ.get("STOWAWAY_CACHE", "/var/cache/stowaway"))
NIX_ROOTFS = CACHE / "bench-nix-rootfs-bookworm.tar"

DOCKERFILE = """\
FROM stowaway-bench-nix
COPY graph.nix /src/graph.nix
ARG SALT
RUN --mount=type=cache,target=/nix,id=stowaway-bench-nix \\
    mkdir -p /out && nix-build /src/graph.nix -A app --argstr salt "$SALT" -o /out/result \\
       --option build-users-group "" --option substituters "" \\
    && nix-store -qR /out/result | xargs -I{} cp -a --parents {} /out
"""


def nix_rootfs() -> Path:
    """Debian minbase + nix-bin + busybox-static (the fixture's bootstrap), cached.
    libdbi-perl is named because debootstrap does not resolve virtual packages
    (nix-bin → libdbd-sqlite3-perl → perl-dbdabi-94)."""
    if NIX_ROOTFS.exists():
        return NIX_ROOTFS
    work = Path(tempfile.mkdtemp(dir=CACHE))
    try:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=nix-bin,busybox-static,libdbi-perl",
             "bookworm", str(work / "root"), "http://deb.debian.org/debian"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        subprocess.run(
            ["tar", "-C", str(work / "root"), "--numeric-owner", "-cf", str(work / "r.tar"), "."],
            check=True,
        )
        os.replace(work / "r.tar", NIX_ROOTFS)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return NIX_ROOTFS


def timed(fn: Callable[[str], None], arg: str) -> float:
    t = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bkbench-"))
    rootfs = nix_rootfs()
    results: dict[str, list[float]] = {"stowaway": [], "monolithic": [], "nix-build": []}
    with Containerd(tmp) as ctrd, NetnsDockerd(tmp, containerd=ctrd) as dockerd:
        env = dockerd.client_env()
        frontend = subprocess.run(
            ["bash", str(ROOT / "scripts" / "frontend-image.sh")],
            check=True, capture_output=True, text=True, env=env,
        ).stdout.split()[-1]  # fmt: skip
        subprocess.run(
            ["/usr/bin/docker", "import", "--change", "ENV PATH=/usr/bin:/bin",
             str(rootfs), "stowaway-bench-nix"],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
        mono = tmp / "mono"
        mono.mkdir()
        shutil.copy(GRAPH, mono / "graph.nix")
        (mono / "Dockerfile").write_text(DOCKERFILE)

        def stowaway_build(salt: str) -> None:
            ctx = make_context(
                str(GRAPH), ["app"], tmp / f"ctx{salt}", ImageOptions(), argstrs={"salt": salt}
            ).path
            dockerd.docker(
                "build", "-f", str(ctx / "stowaway.json"),
                "--build-arg", f"BUILDKIT_SYNTAX={frontend}", "-t", "bench-app", str(ctx),
            )  # fmt: skip

        def mono_build(salt: str) -> None:
            dockerd.docker(
                "build", "--network", "none", "--build-arg", f"SALT={salt}",
                "-t", "bench-mono", str(mono),
            )  # fmt: skip

        def nix_build(salt: str) -> None:
            subprocess.run(
                ["nix-build", str(GRAPH), "-A", "app", "--no-out-link", "--argstr", "salt", salt,
                 "--option", "substituters", ""],
                check=True, capture_output=True,
            )  # fmt: skip

        stamp = str(time.time_ns())
        for r in range(args.rounds):
            warm, changed = f"-{stamp}-{r}a", f"-{stamp}-{r}b"
            for name, fn in (
                ("stowaway", stowaway_build),
                ("monolithic", mono_build),
                ("nix-build", nix_build),
            ):
                fn(warm)  # the previous version, built and cached
                results[name].append(timed(fn, changed))
    shutil.rmtree(tmp, ignore_errors=True)
    best = {k: min(v) for k, v in results.items()}
    print("incremental rebuild after one leaf change (13 derivations, 5 rebuilt), best of "
          f"{args.rounds}:")  # fmt: skip
    for name, t in best.items():
        print(f"  {name:<11} {t:6.2f} s   ({t / best['stowaway']:.2f}x stowaway)")


if __name__ == "__main__":
    main()
