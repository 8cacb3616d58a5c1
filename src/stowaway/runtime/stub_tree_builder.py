"""Stub trees built in a child process, at low priority, while containerd pulls.

Why a process: building a tree is ~25k small syscalls wrapped in Python. In the
snapshotter's own process those threads compete for the GIL with the gRPC handlers,
and each Prepare/List/Stat of a pull waited for them (measured: Prepare 1.6 ms alone,
5.7 ms with trees building). In a child niced to 10, the handlers and containerd get
the CPU first and the trees use what is left; they are needed only when a container's
rootfs is mounted, after the pull.

Why not ``multiprocessing``: its spawn method re-imports the parent's ``__main__``,
which breaks any program that embeds the snapshotter without a main guard. Here the
child is ``python -m stowaway.runtime.stub_tree_builder``; jobs go down its stdin and results
come back on its stdout as JSON lines, one per job, in order. The child exits at EOF
(once the jobs already sent are done), so a killed snapshotter does not leave it behind;
a clean stop terminates it at once. Trees are built one at a time, in submission
order, so a tree can hard-link the stubs of a path an earlier tree made (``donors``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import stowaway
from stowaway.errors import StowawayError
from stowaway.runtime.stub_trees import stub_layer

__all__ = ["StubTreeBuilder", "make_tree"]

NICE = 10


def make_tree(
    link_dir: Path,
    sid: int,
    located: Sequence[tuple[str, Path]],
    donors: Mapping[str, Sequence[Path]],
    pool: Executor,
) -> None:
    """Build snapshot ``sid``'s stub tree in a temp dir under ``link_dir`` and rename it
    to ``<link_dir>/<sid>`` (a concurrent builder may win). ``donors[base]``: stub trees
    of that store path other snapshots hold, hard-linked instead of rebuilt. Nothing
    to do when the tree is there (the snapshotter built it while a mount waited)."""
    if (link_dir / str(sid)).is_dir():
        return
    tree = Path(tempfile.mkdtemp(prefix=".new-", dir=link_dir))
    try:
        os.chmod(tree, 0o755)  # a view's root shows the top lower dir's mode
        stub_layer(located, tree, pool, _first_existing(donors))
        os.rename(tree, link_dir / str(sid))
    except OSError:
        if not (link_dir / str(sid)).is_dir():
            raise
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _first_existing(donors: Mapping[str, Sequence[Path]]) -> Callable[[str], Path | None]:
    def find(base: str) -> Path | None:
        return next((p for p in donors.get(base, ()) if os.path.lexists(p)), None)

    return find


class _Child:
    """One builder process and the futures of the jobs sent to it, in order."""

    def __init__(self) -> None:
        src = str(Path(stowaway.__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
        )
        self.waiting: collections.deque[Future[None]] = collections.deque()
        self.exited: str | None = None  # set by the reader at EOF: no answer comes any more
        self.lock = threading.Lock()
        threading.Thread(target=self._read, name="stowaway-trees", daemon=True).start()

    def send(self, job: dict[str, Any]) -> Future[None]:
        fut: Future[None] = Future()
        assert self.proc.stdin is not None
        with self.lock:
            if self.exited is not None:  # died after the caller checked it was alive
                fut.set_exception(StowawayError(self.exited))
                return fut
            self.waiting.append(fut)
            try:
                self.proc.stdin.write(json.dumps(job) + "\n")
                self.proc.stdin.flush()
            except OSError:
                pass  # it died: the reader fails every waiting future at EOF
        return fut

    def _read(self) -> None:
        """Resolve futures in order from the child's answers; fail the rest at EOF."""
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                error = json.loads(line)["error"]
                with self.lock:
                    fut = self.waiting.popleft()
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(StowawayError(error))
        code = self.proc.wait()
        with self.lock:
            self.exited = f"stub tree builder exited with status {code}"
            waiting, self.waiting = list(self.waiting), collections.deque()
        for fut in waiting:
            fut.set_exception(StowawayError(self.exited))

    def stop(self) -> None:
        """Terminate it now: trees are derived state (a tree cut short is a temp dir the
        next start-up removes; unbuilt ones are rebuilt then)."""
        assert self.proc.stdin is not None
        with self.lock, contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait()


class StubTreeBuilder:
    """The parent's side: ``submit`` a tree, get a Future resolved when it is built."""

    def __init__(self, link_dir: Path) -> None:
        self.link_dir = link_dir
        self._lock = threading.Lock()
        self._child: _Child | None = _Child()  # started now: the first Prepare stays fast

    @property
    def pid(self) -> int | None:
        """The child's pid while one runs (it is started again on the next submit)."""
        with self._lock:
            child = self._child
        return child.proc.pid if child is not None and child.proc.poll() is None else None

    def submit(
        self,
        sid: int,
        located: Sequence[tuple[str, Path]],
        donors: Mapping[str, Sequence[Path]],
    ) -> Future[None]:
        job = {
            "link_dir": str(self.link_dir),
            "sid": sid,
            "located": [[b, str(p)] for b, p in located],
            "donors": {b: [str(p) for p in ps] for b, ps in donors.items()},
        }
        with self._lock:
            if self._child is None or self._child.proc.poll() is not None:
                if self._child is not None:
                    self._child.stop()  # dead: just close its pipe
                self._child = _Child()  # first use, or the last one died
            return self._child.send(job)

    def close(self) -> None:
        """Stop the child; trees not built yet are rebuilt at start-up."""
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            child.stop()


def _serve(jobs: IO[str], out: IO[str]) -> None:
    """The child: one JSON job per line in, one ``{"error": …}`` line out per job."""
    os.nice(NICE)
    # one thread: measured, more threads only contend for the GIL (the kernel's share
    # of each file does not overlap enough to pay for it)
    with ThreadPoolExecutor(1, "stowaway-stubs") as pool:
        for line in jobs:
            job: dict[str, Any] = json.loads(line)
            try:
                make_tree(
                    Path(job["link_dir"]),
                    job["sid"],
                    [(b, Path(p)) for b, p in job["located"]],
                    {b: [Path(p) for p in ps] for b, ps in job["donors"].items()},
                    pool,
                )
                error = None
            except (OSError, StowawayError) as e:
                error = f"snapshot {job['sid']}: {e}"
            out.write(json.dumps({"error": error}) + "\n")
            out.flush()


if __name__ == "__main__":
    _serve(sys.stdin, sys.stdout)
