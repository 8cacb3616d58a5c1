"""Substituter under concurrency, with a real signed binary cache of the demo closure."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
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
