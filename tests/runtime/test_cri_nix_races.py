"""NixImages against a real containerd: image GC (RemoveImage by ID → reconcile_roots)
during a nix:0 pull must not drop the root of the image being pulled."""

from __future__ import annotations

import threading
from pathlib import Path

from daemons import Containerd
from stowaway.image.model import Image
from stowaway.runtime.containerd_client import ContainerdClient
from stowaway.runtime.cri.nix_images import NixImages, StoreConfig
from stowaway.runtime.gcroots import GcRoots


class GatedImages(NixImages):
    """Pauses each pull after rooting, before the image exists in containerd."""

    started = threading.Event()
    release = threading.Event()

    def _image_of(self, store_path: str) -> Image:
        self.started.set()
        assert self.release.wait(60)
        return super()._image_of(store_path)


def test_reconcile_during_pull_keeps_its_root(tmp_path: Path, demo_app: str) -> None:
    base = Path(demo_app).name
    with Containerd(tmp_path) as ctrd:
        client = ContainerdClient(ctrd.address, namespace="racetest")
        roots = GcRoots(tmp_path / "gcroots")
        images = GatedImages(
            client, StoreConfig(Path("/nix/store"), [], tmp_path / "cache"), roots, "overlayfs"
        )
        errors: list[BaseException] = []

        def pull() -> None:
            try:
                images.pull(demo_app)
            except BaseException as e:  # noqa: BLE001 - asserted below
                errors.append(e)

        t = threading.Thread(target=pull)
        t.start()
        try:
            assert images.started.wait(60)
            assert base in roots.rooted()
            images.reconcile_roots()  # kubelet's image GC removed some other image
            assert base in roots.rooted(), "the root of an image being pulled was dropped"
        finally:
            images.release.set()
            t.join(120)
        assert errors == []
        assert images.record(demo_app) is not None and base in roots.rooted()
        images.reconcile_roots()  # after the pull: the record keeps it
        assert roots.rooted() == {base}
        client.close()
