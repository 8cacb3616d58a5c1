"""An image composed on demand by `stowaway serve` (a Nixery-style name) pulled through
containerd's CRI PullImage with the stowaway snapshotter: the server composes it, CRI
fetches only manifest, config and the non-store layers, and `ctr run` runs it."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from runtime_helpers import (
    NS,
    SRC,
    SnapshotterDaemon,
    StowawayContainerd,
    cri_pull,
    store_layer_digests,
)

from daemons import Daemon, free_port

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class StowawayServe(Daemon):
    """`stowaway serve` with a package index of the demo closure, plain HTTP."""

    name = "serve"

    def __init__(self, tmpdir: Path, packages: dict[str, str]) -> None:
        super().__init__(tmpdir)
        self.host = f"127.0.0.1:{free_port()}"
        self.index = self.dir / "index.json"
        self.index.write_text(json.dumps({"version": 1, "packages": packages}))
        self.config = self.dir / "registry.toml"
        self.config.write_text(f'storage = "{self.dir / "root"}"\n[nix]\nenv = ["PATH=/bin"]\n')

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(SRC)}

    def argv(self) -> list[str]:
        code = "from stowaway.cli import main; main()"
        return [sys.executable, "-c", code, "serve", "--listen", self.host,
                "--config", str(self.config), "--index", str(self.index)]  # fmt: skip

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False

    def blob_gets(self) -> set[str]:
        """Digests of blobs served (status 200) according to the JSON access log."""
        out = set()
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if rec.get("method") == "GET" and rec.get("status") == 200 and "/blobs/" in rec["path"]:
                out.add(rec["path"].rsplit("/", 1)[1])
        return out


def test_cri_pull_of_a_served_nix_image(
    tmp_path: Path, snapshotter: SnapshotterDaemon, demo_closure: list[str], demo_app: str
) -> None:
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    with StowawayServe(tmp_path, {"demo": demo_app, "busybox": busybox}) as serve:
        plugins = {"stowaway": {"type": "snapshot", "address": snapshotter.socket}}
        StowawayContainerd.registry_host = serve.host
        with StowawayContainerd(tmp_path, cri=True, proxy_plugins=plugins) as ctrd:
            ref = f"{serve.host}/busybox/demo:latest"
            cri_pull(ctrd, ref)
            req = urllib.request.Request(
                f"http://{serve.host}/v2/busybox/demo/manifests/latest",
                headers={"Accept": OCI_MANIFEST},
            )
            with urllib.request.urlopen(req) as r:
                manifest = json.load(r)
            layers = manifest["layers"]
            store_layers = store_layer_digests(layers)
            fetched = serve.blob_gets()
            assert store_layers and not fetched & store_layers, "store layers downloaded"
            assert {ly["digest"] for ly in layers} - store_layers <= fetched
            assert manifest["config"]["digest"] in fetched
            out = ctrd.ctr("run", "--rm", "--snapshotter", "stowaway", ref, "s1", "/bin/demo",
                           namespace=NS).stdout  # fmt: skip
            assert "hello from stowaway" in out
