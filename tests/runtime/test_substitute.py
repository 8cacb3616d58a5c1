"""Substituter under concurrency, with a real signed binary cache of the demo closure."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard
from runtime_helpers import all_at_once

from stowaway.runtime.substitute import Substituter
from stowaway.store.binary_cache import BinaryCache
from stowaway.store.model import NarEntry
from stowaway.store.narinfo import PublicKey


def _substituter(url: str, key: str, local: Path) -> tuple[Substituter, list[str]]:
    """A substituter whose cache records every NAR it streams."""
    cache = BinaryCache(url, [PublicKey.parse(key)])
    streamed: list[str] = []
    entries = cache.entries

    def counting(path: str) -> Iterator[NarEntry]:
        streamed.append(path)
        return entries(path)

    cache.entries = counting  # type: ignore[method-assign]
    local.mkdir()
    return Substituter([cache], local), streamed


def test_concurrent_fetches_of_one_path_download_once(
    tmp_path: Path,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
) -> None:
    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    base = os.path.basename(greeting)
    sub, streamed = _substituter(signed_caches["xz"], cache_keys["good"], tmp_path / "local")
    n = 8
    got, errors = all_at_once(lambda: sub.fetch(base), n)
    assert errors == [] and got == [tmp_path / "local" / base] * n
    assert streamed == [f"/nix/store/{base}"], "the same path was downloaded more than once"
    diff = subprocess.run(["diff", "-r", greeting, str(got[0])], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout
    assert sorted(os.listdir(tmp_path / "local")) == [base]  # no temp dirs left


def test_path_placed_by_another_process_meanwhile(
    tmp_path: Path,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
) -> None:
    """Another process renames the same path into place while we download: ours is
    dropped, theirs is used (rename gives ENOTEMPTY)."""
    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    base = os.path.basename(greeting)
    local = tmp_path / "local"
    sub, _ = _substituter(signed_caches["xz"], cache_keys["good"], local)
    cache = sub.caches[0]
    entries = cache.entries

    def racing(path: str) -> Iterator[NarEntry]:
        yield from entries(path)
        subprocess.run(["cp", "-a", greeting, str(local / base)], check=True)

    cache.entries = racing  # type: ignore[method-assign]
    assert sub.fetch(base) == local / base
    assert sorted(os.listdir(local)) == [base]
    diff = subprocess.run(["diff", "-r", greeting, str(local / base)], capture_output=True)
    assert diff.returncode == 0


def test_a_full_local_disk_means_not_substitutable(
    tmp_path: Path,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ENOSPC while unpacking is the local disk's fault, not a crash: fetch answers None
    (the snapshotter then lets containerd unpack the layer), logs why, leaves no temp."""
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    local = tmp_path / "local"
    local.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tiny", str(local)], check=True)
    try:
        cache = BinaryCache(signed_caches["zstd"], [PublicKey.parse(cache_keys["good"])])
        with caplog.at_level(logging.WARNING, logger="stowaway.runtime.substitute"):
            assert Substituter([cache], local).fetch(os.path.basename(busybox)) is None
        assert os.listdir(local) == []
        assert "No space left on device" in caplog.text and busybox.rsplit("/")[-1] in caplog.text
    finally:
        subprocess.run(["umount", str(local)], check=True)


def _damaged_cache(url: str, dest: Path, victim: str, damage: str) -> str:
    """A copy of the cache at ``url`` whose NAR of ``victim`` is ``damage``d: "flipped"
    (one byte inverted mid-file) or "cut" (its second half missing, as an interrupted
    download leaves it)."""
    shutil.copytree(url.removeprefix("file://"), dest)
    ni = (dest / (os.path.basename(victim)[:32] + ".narinfo")).read_text()
    nar = dest / re.search(r"URL: (\S+)", ni).group(1)  # type: ignore[union-attr]
    data = bytearray(nar.read_bytes())
    if damage == "flipped":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    nar.chmod(0o644)
    nar.write_bytes(bytes(data))
    return f"file://{dest}"


def _tree(path: Path) -> list[tuple[str, int, bytes]]:
    """(relative name, mode, contents or link target) of every entry under ``path``."""
    out = []
    for d, dirs, files in os.walk(path):
        for n in sorted(dirs + files):
            p = Path(d, n)
            st = p.lstat()
            if p.is_symlink():
                body = os.readlink(p).encode()
            else:
                body = b"" if p.is_dir() else p.read_bytes()
            out.append((str(p.relative_to(path)), st.st_mode, body))
    return sorted(out)


@pytest.mark.parametrize(("compression", "damage"), [("none", "flipped"), ("zstd", "cut")])
def test_one_bad_nar_among_parallel_fetches(
    tmp_path: Path,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    compression: str,
    damage: str,
) -> None:
    """The whole closure fetched in parallel from a cache where busybox's NAR is damaged
    (a flipped byte: a well-formed NAR with the wrong hash; a cut file: an interrupted
    download): every other path arrives identical to the store's, busybox is not
    substitutable with a warning that names it and the check that failed, and the local
    store holds no busybox and no temp dir."""
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    url = _damaged_cache(signed_caches[compression], tmp_path / "c", busybox, damage)
    sub, _ = _substituter(url, cache_keys["good"], tmp_path / "local")
    bases = [os.path.basename(p) for p in demo_closure]
    with (
        caplog.at_level(logging.WARNING, logger="stowaway.runtime.substitute"),
        ThreadPoolExecutor(4) as pool,
    ):
        got = sub.fetch_all(bases, pool)
    local = tmp_path / "local"
    want = {b: (None if b == os.path.basename(busybox) else local / b) for b in bases}
    assert dict(zip(bases, got, strict=True)) == want
    assert sorted(os.listdir(local)) == sorted(b for b, w in want.items() if w)
    for p in demo_closure:
        if p != busybox:
            assert _tree(local / os.path.basename(p)) == _tree(Path(p)), p
    why = "expected hash" if damage == "flipped" else "truncated|decompression failed"
    assert re.search(f"substituting {re.escape(os.path.basename(busybox))} .*({why})", caplog.text)
    # nothing of ours keeps reading a NAR once its fetch is over, failed or not
    assert not [t for t in threading.enumerate() if t.name == "stowaway-nar-read"]


