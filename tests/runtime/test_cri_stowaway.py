"""The CRI image service unpacking nix:0 images with the stowaway snapshotter (the
default): store-path layers are committed by the snapshotter from the host store (it
answers ALREADY_EXISTS to Prepare), only the customisation layer is unpacked, and the
container's /nix/store shows exactly the closure."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from runtime_helpers import SnapshotterDaemon

from daemons import Containerd, _short_dir
from stowaway.runtime.cri.cli_cri import make_service
from stowaway.runtime.cri.image_service import serve
from stowaway.runtime.proto.cri import api_pb2 as cri
from stowaway.runtime.proto.cri import api_pb2_grpc as cri_grpc

NS = "k8s.io"


@pytest.fixture()
def image_service(containerd: Containerd, tmp_path: Path) -> Iterator[str]:
    proxy = make_service(
        containerd.address, gcroots=tmp_path / "cri-gcroots", cache_dir=tmp_path / "cache"
    )
    assert proxy.nix.snapshotter == "stowaway"
    sockdir = _short_dir("cris-")
    server = serve(proxy, str(sockdir / "i.sock"))
    try:
        yield str(sockdir / "i.sock")
    finally:
        server.stop(None)
        proxy.nix.client.close()
        os.unlink(sockdir / "i.sock") if (sockdir / "i.sock").exists() else None
        os.rmdir(sockdir)


def test_nix_image_unpacked_by_stowaway_snapshotter_runs(
    containerd: Containerd,
    snapshotter: SnapshotterDaemon,
    image_service: str,
    demo_app: str,
    demo_closure: list[str],
) -> None:
    ref = f"nix:0{demo_app}"
    with grpc.insecure_channel(f"unix:{image_service}") as ch:
        stub = cri_grpc.ImageServiceStub(ch)
        image_id = stub.PullImage(
            cri.PullImageRequest(image=cri.ImageSpec(image=ref)), timeout=120
        ).image_ref
    assert image_id.startswith("sha256:")
    snaps = containerd.ctr("snapshots", "--snapshotter", "stowaway", "ls", namespace=NS).stdout
    committed = [ln.split()[0] for ln in snaps.splitlines()[1:] if ln.split()[-1] == "Committed"]
    assert committed, snaps
    # every store-path layer was committed from the host store, none unpacked
    from_store = re.findall(
        r"layer (sha256:[0-9a-f]{64}): committed \S+ from", snapshotter.log_text()
    )
    assert from_store and set(from_store) < set(committed)
    assert len(committed) == len(from_store) + 1  # + the customisation layer
    labels = containerd.ctr("content", "ls", namespace=NS).stdout
    assert "containerd.io/gc.ref.snapshot.stowaway=" in labels
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    run = ["run", "--rm", "--snapshotter", "stowaway", ref]
    assert "hello from stowaway" in containerd.ctr(*run, "d1", namespace=NS).stdout
    ls = containerd.ctr(*run, "l1", f"{busybox}/bin/ls", "/nix/store", namespace=NS).stdout
    assert sorted(ls.split()) == sorted(os.path.basename(p) for p in demo_closure)
