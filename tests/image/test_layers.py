"""Building store-path layers from the real demo closure through the cache."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from stowaway.errors import PathNotFound, StowawayError
from stowaway.image.annotations import decode_paths, decode_prefetch
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import (
    InvalidLayerSettings,
    LayerSettings,
    build_entries_layer,
    build_layers,
)
from stowaway.image.model import Layer, TarEntry
from stowaway.layering.model import PlannedLayer
from stowaway.store.binary_cache import BinaryCache
from stowaway.store.local import LocalStore
from stowaway.store.model import NarEntry, PathInfo

#: Level 1 where the level does not matter: busybox deflates slowly at level 6.
FAST = LayerSettings(level=1)


def one_layer_per_path(infos: dict[str, PathInfo]) -> list[PlannedLayer]:
    return [PlannedLayer((p,), infos[p].nar_size) for p in sorted(infos)]


def blob(layer: Layer) -> bytes:
    assert layer.path is not None
    return layer.path.read_bytes()


class CountingSource:
    """A real store source that records which paths were read."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.name = inner.name
        self.read: list[str] = []

    def query(self, path: str) -> PathInfo | None:
        return self.inner.query(path)

    def entries(self, path: str) -> Iterator[NarEntry]:
        self.read.append(path)
        return self.inner.entries(path)


class RecordingProgress:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, int | None]] = []

    def start(self, key: str, description: str, total: int | None) -> None:
        with self.lock:
            self.events.append(("start", key, total))

    def advance(self, key: str, amount: int) -> None:
        with self.lock:
            self.events.append(("advance", key, amount))

    def finish(self, key: str) -> None:
        with self.lock:
            self.events.append(("finish", key, None))


def test_layers_match_plan_and_contents(
    local_store: LocalStore, demo_infos: dict[str, PathInfo], layer_cache: LayerCache
) -> None:
    planned = one_layer_per_path(demo_infos)
    layers = build_layers(local_store, planned, demo_infos, LayerSettings(), layer_cache, jobs=2)
    assert len(layers) == len(planned) == 3
    for layer, plan in zip(layers, planned, strict=True):
        data = blob(layer)
        assert layer.digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert layer.size == len(data)
        assert layer.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()
        assert layer.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert layer.store_paths == plan.paths
        assert decode_paths(layer.annotations) == [Path(plan.paths[0]).name]
        assert not layer.reused
    later = [Path(plan.paths[0]).name for plan in planned[1:]]
    assert decode_prefetch(layers[0].annotations) == later
    assert [decode_prefetch(layer.annotations) for layer in layers[1:]] == [[], []]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_byte_for_byte_reproducible(
    local_store: LocalStore,
    demo_infos: dict[str, PathInfo],
    tmp_path: Path,
    compression: str,
) -> None:
    settings = LayerSettings(compression=compression)  # type: ignore[arg-type]
    planned = [PlannedLayer(tuple(sorted(demo_infos)), 0)]
    a = build_layers(local_store, planned, demo_infos, settings, LayerCache(tmp_path / "a"), jobs=1)
    b = build_layers(local_store, planned, demo_infos, settings, LayerCache(tmp_path / "b"), jobs=2)
    assert blob(a[0]) == blob(b[0])
    assert (a[0].digest, a[0].diff_id) == (b[0].digest, b[0].diff_id)
    if compression == "zstd":
        assert a[0].media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
        tar = subprocess.run(["zstd", "-dc"], input=blob(a[0]), check=True, capture_output=True)
        assert a[0].diff_id == "sha256:" + hashlib.sha256(tar.stdout).hexdigest()
    if compression == "none":
        assert a[0].digest == a[0].diff_id


def test_gzip_layer_decompresses_with_gzip_cli(
    local_store: LocalStore, demo_infos: dict[str, PathInfo], layer_cache: LayerCache
) -> None:
    planned = [PlannedLayer(tuple(sorted(demo_infos)), 0)]
    [layer] = build_layers(local_store, planned, demo_infos, LayerSettings(), layer_cache)
    tar = subprocess.run(["gzip", "-dc"], input=blob(layer), check=True, capture_output=True)
    assert layer.diff_id == "sha256:" + hashlib.sha256(tar.stdout).hexdigest()
    listing = subprocess.run(["tar", "-tf", "-"], input=tar.stdout, check=True, capture_output=True)
    assert listing.stdout.splitlines()[:2] == [b"nix/", b"nix/store/"]


def test_cache_hit_skips_building(
    local_store: LocalStore, demo_infos: dict[str, PathInfo], layer_cache: LayerCache
) -> None:
    planned = one_layer_per_path(demo_infos)
    first = build_layers(local_store, planned, demo_infos, FAST, layer_cache)
    stats = [layer.path.stat() for layer in first if layer.path]
    source = CountingSource(local_store)
    progress = RecordingProgress()
    second = build_layers(source, planned, demo_infos, FAST, layer_cache, progress=progress)
    assert source.read == []  # nothing was tarred again
    assert all(layer.reused for layer in second)
    assert [(layer.digest, layer.diff_id) for layer in second] == [
        (layer.digest, layer.diff_id) for layer in first
    ]
    after = [layer.path.stat() for layer in second if layer.path]
    assert [(s.st_ino, s.st_mtime_ns) for s in after] == [(s.st_ino, s.st_mtime_ns) for s in stats]
    assert second[0].store_paths == planned[0].paths and second[0].annotations


