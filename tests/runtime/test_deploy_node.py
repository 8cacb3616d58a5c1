"""The shipped node files, run: a private containerd whose config is the shipped
containerd snippet (deploy/containerd/config-v2.toml) plus only what a private test
instance needs, the snapshotter and the CRI image service started with the ExecStart of
their shipped systemd units; then a CRI pull and `ctr run` of a stowaway image through
them. Host paths are replaced by private ones through deploy_files.substitute (the
mechanism docs/deploy.md documents), nothing else. containerd 1.6 and 1.7 both read
config version 2; 2.x (config-v3.toml) exists on no test machine."""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from runtime_helpers import (
    NS,
    blob_gets,
    cri_pull,
    manifest_layers,
    store_layer_digests,
)

from daemons import Containerd, Daemon, Registry, _short_dir
from deploy_files import DEPLOY, SRC, exec_start, flag, runnable, substitute
from stowaway.runtime.proto.cri import api_pb2 as cri
from stowaway.runtime.proto.cri import api_pb2_grpc as cri_grpc


class UnitDaemon(Daemon):
    """A daemon started from a shipped unit's ExecStart (paths substituted), ready when
    its --socket accepts connections."""

    def __init__(self, tmpdir: Path, unit: str, paths: dict[str, str | Path]) -> None:
        self.name = unit.removesuffix(".service")
        super().__init__(tmpdir)
        self.command = runnable(exec_start(unit), paths)
        self.socket = flag(self.command, "--socket")

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(SRC)}

    def argv(self) -> list[str]:
        Path(self.socket).parent.mkdir(parents=True, exist_ok=True)  # RuntimeDirectory=
        return self.command

    def ready(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(self.socket)
            except OSError:
                return False
        return True


class SnippetContainerd(Containerd):
    """containerd with the shipped snippet verbatim (paths substituted), and around it
    only the private instance's own settings: root, state, sockets, CNI dirs, the
    test registry as a plain-HTTP mirror."""

    snippet = ""
    registry_host = ""

    def _config(self, cri: bool, cni_bin_dir: str, cni_conf_dir: str, proxy_plugins: object) -> str:
        tables = [
            *self._private_tables(),
            *self._private_cri(cni_bin_dir, cni_conf_dir),
            f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{self.registry_host}"]',
            f'  endpoint = ["http://{self.registry_host}"]',
        ]
        top = "\n".join(self._private_top())
        return top + "\n" + self.snippet + "\n" + "\n".join(tables) + "\n"


@dataclass
class Node:
    containerd: Containerd
    snapshotter: UnitDaemon
    paths: dict[str, str | Path]


@pytest.fixture()
def node(tmp_path: Path, registry: Registry) -> Iterator[Node]:
    run = _short_dir("run-")  # /run/stowaway: sockets must stay short
    paths: dict[str, str | Path] = {
        "/run/stowaway": run,
        "/var/lib/stowaway": tmp_path / "var-lib",
        "/var/cache/stowaway": tmp_path / "var-cache",
        "/nix/var/nix/gcroots/stowaway": tmp_path / "gcroots",
    }
    snippet = (DEPLOY / "containerd" / "config-v2.toml").read_text()
    try:
        with UnitDaemon(tmp_path, "stowaway-snapshotter.service", paths) as snap:
            SnippetContainerd.snippet = substitute(snippet, paths)
            SnippetContainerd.registry_host = registry.host
            with SnippetContainerd(tmp_path, cri=True) as ctrd:
                paths["/run/containerd/containerd.sock"] = ctrd.address
                yield Node(ctrd, snap, paths)
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_shipped_snippet_and_units_pull_and_run_a_stowaway_image(
    node: Node,
    registry: Registry,
    demo_ref: str,
    demo_app: str,
    demo_closure: list[str],
    tmp_path: Path,
) -> None:
    ctrd = node.containerd
    assert "disable_snapshot_annotations = false" in ctrd.config_path.read_text()
    # CRI pull through the proxy plugin: the store layers are never downloaded. (Observed
    # with containerd 1.6.20: they are skipped with disable_snapshot_annotations = true
    # as well, so the layers' own containerd.io/snapshot/* annotations reach the
    # snapshotter either way; docs/deploy.md.)
    store_layers = store_layer_digests(manifest_layers(registry, "demo", "v1"))
    before = blob_gets(registry)
    cri_pull(ctrd, demo_ref)
    assert store_layers and not (blob_gets(registry) - before) & store_layers
    out = ctrd.ctr("run", "--rm", "--snapshotter", "stowaway", demo_ref, "dep1", namespace=NS)
    assert "hello from stowaway" in out.stdout
    root = substitute("/var/lib/stowaway/snapshotter", node.paths)
    assert (Path(root) / "metadata.db").is_file()  # the unit's --root, substituted
    assert os.listdir(substitute("/nix/var/nix/gcroots/stowaway", node.paths))  # its --gcroots

    # the CRI image service from its unit, on this containerd: a nix:0 image (composed
    # from the store, unpacked into the snapshotter) and a proxied registry pull
    unit = "stowaway-cri-image-service.service"
    with UnitDaemon(tmp_path, unit, node.paths) as service:
        with grpc.insecure_channel(f"unix:{service.socket}") as ch:
            stub = cri_grpc.ImageServiceStub(ch)
            ref = f"nix:0{demo_app}"
            image_id = stub.PullImage(
                cri.PullImageRequest(image=cri.ImageSpec(image=ref)), timeout=120
            ).image_ref
            assert image_id.startswith("sha256:")
            proxied = stub.PullImage(
                cri.PullImageRequest(image=cri.ImageSpec(image=demo_ref)), timeout=120
            ).image_ref
            assert proxied.startswith("sha256:")
        run = ["run", "--rm", "--snapshotter", "stowaway", ref, "dep2"]
        assert "hello from stowaway" in ctrd.ctr(*run, namespace=NS).stdout
        gcroots = Path(substitute("/nix/var/nix/gcroots/stowaway-cri", node.paths))
        assert os.path.basename(demo_app) in os.listdir(gcroots)
        assert re.search(r"committed \S+ from", node.snapshotter.log_text())
        assert Path(substitute("/var/cache/stowaway/cri", node.paths)).is_dir()
