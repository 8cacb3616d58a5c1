"""Fixtures for runtime tests: the snapshotter as a real process, a containerd wired to it
(with CRI pulling through it), and the demo image pushed to a private registry."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_helpers import SnapshotterDaemon, StowawayContainerd

from daemons import Containerd, Registry
from stowaway.image.compose import compose
from stowaway.image.config import ImageOptions
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings
from stowaway.sinks.registry import push
from stowaway.store.local import LocalStore


@pytest.fixture()
def store_fs_path() -> Iterator[Path]:
    """A temp dir on the store's filesystem, for hardlink mode's state (``tmp_path`` may
    be on a tmpfs, as /tmp is on Debian 13)."""
    base = Path("/nix/var/stowaway-tests")
    base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(dir=base))
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=True)
        with contextlib.suppress(OSError):  # another test's dir may still be there
            base.rmdir()


@pytest.fixture()
def snapshotter(tmp_path: Path) -> Iterator[SnapshotterDaemon]:
    with SnapshotterDaemon(tmp_path, "--gcroots", str(tmp_path / "gcroots")) as s:
        yield s


@pytest.fixture()
def containerd(
    tmp_path: Path, snapshotter: SnapshotterDaemon, registry: Registry
) -> Iterator[Containerd]:
    plugins = {"stowaway": {"type": "snapshot", "address": snapshotter.socket}}
    StowawayContainerd.registry_host = registry.host
    with StowawayContainerd(tmp_path, cri=True, proxy_plugins=plugins) as c:
        yield c


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture(scope="module")
def demo_ref(
    demo_app: str,
    registry: Registry,
    tmp_path_factory: pytest.TempPathFactory,
    local_store: LocalStore,
) -> str:
    """The composed demo image pushed to the private registry; returns its reference."""
    store = local_store
    closure = store.closure_infos([demo_app])
    busybox = next(p for p in closure if p.endswith("-busybox"))
    options = ImageOptions(entrypoint=[f"{demo_app}/bin/demo"], contents=[busybox])
    result = compose(
        store,
        [demo_app],
        options,
        closure=closure,
        settings=LayerSettings(),
        cache=LayerCache(tmp_path_factory.mktemp("demo-cache")),
    )
    push(result.image, registry.host, "demo", "v1", tls_verify=False)
    return f"{registry.host}/demo:v1"
