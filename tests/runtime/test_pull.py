"""`stowaway pull` against real containerd 1.6 and docker-registry: store-path layers
are never downloaded when the stowaway snapshotter has their paths, other layers are,
and `ctr run` runs the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from runtime_helpers import (
    SRC,
    blob_gets,
    busybox_oci,
    manifest_layers,
    store_layer_digests,
)

from daemons import Containerd, Registry

NS = "pulltest"


def stowaway_pull(
    containerd: Containerd, ref: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    code = "from stowaway.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, "pull", "--containerd", containerd.address,
         "--namespace", NS, "--plain-http", *extra, ref],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120,
    )  # fmt: skip


def test_pull_skips_store_layers_and_runs(
    containerd: Containerd, registry: Registry, demo_ref: str, demo_closure: list[str]
) -> None:
    layers = manifest_layers(registry, "demo", "v1")
    store_layers = store_layer_digests(layers)
    before = blob_gets(registry)
    r = stowaway_pull(containerd, demo_ref, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    fetched = blob_gets(registry) - before
    assert not fetched & store_layers, "store-path layers were downloaded"
    others = {str(ly["digest"]) for ly in layers} - store_layers
    assert set(result["downloaded_layers"]) == others and others <= fetched
    assert result["name"] == demo_ref and result["layers"] == [ly["digest"] for ly in layers]
    content = containerd.ctr("content", "ls", "-q", namespace=NS).stdout.split()
    assert not set(content) & store_layers and others <= set(content)

    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    run = ["run", "--rm", "--snapshotter", "stowaway", demo_ref]
    assert "hello from stowaway" in containerd.ctr(*run, "p1", namespace=NS).stdout
    ls = containerd.ctr(*run, "p2", f"{busybox}/bin/ls", "/nix/store", namespace=NS).stdout
    assert sorted(ls.split()) == sorted(os.path.basename(p) for p in demo_closure)

    again = stowaway_pull(containerd, demo_ref, "--json")  # everything is there already
    assert again.returncode == 0 and json.loads(again.stdout)["downloaded_layers"] == []


def test_pull_ordinary_image_downloads_every_layer(
    containerd: Containerd, registry: Registry, tmp_path: Path
) -> None:
    layout = busybox_oci(tmp_path)
    ref = f"{registry.host}/bb-pull:1"
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:latest", f"docker://{ref}"],
        check=True,
        capture_output=True,
    )
    r = stowaway_pull(containerd, ref)
    assert r.returncode == 0, r.stderr
    assert "1 layers, 0 without download" in r.stdout
    out = containerd.ctr(
        "run", "--rm", "--snapshotter", "stowaway", ref, "b1", "/bin/cat", "/hello.txt",
        namespace=NS,
    ).stdout  # fmt: skip
    assert out == "ordinary layer\n"


def test_pull_errors_name_the_problem(containerd: Containerd, registry: Registry) -> None:
    r = stowaway_pull(containerd, f"{registry.host}/no-such-repo:v1")
    assert r.returncode == 1 and "no-such-repo" in r.stderr and "Traceback" not in r.stderr
    r = stowaway_pull(containerd, f"{registry.host}/demo:Bad Tag")
    assert r.returncode == 1 and "not a valid tag" in r.stderr
