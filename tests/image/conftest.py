"""Fixtures for the image tests: the real local Nix store and the demo closure's
metadata from its database."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowaway.image.layer_cache import LayerCache
from stowaway.store.local import LocalStore
from stowaway.store.model import PathInfo


@pytest.fixture(scope="session")
def demo_infos(local_store: LocalStore, demo_app: str) -> dict[str, PathInfo]:
    """PathInfo of every path in the demo closure, from the local Nix database."""
    return local_store.closure_infos([demo_app])


@pytest.fixture()
def layer_cache(tmp_path: Path) -> LayerCache:
    return LayerCache(tmp_path / "cache")
