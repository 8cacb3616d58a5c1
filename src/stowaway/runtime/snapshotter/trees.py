"""Scheduling of overlay mode's stub trees: committed at once, built in the background
by ``stub_tree_builder``'s child process, waited for (and helped along) by whatever mounts
a chain first. A tree that cannot be built refuses the mount, never an incomplete
rootfs."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from pathlib import Path

from stowaway.errors import StowawayError
from stowaway.runtime.metadata import MetaStore, Record
from stowaway.runtime.snapshotter.contract import FailedPrecondition
from stowaway.runtime.snapshotter.files import rmtree
from stowaway.runtime.stub_tree_builder import StubTreeBuilder, make_tree

__all__ = ["StubTrees"]

log = logging.getLogger(__name__)


class StubTrees:
    """The trees under ``link_dir`` still being built, by snapshot id. ``lock`` is the
    snapshotter's: the schedule changes together with its metadata rows. ``builder``
    is None outside overlay mode, where nothing is scheduled."""

    def __init__(
        self,
        link_dir: Path,
        meta: MetaStore,
        pool: Executor,
        lock: threading.Lock,
        builder: StubTreeBuilder | None,
    ) -> None:
        self.link_dir = link_dir
        self.meta = meta
        self.builder = builder
        self._pool = pool
        self._lock = lock
        self._pending: dict[int, Future[None]] = {}
        self._helping: set[int] = set()  # trees this process builds for a waiting mount

    def close(self) -> None:
        if self.builder is not None:
            self.builder.close()  # unbuilt trees: rebuilt at start-up

    def schedule(self, sid: int, located: Sequence[tuple[str, Path]]) -> None:
        """Queue the tree of a store layer just committed (call under the lock, before
        anyone can see its row)."""
        assert self.builder is not None
        rmtree(self.link_dir / str(sid))  # orphan of a failed COMMIT
        self._pending[sid] = self.builder.submit(sid, located, self.donors(located))

    def rebuild(self, sid: int) -> None:
        """Build the tree of ``sid`` here and now."""
        paths = [Path(p) for p in self.meta.paths_of(sid)]
        located = [(p.name, p) for p in paths]
        make_tree(self.link_dir, sid, located, self.donors(located), self._pool)
        log.debug("snapshot %d: stub tree of %d store paths built here", sid, len(paths))

    def failed(self, sid: int, error: BaseException) -> None:
        """A tree that could not be built at start-up: mounts of its chain retry it."""
        failed: Future[None] = Future()
        failed.set_exception(error)
        with self._lock:
            self._pending[sid] = failed

    def settle(self, sid: int) -> None:
        """Let the builder finish the tree of ``sid`` (whatever the outcome), so that
        removing it does not race the build."""
        with self._lock:
            fut = self._pending.get(sid)
        if fut is not None:
            with contextlib.suppress(Exception):
                fut.result()

    def forget(self, sid: int) -> None:
        """Drop a removed snapshot from the schedule (call under the lock)."""
        self._pending.pop(sid, None)

    def wait(self, rec: Record) -> None:
        """Wait for the background stub trees of ``rec`` and its parents; a failed one
        is retried here once, else the mount is refused (never an incomplete rootfs)."""
        self._help_build((rec.id, *rec.chain))
        for sid in (rec.id, *rec.chain):
            with self._lock:
                fut = self._pending.get(sid)
            if fut is None:
                continue
            try:
                fut.result()
            except Exception as e:
                log.warning("snapshot %d: stub tree failed (%s); retrying", sid, e)
                try:
                    self.rebuild(sid)
                except (OSError, StowawayError) as e2:
                    raise FailedPrecondition(
                        f"snapshot {rec.key!r}: the stub tree of layer {sid} cannot be built "
                        f"in {self.link_dir}: {e2}"
                    ) from e2
            with self._lock:
                if self._pending.get(sid) is fut:
                    del self._pending[sid]

    def donors(self, located: Sequence[tuple[str, Path]]) -> dict[str, list[Path]]:
        """For each basename: where other snapshots' stub trees hold that store path
        (trees are built in order, so an earlier one is complete when this one is)."""
        users = self.meta.users_of([str(w) for _, w in located])
        out: dict[str, list[Path]] = {}
        for base, where in located:
            for sid in users.get(str(where), ()):
                entry = self.link_dir / str(sid)
                if not entry.is_symlink():  # a link to a fs dir is no stub tree
                    out.setdefault(base, []).append(entry / "nix" / "store" / base)
        return out

    def _help_build(self, sids: Sequence[int]) -> None:
        """Build queued trees of ``sids`` in this process too, newest first, while the
        child goes oldest first (skipping the one it is on). Called when a mount waits:
        at the end of a pull containerd waits for that answer, so a core is idle."""
        with self._lock:
            queued = sorted(i for i, f in self._pending.items() if not f.done())
            mine = [i for i in sids if i in queued[1:] and i not in self._helping]
            # a tree sharing paths with an older queued one waits for it (its donor)
            mine = [i for i in mine if not self._shares_with(i, queued[: queued.index(i)])]
            self._helping.update(mine)
        try:
            for sid in sorted(mine, reverse=True):
                with self._lock:
                    fut = self._pending.get(sid)
                if fut is None or fut.done():
                    break  # the child got here: it has done every older one too
                with contextlib.suppress(OSError, StowawayError):  # the child's job reports
                    self.rebuild(sid)
        finally:
            with self._lock:
                self._helping.difference_update(mine)

    def _shares_with(self, sid: int, others: Sequence[int]) -> bool:
        users = self.meta.users_of(self.meta.paths_of(sid)).values()
        return bool(set(others).intersection(u for us in users for u in us))
