"""Stub-tree building: a failed store path stops the whole tree before it returns."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stowaway.runtime.stub_trees import stub_layer


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_failed_path_leaves_no_job_writing_after_the_error(tmp_path: Path) -> None:
    """One path missing, another large: when stub_layer raises, no job of it still runs
    (they wrote through a directory fd that was closed, and whose number the next tree
    reused: a retried tree then failed with EEXIST)."""
    big = tmp_path / ("a" * 32 + "-big")
    for d in range(150):
        (big / f"d{d}").mkdir(parents=True)
        for f in range(100):
            (big / f"d{d}" / f"f{f}").write_bytes(b"x")
    missing = tmp_path / ("b" * 32 + "-gone")
    dest = tmp_path / "tree"
    dest.mkdir()
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(FileNotFoundError):
            stub_layer([(missing.name, missing), (big.name, big)], dest, pool, lambda b: None)
        after_error = _listing(dest)
    # the pool is shut down: every job it ran has ended
    assert _listing(dest) == after_error
