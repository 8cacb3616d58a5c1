"""`build`/`plan --layer-base`: two images over one named base share its layers, byte
for byte; real nix closures built in the sandbox, real builds through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nixtools import SANDBOXED_MK, closure_of, nix_build
from stowaway_cli import run

# A runtime (a 1.5 MB library, two small ones, an env referring to them) and two apps
# over it, each with a private library of its own.
TWO_APPS = f"""
let
  mk = {SANDBOXED_MK};
  big = mk "libbig-1.0" ''mkdir -p $out/lib; dd if=/dev/zero of=$out/lib/big bs=1000 count=1500'';
  small = mk "libsmall-1.0" ''mkdir -p $out/lib; echo small > $out/lib/small'';
  util = mk "libutil-1.0" ''mkdir -p $out/lib; echo ${{small}} > $out/lib/util'';
  runtime = mk "runtime-env-1.0" ''mkdir -p $out; echo ${{big}} ${{util}} > $out/deps'';
  app = n: mk "app-${{n}}" ''
    mkdir -p $out/bin
    echo ${{runtime}} ${{mk "priv-${{n}}" "echo ${{n}} ${{small}} > $out"}} > $out/bin/app
  '';
in {{ inherit runtime; one = app "one"; two = app "two"; }}
"""


@pytest.fixture(scope="module")
def two_apps(have_nix: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    expr = tmp_path_factory.mktemp("layerbase") / "two.nix"
    expr.write_text(TWO_APPS)
    return {attr: nix_build(expr, attr) for attr in ("runtime", "one", "two")}


def build(app: str, *args: str, out: Path, cache: Path) -> list[dict[str, Any]]:
    doc = json.loads(
        run("build", app, "--json", *args, "--cache-dir", str(cache), "-o", f"oci:{out}:t").stdout
    )
    layers: list[dict[str, Any]] = doc["layers"][:-1]  # the customisation layer is last
    return layers


def test_two_images_over_a_named_base_share_every_base_layer(
    two_apps: dict[str, str], tmp_path: Path
) -> None:
    runtime = two_apps["runtime"]
    base = set(closure_of(runtime))
    caches = (tmp_path / "c1", tmp_path / "c2")  # separate caches: same bytes regardless
    one, two = (
        build(two_apps[n], "--layer-base", runtime, out=tmp_path / n, cache=c)
        for n, c in zip(("one", "two"), caches, strict=True)
    )
    plan = json.loads(run("plan", two_apps["one"], "--layer-base", runtime, "--json").stdout)
    k = plan["base_layers"]
    assert plan["layer_base"] == [runtime]
    assert k >= 2  # libbig alone (over 1 MiB), the rest of the runtime
    for layers in (one, two):
        assert {p for layer in layers[:k] for p in layer["store_paths"]} == base
        assert not base & {p for layer in layers[k:] for p in layer["store_paths"]}
    assert [x["digest"] for x in one[:k]] == [x["digest"] for x in two[:k]]
    assert [x["store_paths"] for x in one[:k]] == [layer["paths"] for layer in plan["layers"][:k]]
    # without the base named, libsmall (shared) is grouped with each app's own paths
    plain = build(two_apps["one"], out=tmp_path / "plain", cache=caches[0])
    holding = [x for x in plain if any(p.endswith("-libsmall-1.0") for p in x["store_paths"])]
    assert any(p.endswith("-priv-one") for p in holding[0]["store_paths"])


def test_a_base_outside_the_closure_is_an_error_with_a_hint(
    two_apps: dict[str, str], tmp_path: Path
) -> None:
    proc = run(
        "build", two_apps["one"], "--layer-base", two_apps["two"], "-o", f"oci:{tmp_path}/x:t",
        "--cache-dir", str(tmp_path / "c"), ok=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"layer base {two_apps['two']} is not in the image's closure" in proc.stderr
    assert "hint:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("plan", two_apps["one"], "--layer-base", "./nowhere", "--json", ok=False)
    assert proc.returncode == 1
    assert "not a store path" in json.loads(proc.stdout)["error"]
