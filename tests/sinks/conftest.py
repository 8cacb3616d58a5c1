"""Fixtures for the file sinks: the demo closure composed into a real image with a
real layer cache, and helpers comparing unpacked root filesystems to the host store."""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from stowaway.image.compose import compose
from stowaway.image.config import ImageOptions
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings
from stowaway.image.model import Image
from stowaway.store.local import LocalStore
from stowaway.store.model import PathInfo


@dataclass
class Composed:
    image: Image
    cache: LayerCache
    closure: dict[str, PathInfo]
    busybox: str


def compose_demo(
    store: LocalStore,
    demo_app: str,
    cache_dir: Path,
    *,
    format: str = "oci",
    user: str = "app",
    settings: LayerSettings | None = None,
) -> Composed:
    closure = store.closure_infos([demo_app])
    busybox = next(p for p in closure if p.endswith("-busybox"))
    options = ImageOptions(
        entrypoint=[f"{demo_app}/bin/demo"], contents=[busybox], user=user, expose=["8080"]
    )
    cache = LayerCache(cache_dir)
    result = compose(
        store,
        [demo_app],
        options,
        closure=closure,
        settings=settings or LayerSettings(),
        cache=cache,
        format=format,  # type: ignore[arg-type]
    )
    return Composed(result.image, cache, closure, busybox)


@pytest.fixture(scope="session")
def make_demo(local_store: LocalStore) -> Callable[..., Composed]:
    """``make_demo(demo_app, cache_dir, format=, user=)`` composes a fresh demo image."""
    return functools.partial(compose_demo, local_store)


@pytest.fixture(scope="session")
def rootfs_matches_store() -> Callable[[Path, dict[str, PathInfo]], int]:
    return assert_rootfs_matches_store


@pytest.fixture(scope="session")
def demo_image(
    demo_app: str, tmp_path_factory: pytest.TempPathFactory, local_store: LocalStore
) -> Composed:
    """The demo image, composed once per session into a session-wide cache."""
    return compose_demo(local_store, demo_app, tmp_path_factory.mktemp("sink-cache"))


def assert_rootfs_matches_store(rootfs: Path, closure: dict[str, PathInfo]) -> int:
    """Every file of every closure path exists under ``rootfs`` with the host's bytes,
    permission bits and link targets; nothing extra under nix/store. Returns the count."""
    seen = 0
    expected_top = {Path(p).name for p in closure}
    assert {p.name for p in (rootfs / "nix/store").iterdir()} == expected_top
    for path in closure:
        for dirpath, dirnames, filenames in os.walk(path):
            for name in [*dirnames, *filenames]:
                host = Path(dirpath, name)
                copy = rootfs / host.relative_to("/")
                hs, cs = host.lstat(), copy.lstat()
                assert stat.S_IFMT(hs.st_mode) == stat.S_IFMT(cs.st_mode), host
                if stat.S_ISLNK(hs.st_mode):
                    assert os.readlink(host) == os.readlink(copy), host
                else:
                    assert stat.S_IMODE(hs.st_mode) == stat.S_IMODE(cs.st_mode), host
                if stat.S_ISREG(hs.st_mode):
                    assert host.read_bytes() == copy.read_bytes(), host
                seen += 1
    return seen
