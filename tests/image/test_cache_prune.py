"""Pruning the layer cache: least recently used first, by age and by size, never a blob
another entry (or the registry's storage) still uses, never a file that is not ours,
never an entry used within the grace period; lookups record their use."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from stowaway.errors import StowawayError
from stowaway.image.cache_prune import cache_info, parse_duration, parse_size, prune
from stowaway.image.layer_cache import LayerCache

TAR = "application/vnd.oci.image.layer.v1.tar"
DAY = 86400.0


def put(cache: LayerCache, key: str, data: bytes, age_days: float) -> str:
    """An entry ``key`` for a blob of ``data`` (uncompressed: its diff_id is its digest),
    last used ``age_days`` ago; returns the blob's hex."""
    with cache.blob_writer() as w:
        w.write(data)
        diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
        cache.commit(key, w, diff_id, TAR)
    age(cache, key, age_days)
    return diff_id.removeprefix("sha256:")


def age(cache: LayerCache, key: str, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(cache.root / "layers" / f"{key}.json", (t, t))


def key(n: int) -> str:
    return f"{n:016x}"


def test_prune_by_age_removes_entry_blob_and_diff_id(layer_cache: LayerCache) -> None:
    old = put(layer_cache, key(1), b"old" * 100, 10)
    new = put(layer_cache, key(2), b"new" * 100, 1)
    dry = prune(layer_cache.root, older_than=5 * DAY, dry_run=True)
    assert dry.removed_layers == [key(1)] and (layer_cache.root / "blobs/sha256" / old).exists()
    result = prune(layer_cache.root, older_than=5 * DAY)
    assert result.removed_layers == [key(1)]
    assert result.removed_blobs == ["sha256:" + old] and result.freed == 300
    root = layer_cache.root
    assert not (root / "blobs/sha256" / old).exists()
    assert not (root / "diff-ids" / old).exists()
    assert not (root / "layers" / f"{key(1)}.json").exists()
    assert layer_cache.lookup(key(1)) is None
    assert layer_cache.lookup(key(2)) is not None
    assert (root / "blobs/sha256" / new).exists()


def test_prune_by_size_goes_least_recently_used_first(layer_cache: LayerCache) -> None:
    for n, days in [(1, 3), (2, 5), (3, 2), (4, 4)]:
        put(layer_cache, key(n), bytes([n]) * 1000, days)
    result = prune(layer_cache.root, max_size=2000)
    assert result.removed_layers == [key(2), key(4)]  # the two least recently used
    assert result.kept_layers == 2 and result.kept_size == 2000
    info = cache_info(layer_cache.root)
    assert info["layers"] == 2 and info["blobs"] == 2 and info["size"] == 2000
    assert info["oldest_use"] < info["newest_use"]


def test_a_lookup_hit_records_its_use(layer_cache: LayerCache) -> None:
    put(layer_cache, key(1), b"a" * 100, 10)
    put(layer_cache, key(2), b"b" * 100, 9)
    assert layer_cache.lookup(key(1)) is not None  # now the most recently used
    assert prune(layer_cache.root, max_size=100).removed_layers == [key(2)]


def test_entries_used_within_the_grace_period_stay(layer_cache: LayerCache) -> None:
    put(layer_cache, key(1), b"a" * 100, 0)
    result = prune(layer_cache.root, max_size=0, older_than=0)
    assert result.removed_layers == [] and result.in_grace == 1
    assert prune(layer_cache.root, max_size=0, grace=0).removed_layers == [key(1)]


def test_a_shared_blob_goes_with_its_last_entry(layer_cache: LayerCache) -> None:
    blob = put(layer_cache, key(1), b"same" * 10, 10)
    put(layer_cache, key(2), b"same" * 10, 1)
    result = prune(layer_cache.root, older_than=5 * DAY)
    assert result.removed_layers == [key(1)] and result.removed_blobs == []
    assert layer_cache.lookup(key(2)) is not None
    assert (layer_cache.root / "blobs/sha256" / blob).exists()


def test_what_is_not_ours_is_left(layer_cache: LayerCache) -> None:
    root = layer_cache.root
    linked = put(layer_cache, key(1), b"pushed" * 10, 10)
    put(layer_cache, key(2), b"mine" * 10, 10)
    # the registry's storage shares blobs/ and links one of ours from a repository
    links = root / "repositories" / "org" / "app" / "_layers"
    links.mkdir(parents=True)
    (links / linked).write_text("")
    foreign = root / "blobs" / "sha256" / ("f" * 64)  # a blob no entry names
    foreign.write_bytes(b"registry's")
    unknown = [root / "notes.txt", root / "layers" / "README", root / "pushed" / "h.json"]
    for f in unknown:
        f.parent.mkdir(exist_ok=True)
        f.write_text("x")
    bad_entry = root / "layers" / f"{key(3)}.json"
    bad_entry.write_text("{not json")
    os.utime(bad_entry, (0, 0))
    result = prune(root, max_size=0)
    assert result.removed_layers == [key(1), key(2)]
    assert len(result.removed_blobs) == 1
    assert (root / "blobs/sha256" / linked).exists() and foreign.exists() and bad_entry.exists()
    assert all(f.exists() for f in unknown)


def test_prune_of_a_missing_cache_is_empty(tmp_path: Path) -> None:
    assert prune(tmp_path / "none", max_size=0).removed_layers == []
    assert cache_info(tmp_path / "none")["layers"] == 0
    assert not (tmp_path / "none").exists()


def test_touch_is_at_most_once_a_minute(
    layer_cache: LayerCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(layer_cache, key(1), b"a", 0)
    touched: list[object] = []
    monkeypatch.setattr(os, "utime", lambda *a, **k: touched.append(a))
    for _ in range(5):
        assert layer_cache.lookup(key(1)) is not None
    assert touched == []
    age(layer_cache, key(1), 1)
    layer_cache.lookup(key(1))
    assert len(touched) == 1


@pytest.mark.parametrize(
    ("value", "seconds"), [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("5", 5)]
)
def test_parse_duration(value: str, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "size"), [("500", 500), ("1k", 1024), ("2M", 2 << 20), ("1.5GiB", 3 << 29)]
)
def test_parse_size(value: str, size: int) -> None:
    assert parse_size(value) == size


def test_bad_duration_and_size_say_so() -> None:
    with pytest.raises(StowawayError, match="not a duration"):
        parse_duration("soon")
    with pytest.raises(StowawayError, match="not a size"):
        parse_size("big")
