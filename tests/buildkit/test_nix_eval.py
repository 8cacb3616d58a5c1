"""End to end, no nix on the client: `docker build -f graph.nix` with the stowaway
frontend evaluates the file in an ExecOp on the Nix image (scripts/nix-image.sh), then
builds each derivation in its own ExecOp, on a private dockerd 20.10 of its own (so no
step is cached by the other BuildKit tests' builds).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from buildkit_helpers import GRAPH, cached_steps, export, exported_modes, nix_build, script_image
from dockerd_netns import NetnsDockerd

from daemons import Containerd, Dockerd
from stowaway.store.nar import nar_hash_and_size

pytestmark = pytest.mark.slow


@dataclass
class Env:
    dockerd: Dockerd
    frontend: str
    nix_image: str
    ctx: Path
    work: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, have_nix: None) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("bknix")
    ctx = tmp / "ctx"
    ctx.mkdir()
    shutil.copy(GRAPH, ctx / "graph.nix")  # the context holds the Nix file and nothing else
    with Containerd(tmp) as ctrd, NetnsDockerd(tmp, containerd=ctrd) as dockerd:
        yield Env(
            dockerd,
            script_image(dockerd, "frontend-image.sh", timeout=1800),
            script_image(dockerd, "nix-image.sh", timeout=1800),
            ctx,
            tmp,
        )


def _build(env: Env, tag: str, *args: str, check: bool = True) -> tuple[int, str]:
    r = env.dockerd.docker(
        "build",
        "--progress=plain",
        "-f",
        str(env.ctx / "graph.nix"),
        "--build-arg",
        f"BUILDKIT_SYNTAX={env.frontend}",
        "--build-arg",
        f"nix-image={env.nix_image}",
        *args,
        "-t",
        tag,
        str(env.ctx),
        check=check,
        timeout=600,
    )
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


APP_ARGS = ("--build-arg", "attr=app", "--build-arg", "entrypoint=@out@/bin/app",
            "--build-arg", "env=GREETING=hi")  # fmt: skip


def _eval_cached(log: str) -> bool:
    num = re.search(r"^#(\d+) nix-instantiate graph.nix -A app", log, re.M)
    assert num, log[-3000:]
    return f"#{num.group(1)} CACHED" in log.splitlines()


def test_nix_file_builds_without_client_nix(env: Env) -> None:
    _, log = _build(env, "nixeval-app:1", *APP_ARGS)
    assert not _eval_cached(log)
    steps = cached_steps(log)
    assert len(steps) == 12 and not any(steps.values()), steps
    run = env.dockerd.docker("run", "--rm", "--network", "none", "nixeval-app:1").stdout.decode()
    assert "alpha\nbeta\nbeta\ngamma tool\nsplit library\ngreeting=hello\npinned-content\n" in run
    app = nix_build("app")
    inspect = env.dockerd.docker("image", "inspect", "nixeval-app:1").stdout.decode()
    assert f'"{app}/bin/app"' in inspect and '"GREETING=hi"' in inspect
    root = env.work / "exported"
    export(env.dockerd, "nixeval-app:1", root)
    closure = subprocess.run(
        ["nix-store", "-qR", app], check=True, capture_output=True, text=True
    ).stdout.split()
    assert len(closure) >= 8
    for path in closure:
        want = subprocess.run(
            ["nix-store", "-q", "--hash", path], check=True, capture_output=True, text=True
        ).stdout.strip()
        got, _ = nar_hash_and_size(root / path.lstrip("/"))
        assert got == want, f"{path}: BuildKit built {got}, nix-build {want}"
    # /tmp is copied from the eval op's modes/1777 (a FileOp mkdir gives 0755)
    assert exported_modes(env.dockerd, "nixeval-app:1")["tmp"] == 0o1777


def test_second_build_is_cached(env: Env) -> None:
    _, log = _build(env, "nixeval-app:2", *APP_ARGS)
    assert _eval_cached(log)
    steps = cached_steps(log)
    assert len(steps) == 12 and all(steps.values()), steps
    ids = [
        env.dockerd.docker("image", "inspect", "-f", "{{.Id}}", f"nixeval-app:{n}").stdout
        for n in (1, 2)
    ]
    assert ids[0] == ids[1]


def test_argstr_change_rebuilds_only_dependents(env: Env) -> None:
    _, log = _build(env, "nixeval-app:3", *APP_ARGS, "--build-arg", "argstr:salt=-salted")
    rebuilt = {name for name, cached in cached_steps(log).items() if not cached}
    assert rebuilt == {"alpha", "lib-ab", "core", "docs", "app"}, log[-3000:]


def test_eval_error_and_missing_image_are_reported(env: Env) -> None:
    code, log = _build(env, "nixeval-bad:1", "--build-arg", "attr=no-such-attr", check=False)
    assert code != 0 and "attribute 'no-such-attr' in selection path" in log, log[-3000:]
    r = env.dockerd.docker(
        "build", "-f", str(env.ctx / "graph.nix"), "--build-arg",
        f"BUILDKIT_SYNTAX={env.frontend}", str(env.ctx), check=False,
    )  # fmt: skip
    assert r.returncode != 0 and b"--build-arg nix-image=REF" in r.stderr + r.stdout
