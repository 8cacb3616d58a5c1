"""Fixtures for store tests: hand-made trees, signed binary caches made by real `nix copy`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import wait_for
from nixtools import nix_copy


def make_odd_tree(root: Path) -> Path:
    """A tree with what NAR ordering and modes make interesting."""
    root.mkdir()
    (root / "empty-file").write_bytes(b"")
    (root / "empty-dir").mkdir()
    for name in [b"B", b"a", b"a.b", b"a-b", b"ab", b"a b", b"\xc3\xa9t\xc3\xa9", b"\xff raw"]:
        (root / os.fsdecode(name)).write_bytes(name * 3)
    exe = root / "bin" / "tool"
    exe.parent.mkdir()
    exe.write_bytes(b"#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    group_exec = root / "bin" / "group-exec-only"
    group_exec.write_bytes(b"x")
    group_exec.chmod(0o654)
    (root / "bin" / "link").symlink_to("tool")
    (root / "dangling").symlink_to("/does/not/exist")
    deep = root
    for i in range(10):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(os.urandom(3 * 1024 * 1024 + 5))  # spans several chunks
    for n in range(1, 17):  # every padding length
        (root / "pad" / f"{n:02d}").parent.mkdir(exist_ok=True)
        (root / "pad" / f"{n:02d}").write_bytes(b"p" * n)
    return root


@pytest.fixture(scope="session")
def odd_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_odd_tree(tmp_path_factory.mktemp("odd") / "odd-tree")


@pytest.fixture(scope="session")
def odd_store_path(odd_tree: Path) -> str:
    """The odd tree added to the real store (canonicalised by nix)."""
    out = subprocess.run(
        ["nix-store", "--add", str(odd_tree)], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


@pytest.fixture(scope="session")
def unsigned_cache(tmp_path_factory: pytest.TempPathFactory, demo_closure: list[str]) -> str:
    return nix_copy(tmp_path_factory.mktemp("unsigned") / "c", [demo_closure[-1]], "zstd", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def http_cache(signed_caches: dict[str, str]) -> Iterator[str]:
    """The xz cache served over HTTP by `python -m http.server` on a loopback port."""
    root = signed_caches["xz"].removeprefix("file://")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", root, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError("http.server exited")
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True

        wait_for(listening, 10, "http.server to listen", ignore=(OSError,))
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture()
def copied_store(tmp_path: Path, demo_closure: list[str]) -> Path:
    """The demo closure copied (cp -a) into a plain directory: a store without a db."""
    store = tmp_path / "nix" / "store"
    store.mkdir(parents=True)
    subprocess.run(["cp", "-a", *demo_closure, str(store)], check=True)
    return store
