"""A fresh builder (the CI runner case): `docker build --cache-from` on a new dockerd
with an empty local cache, importing what a first dockerd pushed to a registry.

dockerd 20.10 (BuildKit v0.8) exports only an inline cache (`BUILDKIT_INLINE_CACHE=1`):
results of the image's layers, not of the ExecOps that built them. The frontend
forwards the cache import to BuildKit and substitutes unchanged store paths from the
cached image (its ``stowaway.store-paths`` label), so after a leaf change only the
leaf's dependents are built again.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from buildkit_helpers import ROOT, cached_steps, out_path, script_image
from dockerd_netns import NetnsDockerd
from netns import Netns, NetnsRegistry

from daemons import Containerd, Dockerd
from stowaway.buildkit.context import make_context
from stowaway.image.config import ImageOptions

HEAVY = ROOT / "fixtures" / "buildkit" / "heavy.nix"
WORK = "2000"  # numbers gzipped per derivation: the test is about what runs, not cost

pytestmark = pytest.mark.slow


@dataclass
class Builder:
    dockerd: Dockerd
    frontend: str
    work: Path

    def build(self, salt: str, *args: str) -> str:
        ctx = make_context(
            str(HEAVY),
            ["app"],
            self.work / f"ctx{salt}",
            ImageOptions(cmd=[out_path(HEAVY, "app", {"salt": salt, "work": WORK}) + "/bin/app"]),
            argstrs={"salt": salt, "work": WORK},
        ).path
        r = self.dockerd.docker(
            "build", "--progress=plain", "-f", str(ctx / "stowaway.json"),
            "--build-arg", f"BUILDKIT_SYNTAX={self.frontend}", *args, str(ctx),
            timeout=600,
        )  # fmt: skip
        return (r.stdout + r.stderr).decode(errors="replace")


@contextmanager
def _builder(tmp: Path, netns: Netns) -> Iterator[Builder]:
    with Containerd(tmp) as ctrd, NetnsDockerd(tmp, containerd=ctrd, netns=netns) as dockerd:
        yield Builder(dockerd, script_image(dockerd, "frontend-image.sh"), tmp)


@dataclass
class Logs:
    first: str
    leaf_change: str
    no_change: str
    digest_local: str
    run_output: str


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory, have_nix: None) -> Logs:
    tmp = tmp_path_factory.mktemp("bkcache")
    with Netns() as netns, NetnsRegistry(tmp, netns) as registry:
        cache = f"{registry.host}/heavy:cache"
        with _builder(tmp / "a", netns) as a:
            first = a.build("", "--build-arg", "BUILDKIT_INLINE_CACHE=1", "-t", cache)
            a.dockerd.docker("push", cache)
        with _builder(tmp / "b", netns) as b:  # a new dockerd: empty local cache
            leaf = b.build("-x", "--cache-from", cache, "-t", "heavy:x")
            out = b.dockerd.docker("run", "--rm", "--network", "none", "heavy:x").stdout
            same = b.build("", "--cache-from", cache, "-t", "heavy:same")
    local = subprocess.run(
        ["nix-build", str(HEAVY), "-A", "join", "--no-out-link",
         "--argstr", "salt", "-x", "--argstr", "work", WORK],
        check=True, capture_output=True, text=True,
    ).stdout.split()[-1]  # fmt: skip
    return Logs(first, leaf, same, Path(local, "digest").read_text(), out.decode())


def test_first_build_runs_every_derivation(logs: Logs) -> None:
    steps = cached_steps(logs.first)
    assert len(steps) == 15 and not any(steps.values()), steps


def test_fresh_builder_rebuilds_only_the_leaf_and_its_dependents(logs: Logs) -> None:
    assert "importing cache manifest from" in logs.leaf_change
    assert "[stowaway] substitute 16 store paths from" in logs.leaf_change
    ran = {name for name, cached in cached_steps(logs.leaf_change).items() if not cached}
    assert ran == {"a1", "a2", "a3", "join", "app"}, logs.leaf_change[-3000:]
    assert logs.run_output == logs.digest_local  # same bytes as a local nix-build


def test_fresh_builder_without_changes_builds_nothing(logs: Logs) -> None:
    assert "[stowaway] substitute 16 store paths from" in logs.no_change
    assert cached_steps(logs.no_change) == {}, logs.no_change[-3000:]
