"""GcRoots under concurrency: threads rooting the same store path at once all succeed."""

from __future__ import annotations

import os
from pathlib import Path

from runtime_helpers import all_at_once

from stowaway.runtime.gcroots import GcRoots


def test_concurrent_adds_of_one_path(tmp_path: Path, demo_closure: list[str]) -> None:
    roots = GcRoots(tmp_path / "gc")
    targets = [Path(p) for p in demo_closure]
    threads, rounds = 8, 150

    def work() -> None:
        for i in range(rounds):
            target = targets[i % len(targets)]
            roots.add(target)
            if i % 3 == 2:  # the next add starts from scratch
                roots.remove(target.name)

    _, errors = all_at_once(work, threads)
    assert errors == []
    for t in targets:  # whatever interleaving: every root ends well-formed, no temp links
        roots.add(t)
    assert sorted(os.listdir(roots.dir)) == sorted(t.name for t in targets)
    assert all(os.readlink(roots.dir / t.name) == str(t) for t in targets)
