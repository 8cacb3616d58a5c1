"""End to end: `docker build` with the stowaway frontend on a private dockerd 20.10
(embedded BuildKit v0.8) builds the fixture derivation graph, one ExecOp per derivation.

The frontend image is built once by scripts/frontend-image.sh and cached under
/var/cache/stowaway (debootstrap only runs the first time on a machine).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from buildkit_helpers import (
    GRAPH,
    cached_steps,
    export,
    exported_modes,
    nix_build,
    out_path,
    script_image,
)
from dockerd_netns import NetnsDockerd

from daemons import Containerd, Dockerd
from stowaway.buildkit.context import make_context
from stowaway.image.config import ImageOptions
from stowaway.store.nar import nar_hash_and_size

pytestmark = pytest.mark.slow


@dataclass
class Env:
    dockerd: Dockerd
    frontend: str
    work: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, have_nix: None) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("bk")
    with Containerd(tmp) as ctrd, NetnsDockerd(tmp, containerd=ctrd) as dockerd:
        yield Env(dockerd, script_image(dockerd, "frontend-image.sh"), tmp)


def _context(env: Env, name: str, attr: str = "app", salt: str = "") -> Path:
    entry = [out_path(GRAPH, attr, {"salt": salt}) + "/bin/app"]
    opts = ImageOptions(entrypoint=entry, env=["GREETING=hi"])
    return make_context(str(GRAPH), [attr], env.work / name, opts, argstrs={"salt": salt}).path


def _build(env: Env, ctx: Path, tag: str, check: bool = True) -> tuple[int, str]:
    r = env.dockerd.docker(
        "build",
        "--progress=plain",
        "-f",
        str(ctx / "stowaway.json"),
        "--build-arg",
        f"BUILDKIT_SYNTAX={env.frontend}",
        "-t",
        tag,
        str(ctx),
        check=check,
        timeout=600,
    )
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


def test_build_runs_and_outputs_match_nix(env: Env) -> None:
    app = nix_build("app")  # local reference build (also makes references exact)
    ctx = _context(env, "ctx-app")
    _, log = _build(env, ctx, "stowaway-app:1")
    steps = cached_steps(log)
    assert len(steps) == 12, log[-3000:]
    run = env.dockerd.docker("run", "--rm", "--network", "none", "stowaway-app:1")
    out = run.stdout.decode()
    assert "alpha\nbeta\nbeta\ngamma tool\nsplit library\ngreeting=hello\npinned-content\n" in out
    assert "docs: /nix/store/" in out
    inspect = env.dockerd.docker("image", "inspect", "stowaway-app:1").stdout.decode()
    assert '"GREETING=hi"' in inspect and f'"{app}/bin/app"' in inspect
    root = env.work / "exported"
    export(env.dockerd, "stowaway-app:1", root)
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
    assert (root / "etc" / "passwd").read_text().startswith("root:x:0:0:")


def test_second_build_is_fully_cached(env: Env) -> None:
    ctx = _context(env, "ctx-app")
    _, log = _build(env, ctx, "stowaway-app:2")
    steps = cached_steps(log)
    assert len(steps) == 12 and all(steps.values()), steps
    layer_lines = [ln for ln in log.splitlines() if re.match(r"#\d+ stowaway layer", ln)]
    assert layer_lines
    assert (
        env.dockerd.docker("image", "inspect", "-f", "{{.Id}}", "stowaway-app:1").stdout
        == env.dockerd.docker("image", "inspect", "-f", "{{.Id}}", "stowaway-app:2").stdout
    )


def test_leaf_change_rebuilds_only_dependents(env: Env) -> None:
    ctx = _context(env, "ctx-salted", salt="-salted")
    _, log = _build(env, ctx, "stowaway-app:3")
    steps = cached_steps(log)
    rebuilt = {name for name, cached in steps.items() if not cached}
    assert rebuilt == {"alpha", "lib-ab", "core", "docs", "app"}, steps
    out = env.dockerd.docker("run", "--rm", "--network", "none", "stowaway-app:3").stdout
    assert b"alpha-salted\n" in out


def test_failing_builder_names_the_derivation(env: Env) -> None:
    ctx = _context(env, "ctx-failing", attr="failing")
    code, log = _build(env, ctx, "stowaway-failing:1", check=False)
    assert code != 0
    assert "nix-build doomed-step" in log
    assert "doomed-step is about to fail" in log
    assert "exit code: 3" in log


def test_customisation_layer_has_stowaway_builds_modes(env: Env) -> None:
    """/tmp is 1777 as in `stowaway build`'s images; a FileOp mkdir made it 0755
    (BuildKit v0.8 drops the sticky bit and applies dockerd's umask)."""
    ctx = _context(env, "ctx-app")
    _build(env, ctx, "stowaway-app:modes")
    modes = exported_modes(env.dockerd, "stowaway-app:modes")
    assert modes["tmp"] == 0o1777, oct(modes["tmp"])
    assert modes["etc"] == 0o755 and modes["etc/passwd"] == modes["etc/group"] == 0o644


def _break_labels(doc: dict[str, Any]) -> None:
    doc["config"]["config"]["Labels"] = []  # a JSON object in what the client writes


def _break_nar_size(doc: dict[str, Any]) -> None:
    doc["narSizes"][doc["targets"][0]["path"]] = "12k"


@pytest.mark.parametrize(
    ("name", "breaks", "message"),
    [
        # nothing checks Labels' type: the frontend's catch-all still Returns the error
        ("labels", _break_labels, "stowaway frontend: internal error: TypeError: "),
        ("narsize", _break_nar_size, "stowaway.json: narSizes./nix/store/"),
    ],
)
def test_frontend_errors_reach_buildkit(
    env: Env, name: str, breaks: Callable[[dict[str, Any]], None], message: str
) -> None:
    """Whatever goes wrong in the frontend, BuildKit gets the error through the gateway's
    Return (a frontend that dies instead shows as a vague gateway failure)."""
    ctx = _context(env, f"ctx-broken-{name}")
    doc = json.loads((ctx / "stowaway.json").read_bytes())
    breaks(doc)
    (ctx / "stowaway.json").write_text(json.dumps(doc))
    code, log = _build(env, ctx, f"stowaway-broken:{name}", check=False)
    assert code != 0
    # BuildKit v0.8 (dockerd 20.10) says "… rpc error: code = Unknown desc = MSG"; the
    # BuildKit in dockerd 26 "… failed with build-arg:BUILDKIT_SYNTAX = IMAGE: MSG"
    assert re.search(r"failed to solve\b.*(desc = |: )" + re.escape(message), log), log[-3000:]
