"""Real clients against `stowaway serve` (a real process, CLI flags + TOML config)
composing images of the demo closure on demand: skopeo, containerd's ctr, dockerd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry_helpers import DOCKER, OCI, demo_packages, hash_of, skopeo, write_demo_index

from daemons import Containerd, Dockerd, free_port, wait_for

STOWAWAY = str(Path(sys.executable).with_name("stowaway"))


@dataclass
class Served:
    host: str
    root: Path
    index: Path
    packages: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(f"http://{self.host}{path}")
        if accept:
            req.add_header("Accept", accept)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, dict(err.headers), err.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, demo_closure: list[str]) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve")
    packages = demo_packages(demo_closure)
    index = write_demo_index(tmp / "index.json", packages)
    config = tmp / "registry.toml"
    config.write_text(
        f'storage = "{tmp / "root"}"\n[nix]\nmeta = {{ shell = ["busybox"] }}\n'
        'env = ["PATH=/bin"]\n'
    )
    port = free_port()
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [STOWAWAY, "serve", "--listen", f"127.0.0.1:{port}", "--config", str(config),
             "--index", str(index)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    s = Served(f"127.0.0.1:{port}", tmp / "root", index, packages, proc, log)
    try:
        wait_for(
            lambda: s.get("/healthz")[0] == 200,
            10,
            f"stowaway serve to start (log {log})",
            ignore=(OSError,),
        )
        yield s
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()


def test_skopeo_inspects_and_copies_a_composed_image(served: Served, tmp_path: Path) -> None:
    ref = f"docker://{served.host}/shell/demo:latest"
    raw = skopeo("inspect", "--tls-verify=false", "--raw", ref)
    manifest = json.loads(raw)
    assert manifest["mediaType"] == OCI
    info = json.loads(skopeo("inspect", "--tls-verify=false", ref))
    assert info["Env"] == ["PATH=/bin"] and len(info["Layers"]) == len(manifest["layers"])
    out = tmp_path / "copy"
    skopeo("copy", "--src-tls-verify=false", ref, f"oci:{out}:x")
    for d in manifest["layers"]:
        blob = out / "blobs" / "sha256" / d["digest"].split(":")[1]
        assert blob.stat().st_size == d["size"]
    # Docker schema 2 for a client that accepts nothing else, same layers' bytes
    status, headers, body = served.get("/v2/shell/demo/manifests/latest", accept=DOCKER)
    assert status == 200 and headers["Content-Type"] == DOCKER
    docker = json.loads(body)
    assert [d["digest"] for d in docker["layers"]] == [d["digest"] for d in manifest["layers"]]
    # store/<hash> names resolve through the local store
    paths = served.packages
    store_ref = f"docker://{served.host}/store/{hash_of(paths['demo'])}:latest"
    assert json.loads(skopeo("inspect", "--tls-verify=false", "--raw", store_ref))["layers"]


def test_unknown_package_and_landing_page(served: Served) -> None:
    status, _, body = served.get("/v2/demo/nonexistent/manifests/latest")
    assert status == 404
    err = json.loads(body)["errors"][0]
    assert err["code"] == "MANIFEST_UNKNOWN" and "nonexistent" in err["message"]
    status, headers, page = served.get("/")
    assert status == 200 and b"/shell/" in page and b"<code>greeting</code>" in page


def test_index_change_is_served_without_restart(served: Served) -> None:
    before = served.get("/v2/greeting/manifests/latest")[2]
    paths = served.packages
    write_demo_index(served.index, {**paths, "greeting": paths["busybox"]})
    try:
        after = served.get("/v2/greeting/manifests/latest")[2]
        assert after != before and after == served.get("/v2/busybox/manifests/latest")[2]
    finally:
        write_demo_index(served.index, paths)


def test_containerd_pulls_and_runs(served: Served, tmp_path: Path) -> None:
    ref = f"{served.host}/demo/busybox:latest"
    with Containerd(tmp_path) as ctrd:
        ctrd.ctr("images", "pull", "--plain-http", ref, timeout=300)
        out = ctrd.ctr("run", "--rm", ref, "demo-run", "/bin/demo").stdout
        assert "hello from stowaway" in out
        out = ctrd.ctr("run", "--rm", ref, "ls-run", "/bin/ls", "/bin").stdout
        assert {"demo", "sh", "busybox"} <= set(out.split())


def test_dockerd_pulls_and_runs(served: Served, tmp_path: Path) -> None:
    ref = f"{served.host}/shell/demo"  # 127.0.0.0/8 registries may be plain HTTP
    with Containerd(tmp_path) as ctrd, Dockerd(tmp_path, ctrd) as dockerd:
        dockerd.docker("pull", ref)
        out = dockerd.docker("run", "--rm", "--network", "none", ref, "demo").stdout
        assert b"hello from stowaway" in out
        inspect = json.loads(dockerd.docker("image", "inspect", ref).stdout)[0]
        assert inspect["Config"]["Env"] == ["PATH=/bin"]
