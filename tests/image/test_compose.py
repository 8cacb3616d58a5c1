"""The compose pipeline on the real demo closure with real layer caches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stowaway.errors import PlanError, StowawayError
from stowaway.image.compose import ComposeResult, compose
from stowaway.image.config import ImageOptionError, ImageOptions
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings
from stowaway.image.model import MediaType
from stowaway.store.local import LocalStore


@pytest.fixture(scope="module")
def store(local_store: LocalStore) -> LocalStore:
    return local_store


def run(
    store: LocalStore,
    demo_app: str,
    cache_dir: Path,
    options: ImageOptions | None = None,
    **kw: object,
) -> ComposeResult:
    closure = store.closure_infos([demo_app])
    busybox = next(p for p in closure if p.endswith("-busybox"))
    kw.setdefault("settings", LayerSettings())
    return compose(
        store,
        [demo_app],
        options or ImageOptions(entrypoint=[f"{demo_app}/bin/demo"], contents=[busybox]),
        closure=closure,
        cache=LayerCache(cache_dir),
        **kw,  # type: ignore[arg-type]
    )


def test_store_layers_in_plan_order_then_customisation(
    store: LocalStore, demo_app: str, demo_closure: list[str], tmp_path: Path
) -> None:
    result = run(store, demo_app, tmp_path / "cache")
    image = result.image
    planned = [layer.paths for layer in result.plan.layers]
    assert [layer.store_paths for layer in image.layers] == [*planned, ()]
    assert sorted(p for paths in planned for p in paths) == sorted(demo_closure)
    assert set(result.closure) == set(demo_closure)
    for index, layer in enumerate(image.layers[:-1]):
        names = " ".join(Path(p).name for p in layer.store_paths)
        expected = {"containerd.io/snapshot/stowaway.paths.0": names}
        if index == 0:  # the first names the later store layers' paths, in order
            later = " ".join(
                Path(p).name for layer in image.layers[1:-1] for p in layer.store_paths
            )
            expected["containerd.io/snapshot/stowaway.prefetch.0"] = later
        assert layer.annotations == expected
    assert len(image.layers) > 2
    assert image.layers[-1].annotations == {}
    config = json.loads(image.config.data or b"")
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]
    assert config["history"][-1]["comment"] == "stowaway customisation layer"
    assert Path(demo_app).name in config["history"][-2]["comment"]
    manifest = json.loads(image.manifest.data or b"")
    assert manifest["config"]["digest"] == image.config.digest
    assert [entry["digest"] for entry in manifest["layers"]] == [x.digest for x in image.layers]
    assert image.manifest.media_type == MediaType.OCI_MANIFEST
    assert not any(layer.reused for layer in image.layers)


def test_same_inputs_same_digests_and_cache_reuse(
    store: LocalStore, demo_app: str, tmp_path: Path
) -> None:
    first = run(store, demo_app, tmp_path / "a").image
    second = run(store, demo_app, tmp_path / "b").image
    assert first.manifest.data == second.manifest.data
    assert first.manifest.digest == second.manifest.digest
    again = run(store, demo_app, tmp_path / "a").image
    assert again.manifest.digest == first.manifest.digest
    assert all(layer.reused for layer in again.layers)


def test_docker_format(store: LocalStore, demo_app: str, tmp_path: Path) -> None:
    image = run(store, demo_app, tmp_path / "cache", format="docker").image
    assert image.format == "docker"
    assert image.manifest.media_type == MediaType.DOCKER_MANIFEST
    assert image.config.media_type == MediaType.DOCKER_CONFIG
    assert {layer.media_type for layer in image.layers} == {MediaType.DOCKER_LAYER_GZIP}
    oci = run(store, demo_app, tmp_path / "cache").image
    assert [x.digest for x in oci.layers] == [x.digest for x in image.layers]  # same blobs
    assert oci.config.data == image.config.data


def test_refusals_happen_before_any_layer_is_built(
    store: LocalStore, demo_app: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(StowawayError, match="need gzip layers, not zstd"):
        run(store, demo_app, cache, format="docker", settings=LayerSettings(compression="zstd"))
    with pytest.raises(ImageOptionError, match="is not in the image's closure"):
        run(store, demo_app, cache, ImageOptions(contents=["/nix/store/" + "0" * 32 + "-x"]))
    with pytest.raises(PlanError, match="at least 2"):
        run(store, demo_app, cache, max_layers=1)
    assert not cache.exists() or not any(cache.rglob("*.json"))


def test_max_layers_counts_the_customisation_layer(
    store: LocalStore, demo_app: str, tmp_path: Path
) -> None:
    image = run(store, demo_app, tmp_path / "cache", max_layers=2).image
    assert len(image.layers) == 2
    assert image.layers[-1].store_paths == ()