def _nar_of_one_file(size: int) -> bytes:
    """A well-formed NAR holding one regular file of ``size`` zero bytes."""

    def s(b: bytes) -> bytes:
        return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)

    head = b"".join(s(t) for t in (b"nix-archive-1", b"(", b"type", b"regular", b"contents"))
    return head + size.to_bytes(8, "little") + b"\0" * size + b"\0" * (-size % 8) + s(b")")


def test_abandoned_stream_stops_its_reader(
    tmp_path: Path, signed_caches: dict[str, str], demo_app: str
) -> None:
    """A consumer that stops reading a NAR midway (its local disk failed) closes the
    stream: the read-ahead thread, blocked far from the end of a 64 MiB NAR, ends."""
    root = tmp_path / "c"
    shutil.copytree(signed_caches["zstd"].removeprefix("file://"), root)
    ni_file = root / (os.path.basename(demo_app)[:32] + ".narinfo")
    ni = ni_file.read_text()
    nar = root / re.search(r"URL: (\S+)", ni).group(1)  # type: ignore[union-attr]
    data = _nar_of_one_file(64 << 20)
    nar.chmod(0o644)
    nar.write_bytes(zstandard.ZstdCompressor(level=1).compress(data))
    ni = re.sub(r"File(Size|Hash): .*\n", "", ni)
    ni_file.write_text(re.sub(r"NarSize: \d+", f"NarSize: {len(data)}", ni))
    stream = BinaryCache(f"file://{root}", [], require_signatures=False).entries(demo_app)
    first = next(stream)
    assert first.kind == "regular" and first.size == 64 << 20
    assert len(next(iter(first.chunks))) > 0
    assert [t for t in threading.enumerate() if t.name == "stowaway-nar-read"]
    stream.close()  # type: ignore[attr-defined]
    assert not [t for t in threading.enumerate() if t.name == "stowaway-nar-read"]


def test_parallel_fetches_publish_complete_paths(
    tmp_path: Path,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
) -> None:
    """Many fetches of different paths finishing together (published in shared syncfs
    rounds) each publish their path whole, once."""
    sub, streamed = _substituter(signed_caches["zstd"], cache_keys["good"], tmp_path / "local")
    bases = [os.path.basename(p) for p in demo_closure]
    with ThreadPoolExecutor(8) as pool:
        got = sub.fetch_all(bases * 2, pool)
    assert got == [tmp_path / "local" / b for b in bases * 2]
    assert sorted(streamed) == sorted(demo_closure)  # each downloaded once
    for p in demo_closure:
        assert _tree(tmp_path / "local" / os.path.basename(p)) == _tree(Path(p)), p


def test_interrupted_path_leaves_nothing_of_it_and_can_be_retried(
    tmp_path: Path,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
) -> None:
    """A batch interrupted while one NAR is half unpacked (KeyboardInterrupt, as a
    signal delivers it) raises once every path of it is settled, leaves nothing of the
    interrupted path and no temp dir in the local store (the other paths, complete and
    verified, are placed), and the next batch fetches the rest."""
    sub, _ = _substituter(signed_caches["zstd"], cache_keys["good"], tmp_path / "local")
    cache = sub.caches[0]
    entries = cache.entries
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))

    def interrupted(path: str) -> Iterator[NarEntry]:
        for i, e in enumerate(entries(path)):
            if path == busybox and i == 2:
                raise KeyboardInterrupt
            yield e

    cache.entries = interrupted  # type: ignore[method-assign]
    bases = [os.path.basename(p) for p in demo_closure]
    with ThreadPoolExecutor(2) as pool, pytest.raises(KeyboardInterrupt):
        sub.fetch_all(bases, pool)
    others = sorted(b for b in bases if b != os.path.basename(busybox))
    assert sorted(os.listdir(tmp_path / "local")) == others
    cache.entries = entries  # type: ignore[method-assign]
    with ThreadPoolExecutor(2) as pool:
        assert sub.fetch_all(bases, pool) == [tmp_path / "local" / b for b in bases]
    assert sorted(os.listdir(tmp_path / "local")) == sorted(bases)


def test_a_cancelled_fetch_fails_its_path_and_the_next_one_fetches_it(
    tmp_path: Path,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
) -> None:
    """A pool shut down with its queue cancelled: the queued path's future fails with
    CancelledError (nobody waits forever) and nothing of it is left; a later fetch
    of it works."""
    sub, _ = _substituter(signed_caches["zstd"], cache_keys["good"], tmp_path / "local")
    base = os.path.basename(next(p for p in demo_closure if p.endswith("-greeting-data")))
    release = threading.Event()
    pool = ThreadPoolExecutor(1)
    pool.submit(release.wait, 30)  # the only worker is busy: the fetch waits in the queue
    (queued,) = sub.start([base], pool)
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    with pytest.raises(CancelledError):
        queued.result(timeout=30)
    assert os.listdir(tmp_path / "local") == []
    with ThreadPoolExecutor(1) as again:
        assert sub.fetch_all([base], again) == [tmp_path / "local" / base]
