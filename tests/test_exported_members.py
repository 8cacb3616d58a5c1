"""Pin the public surface of the library packages: a change here is an API change."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "stowaway": ["__version__"],
    "stowaway.layering": [
        "MAX_LAYERS_LIMIT",
        "STRATEGIES",
        "UNKNOWN_SIZE",
        "LayerPlan",
        "PlannedLayer",
        "base_budget",
        "plan",
    ],
    "stowaway.sinks": [
        "FORMS",
        "DockerArchiveTarget",
        "OciArchiveTarget",
        "OciTarget",
        "RegistryTarget",
        "SinkResult",
        "Target",
        "TargetError",
        "parse_target",
        "require_index_support",
        "write_image",
    ],
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_exports_are_pinned_and_importable(module: str) -> None:
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(EXPECTED[module])
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name} is exported but missing"


def test_store_exports_are_importable() -> None:
    store = importlib.import_module("stowaway.store")
    assert {"LocalStore", "BinaryCache", "StoreSource", "PathInfo"} <= set(store.__all__)
    for name in store.__all__:
        assert hasattr(store, name)
