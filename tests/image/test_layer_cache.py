"""The layer cache on disk: layout, cheap lookups, damaged entries never emitted,
concurrent builders."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stowaway.errors import StowawayError
from stowaway.image.digest import CorruptBlob, VerifyingReader, copy_verified, dropping_corrupt
from stowaway.image.layer_cache import LayerCache, default_cache_dir
from stowaway.image.layers import LayerSettings, build_entries_layer
from stowaway.image.model import Layer, TarEntry

SETTINGS = LayerSettings()


def entries(text: bytes = b"hello\n") -> list[TarEntry]:
    return [
        TarEntry(b"etc", "directory", 0o755),
        TarEntry(b"etc/motd", "regular", 0o444, size=len(text), chunks=iter([text])),
    ]


def build(cache: LayerCache, key: str = "motd") -> Layer:
    return build_entries_layer(entries(), key, SETTINGS, cache)


def index_files(cache: LayerCache) -> list[Path]:
    return sorted((cache.root / "layers").glob("*.json"))


def test_layout_and_index_entry(layer_cache: LayerCache) -> None:
    layer = build(layer_cache)
    assert layer.path == layer_cache.blob_path(layer.digest)
    assert layer.path.parent == layer_cache.root / "blobs" / "sha256"
    data = layer.path.read_bytes()
    assert layer.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert layer.size == len(data) and not layer.reused
    [index] = index_files(layer_cache)
    doc = json.loads(index.read_text())
    assert doc == {
        "version": 2,
        "key": index.stem,
        "digest": layer.digest,
        "diff_id": layer.diff_id,
        "size": layer.size,
        "media_type": "application/vnd.oci.image.layer.v1.tar+gzip",
    }
    hit = layer_cache.lookup(index.stem)
    assert hit is not None and hit.reused and hit.digest == layer.digest
    assert hit.diff_id == layer.diff_id and hit.path == layer.path
    # No temp files are left behind.
    assert [p.name for p in layer.path.parent.iterdir()] == [layer.path.name]


def test_blob_path_rejects_bad_digests(layer_cache: LayerCache) -> None:
    with pytest.raises(StowawayError, match="invalid digest 'sha256:xyz'"):
        layer_cache.blob_path("sha256:xyz")
    with pytest.raises(StowawayError, match="invalid digest"):
        layer_cache.blob_path("md5:" + "0" * 32)


def test_miss_and_unusable_entries(layer_cache: LayerCache) -> None:
    assert layer_cache.lookup("ab" * 32) is None
    layer = build(layer_cache)
    [index] = index_files(layer_cache)
    index.write_text("{not json")
    assert layer_cache.lookup(index.stem) is None
    index.write_text(json.dumps({"version": 2, "key": index.stem, "digest": layer.digest}))
    assert layer_cache.lookup(index.stem) is None
    with pytest.raises(StowawayError, match="invalid layer cache key '../x'"):
        layer_cache.lookup("../x")


def test_entries_are_bound_to_their_content(layer_cache: LayerCache) -> None:
    """An index entry pointing at another existing blob of the right size, or copied
    under another key, is a miss: the image is never emitted with the wrong layer."""
    a = build_entries_layer(entries(b"layer a\n"), "a", SETTINGS, layer_cache)
    b = build_entries_layer(entries(b"layer b\n"), "b", SETTINGS, layer_cache)
    assert a.size == b.size and a.digest != b.digest  # same size, other bytes
    by_digest = {json.loads(f.read_text())["digest"]: f for f in index_files(layer_cache)}
    index_a, index_b = by_digest[a.digest], by_digest[b.digest]
    doc_a = json.loads(index_a.read_text())
    # the entry of "a" now names b's blob (same size): refused, rebuilt as a
    index_a.write_text(json.dumps({**doc_a, "digest": b.digest}))
    assert layer_cache.lookup(index_a.stem) is None
    again = build_entries_layer(entries(b"layer a\n"), "a", SETTINGS, layer_cache)
    assert not again.reused and again.digest == a.digest
    # a's entry copied under b's key: refused too
    index_b.write_text(index_a.read_text())
    assert layer_cache.lookup(index_b.stem) is None
    # a blob this cache has no diff_id for (another writer's) is checked once, then known
    records = layer_cache.root / "diff-ids"
    (records / a.digest.removeprefix("sha256:")).unlink()
    hit = layer_cache.lookup(index_a.stem)
    assert hit is not None and hit.digest == a.digest
    assert (records / a.digest.removeprefix("sha256:")).read_text().strip() == a.diff_id


def test_truncated_blob_misses_and_is_rebuilt(layer_cache: LayerCache) -> None:
    layer = build(layer_cache)
    assert layer.path is not None
    layer.path.write_bytes(layer.path.read_bytes()[:-3])
    [index] = index_files(layer_cache)
    assert layer_cache.lookup(index.stem) is None
    again = build(layer_cache)
    assert not again.reused and again.digest == layer.digest
    assert again.path is not None and again.path.stat().st_size == layer.size


def test_corrupt_blob_is_detected_dropped_and_rebuilt(layer_cache: LayerCache) -> None:
    layer = build(layer_cache)
    assert layer.path is not None
    good = layer.path.read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x01
    layer.path.write_bytes(bytes(flipped))
    [index] = index_files(layer_cache)
    hit = layer_cache.lookup(index.stem)
    assert hit is not None  # same size: lookup stays cheap and cannot tell ...
    with pytest.raises(CorruptBlob, match=f"corrupt blob {hit.digest}.*hashes to sha256:"):
        copy_verified(hit, io.BytesIO())  # ... but reading can, and drops the blob
    assert not layer.path.exists()
    assert layer_cache.lookup(index.stem) is None
    rebuilt = build(layer_cache)
    assert not rebuilt.reused and rebuilt.path is not None
    assert rebuilt.path.read_bytes() == good


def test_entries_are_world_readable_whatever_the_umask(
    layer_cache: LayerCache, strict_umask: None
) -> None:
    """``serve`` running as another user reads the cache build wrote."""
    layer = build(layer_cache)
    [index] = index_files(layer_cache)
    assert layer.path is not None
    assert stat.S_IMODE(layer.path.stat().st_mode) == 0o644
    assert stat.S_IMODE(index.stat().st_mode) == 0o644


def test_dropping_corrupt_unlinks_only_on_corrupt_blob(layer_cache: LayerCache) -> None:
    layer = build(layer_cache)
    assert layer.path is not None
    with pytest.raises(OSError), dropping_corrupt(layer):
        raise OSError("not about the bytes")
    assert layer.path.exists()
    with pytest.raises(CorruptBlob), dropping_corrupt(layer):
        raise CorruptBlob("bad", digest=layer.digest, where="test")
    assert not layer.path.exists()
    with pytest.raises(CorruptBlob), dropping_corrupt(layer):  # already gone: still raises
        raise CorruptBlob("bad", digest=layer.digest, where="test")


def test_copy_verified_copies_good_blobs(layer_cache: LayerCache) -> None:
    layer = build(layer_cache)
    out = io.BytesIO()
    copy_verified(layer, out)
    assert layer.path is not None and out.getvalue() == layer.path.read_bytes()


def test_verifying_reader() -> None:
    data = b"x" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    reader = VerifyingReader(io.BytesIO(data), digest, len(data))
    assert reader.read(600) + reader.read(600) + reader.read() == data
    with pytest.raises(CorruptBlob, match="truncated: 999 of 1000 bytes"):
        reader = VerifyingReader(io.BytesIO(data[:-1]), digest, 1000)
        while reader.read(300):
            pass
    with pytest.raises(CorruptBlob, match="longer than its recorded size 1000"):
        VerifyingReader(io.BytesIO(data + b"y"), digest, 1000).read()
    with pytest.raises(CorruptBlob, match="hashes to"):
        VerifyingReader(io.BytesIO(b"y" * 1000), digest, 1000).read(1000)
    empty = "sha256:" + hashlib.sha256(b"").hexdigest()
    with pytest.raises(CorruptBlob, match="hashes to"):
        VerifyingReader(io.BytesIO(b""), digest, 0).read()
    assert VerifyingReader(io.BytesIO(b""), empty, 0).read() == b""


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "stowaway"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # not absolute: ignored per XDG
    assert default_cache_dir() == Path.home() / ".cache" / "stowaway"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "stowaway"


def test_hundred_lookups_are_fast(layer_cache: LayerCache, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", lambda fd: None)  # only to fill the cache quickly
        for i in range(100):
            build_entries_layer(entries(b"%d" % i), f"k{i}", SETTINGS, layer_cache)
    keys = [p.stem for p in index_files(layer_cache)]
    assert len(keys) == 100
    start = time.perf_counter()
    hits = [layer_cache.lookup(k) for k in keys]
    elapsed = time.perf_counter() - start
    assert all(h is not None for h in hits)
    assert elapsed < 0.05, f"100 lookups took {elapsed * 1000:.1f} ms"


CONCURRENT_BUILDER = """
import sys
from pathlib import Path
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings, build_entries_layer
from stowaway.image.model import TarEntry

data = bytes(range(256)) * 16000  # 4 MB: long enough for the builds to overlap
cache = LayerCache(Path(sys.argv[1]))
sys.stdin.read()  # start together
layer = build_entries_layer(
    [TarEntry(b"big", "regular", 0o444, size=len(data), chunks=iter([data]))],
    "big", LayerSettings(), cache)
print(layer.digest)
"""


def test_two_processes_building_the_same_key(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_BUILDER, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
    outs = []
    for p in procs:
        assert p.stdout is not None
        with p.stdout:
            outs.append(p.stdout.read().strip())
        assert p.wait(timeout=60) == 0
    assert outs[0] == outs[1]
    cache = LayerCache(root)
    [index] = index_files(cache)
    hit = cache.lookup(index.stem)
    assert hit is not None and hit.digest == outs[0]
    copy_verified(hit, io.BytesIO())  # the surviving blob is intact
    assert sorted(p.name for p in (root / "blobs" / "sha256").iterdir()) == [outs[0][7:]]
