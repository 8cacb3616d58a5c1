"""Registry fixtures: servers on loopback ports and real OCI test images."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from registry_harness import Server
from registry_helpers import MakeNix, demo_packages, write_demo_index

from stowaway.image.layer_cache import LayerCache
from stowaway.registry.config import NixOptions, RegistryConfig
from stowaway.registry.nix_resolver import NixResolver
from stowaway.registry.resolver import ManifestResolver
from stowaway.registry.storage import FilesystemStorage
from stowaway.registry.storage_api import Storage


@pytest.fixture()
def make_server(tmp_path: Path) -> Iterator[object]:
    servers: list[Server] = []

    def factory(
        storage: Storage | None = None,
        resolver: ManifestResolver | None = None,
        **options: object,
    ) -> Server:
        root = tmp_path / f"store{len(servers)}"
        config = replace(RegistryConfig(listen="127.0.0.1:0", storage=str(root)), **options)  # type: ignore[arg-type]
        server = Server(config, storage or FilesystemStorage(root), resolver)
        servers.append(server)
        return server

    yield factory
    for s in servers:
        s.close()


@pytest.fixture()
def server(make_server: object) -> Server:
    return make_server()  # type: ignore[operator,no-any-return]


@pytest.fixture(scope="session")
def oci_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real OCI image layout (``<dir>:t``) holding /bin/busybox."""
    if shutil.which("umoci") is None or not Path("/bin/busybox").exists():
        pytest.fail("umoci and busybox-static are needed (apt-get install umoci busybox-static)")
    layout = tmp_path_factory.mktemp("oci") / "layout"
    for cmd in (
        ["umoci", "init", "--layout", str(layout)],
        ["umoci", "new", "--image", f"{layout}:t"],
        ["umoci", "insert", "--image", f"{layout}:t", "/bin/busybox", "/bin/busybox"],
        ["umoci", "config", "--image", f"{layout}:t", "--config.cmd", "/bin/busybox"],
    ):
        subprocess.run(cmd, check=True, capture_output=True)
    return layout


@pytest.fixture()
def make_nix(tmp_path: Path) -> Iterator[MakeNix]:
    """Servers whose filesystem storage root is the resolver's layer cache root."""
    made: list[tuple[Server, NixResolver]] = []

    def factory(storage: object = None, **nix: object) -> tuple[Server, NixResolver]:
        root = tmp_path / f"reg{len(made)}"
        options = replace(NixOptions(), **nix)  # type: ignore[arg-type]
        resolver = NixResolver(options, LayerCache(root))
        config = RegistryConfig(listen="127.0.0.1:0", storage=str(root), access_log=False)
        server = Server(config, storage or FilesystemStorage(root), resolver)  # type: ignore[arg-type]
        made.append((server, resolver))
        return server, resolver

    yield factory
    for server, resolver in made:
        server.close()
        resolver.close()


@pytest.fixture()
def demo_index(tmp_path: Path, demo_closure: list[str]) -> Path:
    return write_demo_index(tmp_path / "index.json", demo_packages(demo_closure))