def test_key_covers_nar_hash_and_settings(
    local_store: LocalStore, demo_infos: dict[str, PathInfo], layer_cache: LayerCache
) -> None:
    planned = one_layer_per_path(demo_infos)
    build_layers(local_store, planned, demo_infos, FAST, layer_cache)
    path = planned[0].paths[0]
    # Same path name, different contents elsewhere (non-reproducible rebuild).
    other = dict(demo_infos)
    other[path] = replace(demo_infos[path], nar_hash="sha256:" + "0" * 52)
    source = CountingSource(local_store)
    again = build_layers(source, planned, other, FAST, layer_cache)
    assert source.read == [path]
    assert [layer.reused for layer in again] == [False, True, True]
    source.read.clear()
    level2 = build_layers(source, planned, demo_infos, LayerSettings("gzip", level=2), layer_cache)
    assert not any(layer.reused for layer in level2) and len(source.read) == 3


def test_binary_cache_layer_has_same_diff_id(
    local_store: LocalStore, demo_infos: dict[str, PathInfo], tmp_path: Path
) -> None:
    paths = sorted(demo_infos)
    url = f"file://{tmp_path / 'bc'}"
    subprocess.run(
        [
            *("nix", "--extra-experimental-features", "nix-command", "copy"),
            *("--to", f"{url}?compression=zstd", *paths),
        ],
        check=True,
        capture_output=True,
    )
    remote = BinaryCache(url, [], require_signatures=False)
    planned = [PlannedLayer(tuple(paths), 0)]
    settings = FAST
    [local] = build_layers(local_store, planned, demo_infos, settings, LayerCache(tmp_path / "a"))
    [cached] = build_layers(remote, planned, demo_infos, settings, LayerCache(tmp_path / "b"))
    assert cached.diff_id == local.diff_id
    assert cached.digest == local.digest


def test_progress_reports_bytes_per_layer(
    local_store: LocalStore, demo_infos: dict[str, PathInfo], layer_cache: LayerCache
) -> None:
    planned = one_layer_per_path(demo_infos)
    progress = RecordingProgress()
    build_layers(local_store, planned, demo_infos, FAST, layer_cache, progress=progress)
    for i, plan in enumerate(planned):
        mine = [e for e in progress.events if e[1] == str(i)]
        assert mine[0] == ("start", str(i), demo_infos[plan.paths[0]].nar_size)
        assert mine[-1] == ("finish", str(i), None)
        advanced = sum(e[2] or 0 for e in mine if e[0] == "advance")
        assert 0 < advanced <= demo_infos[plan.paths[0]].nar_size


def test_failures_are_clear_and_leave_no_entry(
    local_store: LocalStore, demo_infos: dict[str, PathInfo], layer_cache: LayerCache
) -> None:
    with pytest.raises(PathNotFound, match="/nix/store/x-missing of a planned layer"):
        build_layers(
            local_store,
            [PlannedLayer(("/nix/store/x-missing",), 0)],
            demo_infos,
            FAST,
            layer_cache,
        )

    class Broken(CountingSource):
        def entries(self, path: str) -> Iterator[NarEntry]:
            if path.endswith("-busybox"):
                raise StowawayError(f"{path}: disk on fire")
            return super().entries(path)

    with pytest.raises(StowawayError, match="disk on fire"):
        build_layers(
            Broken(local_store),
            one_layer_per_path(demo_infos),
            demo_infos,
            FAST,
            layer_cache,
            jobs=2,
        )
    blobs = layer_cache.root / "blobs" / "sha256"
    assert not [p for p in blobs.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compression": "xz"}, "unknown layer compression 'xz'"),
        ({"compression": "gzip", "level": 12}, "gzip level 12 is out of range 0..9"),
        ({"compression": "zstd", "level": 22}, "zstd level 22 is out of range -7..19"),
        ({"mtime": -1}, "layer mtime -1 is out of range"),
    ],
)
def test_invalid_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidLayerSettings, match=message):
        LayerSettings(**kwargs)  # type: ignore[arg-type]


def test_entries_layer_is_cached_by_key(layer_cache: LayerCache) -> None:
    def entries(text: bytes) -> Iterator[TarEntry]:
        yield TarEntry(b"etc", "directory", 0o755)
        yield TarEntry(b"etc/motd", "regular", 0o444, size=len(text), chunks=iter([text]))

    first = build_entries_layer(entries(b"hi\n"), "motd=hi", LayerSettings(), layer_cache)
    again = build_entries_layer(entries(b"ignored"), "motd=hi", LayerSettings(), layer_cache)
    other = build_entries_layer(entries(b"yo\n"), "motd=yo", LayerSettings(), layer_cache)
    assert again.reused and again.digest == first.digest
    assert not other.reused and other.digest != first.digest
    assert gzip.decompress(blob(first)).startswith(b"etc/")


def test_memory_stays_bounded_for_big_layers(layer_cache: LayerCache) -> None:
    """2 × 48 MiB of contents through gzip on two threads: Python-level allocations
    stay at a few MiB (the pipeline streams; nothing is held whole)."""
    chunk = (b"stowaway " * 116509)[: 1 << 20]
    paths = [f"/nix/store/{'a' * 32}-big", f"/nix/store/{'b' * 32}-big"]

    class BigSource:
        name = "synthetic 48 MiB files"

        def query(self, path: str) -> PathInfo | None:
            return None

        def entries(self, path: str) -> Iterator[NarEntry]:
            yield NarEntry(b"", "directory")
            yield NarEntry(b"f", "regular", size=48 << 20, chunks=(chunk for _ in range(48)))

    infos = {p: PathInfo(p, "sha256:" + "1" * 52, 48 << 20) for p in paths}
    planned = [PlannedLayer((p,), 48 << 20) for p in paths]
    tracemalloc.start()
    try:
        layers = build_layers(
            BigSource(), planned, infos, LayerSettings(level=1), layer_cache, jobs=2
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(layer.size > 0 and layer.path is not None for layer in layers)
    assert peak < 24 << 20, f"peak {peak >> 20} MiB"
