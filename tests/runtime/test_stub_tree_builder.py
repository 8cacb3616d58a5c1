"""The stub-tree child process: builds real trees from the demo closure, reports errors
per job, survives its own death (the next job starts a new child), stops on close."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import wait_for
from stowaway.errors import StowawayError
from stowaway.runtime.stub_tree_builder import NICE, StubTreeBuilder, _Child

MISSING = Path("/nix/store/00000000000000000000000000000000-not-here")


@pytest.fixture()
def builder(tmp_path: Path) -> Iterator[StubTreeBuilder]:
    b = StubTreeBuilder(tmp_path)
    yield b
    b.close()


def located(paths: list[str]) -> list[tuple[str, Path]]:
    return [(os.path.basename(p), Path(p)) for p in paths]


def test_builds_stub_trees_at_low_priority(
    builder: StubTreeBuilder, tmp_path: Path, demo_closure: list[str], demo_app: str
) -> None:
    builder.submit(1, located(demo_closure), {}).result(timeout=60)
    pid = builder.pid
    assert pid is not None
    tasks = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    # NICE above this process's own niceness (a niced test run), at most 19
    want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICE)
    assert len(tasks) > 1 and {os.getpriority(os.PRIO_PROCESS, t) for t in tasks} == {want}
    stub = tmp_path / "1" / demo_app.lstrip("/") / "bin" / "demo"
    real = Path(demo_app, "bin", "demo")
    assert stub.stat().st_size == real.stat().st_size and stub.stat().st_mtime == 1
    assert (
        os.getxattr(stub, "trusted.overlay.redirect")
        == f"/{real.parent.parent.name}/bin/demo".encode()
    )
    # a later tree of the same paths hard-links the first one's stubs
    donors = {b: [tmp_path / "1" / "nix" / "store" / b] for b, _ in located(demo_closure)}
    builder.submit(2, located(demo_closure), donors).result(timeout=60)
    assert (
        tmp_path / "2" / demo_app.lstrip("/") / "bin" / "demo"
    ).stat().st_ino == stub.stat().st_ino
    assert sorted(e.name for e in tmp_path.iterdir()) == ["1", "2"]  # no temp dirs left


def test_a_failed_job_names_its_snapshot_and_the_next_one_runs(
    builder: StubTreeBuilder, tmp_path: Path, demo_app: str
) -> None:
    bad = builder.submit(7, [(MISSING.name, MISSING)], {})
    good = builder.submit(8, located([demo_app]), {})
    with pytest.raises(StowawayError, match=f"snapshot 7: .*{MISSING.name}"):
        bad.result(timeout=60)
    good.result(timeout=60)
    assert not (tmp_path / "7").exists() and (tmp_path / "8").is_dir()


def test_a_dead_child_fails_its_jobs_and_is_replaced(
    builder: StubTreeBuilder, tmp_path: Path, demo_app: str
) -> None:
    first = builder.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)  # queue a job it will never answer, then kill it
    pending = builder.submit(1, located([demo_app]), {})
    os.kill(first, signal.SIGKILL)
    with pytest.raises(StowawayError, match="exited"):
        pending.result(timeout=60)
    builder.submit(2, located([demo_app]), {}).result(timeout=60)
    assert builder.pid not in (None, first) and (tmp_path / "2").is_dir()


def test_close_stops_the_child(tmp_path: Path) -> None:
    b = StubTreeBuilder(tmp_path)
    pid = b.pid
    assert pid is not None
    b.close()
    assert b.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_job_sent_after_the_child_exited_fails_at_once(tmp_path: Path) -> None:
    """submit checks the child is alive, but it may die right after: a job sent to a
    child whose end the reader has already seen must fail, not wait forever."""
    child = _Child()
    child.proc.kill()
    wait_for(lambda: child.exited is not None, 30, "the reader to see the child exit")
    job = {"link_dir": str(tmp_path), "sid": 1, "located": [], "donors": {}}
    with pytest.raises(StowawayError, match="exited"):
        child.send(job).result(timeout=5)
    child.stop()
