"""Fetch store paths from signature-checked binary caches into a writable local store.

Why: a node whose shared store (SAN/NFS, mounted read-only) lacks a path can still skip
the registry download by substituting the path from a Nix binary cache. The NAR is
unpacked into ``<local>/.tmp-…`` and renamed into place only after the cache's NarHash
and NarSize checked out (``BinaryCache.entries`` verifies them when the stream ends), so
a crash or a corrupt download never leaves a half path that looks valid. Files get the
store's canonical form: 0444/0555, directories 0555, mtime 1.

NARs are unpacked in parallel (``start``: a layer's missing paths, or a whole image's
ahead of its layers), and whatever is unpacked by then costs one ``syncfs`` before its
renames: not an fsync per file (on the benchmark's 25k-file closure per-file fsyncs alone
took about a minute), nor a syncfs per path (each waits for every dirty page of the
filesystem, other tenants' too); one publisher thread does the rounds, so fetches
finishing together share a flush (group commit). Each NAR's download, decompression
and hashing run a few MiB ahead in a thread of the stream (``BinaryCache.entries``):
they and the writes release the GIL. A path another batch is fetching is waited for (one download);
a path another process placed meanwhile counts as fetched: it was renamed into place
complete, like ours.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import CancelledError, Executor, Future, wait
from pathlib import Path

from stowaway.errors import StowawayError
from stowaway.runtime.stub_trees import CANONICAL_MTIME
from stowaway.store.binary_cache import BinaryCache
from stowaway.store.model import STORE_DIR

__all__ = ["FETCH_PREFIX", "Substituter"]

#: Temp dirs of fetches in progress, inside the local store (renamed into place).
FETCH_PREFIX = ".tmp-"

log = logging.getLogger(__name__)
_NS = CANONICAL_MTIME * 10**9
_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (syncfs(2); the os module lacks it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class _Staged:
    """A NAR unpacked and verified in ``tmp``/p, not yet durable nor in place."""

    def __init__(self, tmp: Path, cache: BinaryCache) -> None:
        self.tmp = tmp
        self.cache = cache


#: A path's staging: where it already is, its unpacked NAR, None (no cache has it), or
#: what a staging raised (it fails that path only).
_Stage = Path | _Staged | BaseException | None


class Substituter:
    """Tries each cache in order; ``fetch`` returns the path on disk or None."""

    def __init__(self, caches: Sequence[BinaryCache], local_store: Path) -> None:
        self.caches = list(caches)
        self.local_store = local_store
        self._inflight: dict[str, Future[Path | None]] = {}
        self._lock = threading.Condition()
        self._staged: list[tuple[str, _Stage]] = []  # done, not yet published
        self._unpublished = 0  # staging jobs submitted and not yet published
        self._publishing = False  # a publisher thread runs

    def fetch(self, basename: str) -> Path | None:
        return self.fetch_all([basename], None)[0]

    def fetch_all(self, basenames: Sequence[str], pool: Executor | None) -> list[Path | None]:
        """Each basename's path on disk or None: ``start``, then wait for all; without
        a pool the NARs are unpacked in this thread and published together. A path whose
        staging raised raises here, after the others were placed."""
        if pool is not None:
            futures = self.start(basenames, pool)
            wait(futures)  # all settled before an error goes on: no fetch of ours runs
            return [f.result() for f in futures]
        futures, mine = self._claim(basenames)
        staged: list[tuple[str, _Stage]] = []
        for b in mine:
            try:
                staged.append((b, self._stage(b)))
            except BaseException as e:  # noqa: BLE001 - it fails that path, raised below
                staged.append((b, e))
        self._publish(staged)
        return [f.result() for f in futures]

    def start(self, basenames: Sequence[str], pool: Executor) -> list[Future[Path | None]]:
        """A future of each basename's path on disk (None: no cache has it), without
        waiting. The NARs are unpacked on ``pool`` in the order given; a thread of ours
        makes the unpacked ones durable together (one ``syncfs`` for all that are ready)
        and renames them into place, so early paths are placed while later ones still
        download. A path another call is fetching is waited for, not fetched again."""
        futures, mine = self._claim(basenames)
        for b in mine:
            with self._lock:
                self._unpublished += 1
                if not self._publishing:
                    self._publishing = True
                    threading.Thread(
                        target=self._publisher, name="stowaway-publish", daemon=True
                    ).start()
            try:
                job = pool.submit(self._stage, b)
            except BaseException as e:  # noqa: BLE001 - e.g. a pool shut down: fails b
                self._ready(b, e)
            else:
                job.add_done_callback(functools.partial(self._job_done, b))
        return futures

    def _claim(self, basenames: Sequence[str]) -> tuple[list[Future[Path | None]], list[str]]:
        """The future of each basename, and those no other call is fetching (ours now)."""
        mine: list[str] = []
        futures: list[Future[Path | None]] = []
        with self._lock:
            for b in basenames:
                f = self._inflight.get(b)
                if f is None:
                    f = self._inflight[b] = Future()
                    mine.append(b)
                futures.append(f)
        return futures, mine

    def _job_done(self, base: str, job: Future[Path | _Staged | None]) -> None:
        if job.cancelled():  # a pool shut down with cancel_futures: fail it, never hang
            self._ready(base, CancelledError(f"substituting {base} was cancelled"))
        else:
            self._ready(base, job.exception() or job.result())

    def _ready(self, base: str, outcome: _Stage) -> None:
        with self._lock:
            self._staged.append((base, outcome))
            self._lock.notify_all()

    def _publisher(self) -> None:
        """Publishes staged paths in rounds until none is left to wait for."""
        while True:
            with self._lock:
                while not self._staged and self._unpublished:
                    self._lock.wait()
                if not self._unpublished:
                    self._publishing = False
                    return
                ready, self._staged = self._staged, []
            try:
                self._publish(ready)
            except Exception:  # its paths' waiters got the error; later rounds go on
                log.exception("substituting %s failed", [b for b, _ in ready])
            finally:
                with self._lock:
                    self._unpublished -= len(ready)

    def _publish(self, staged: Sequence[tuple[str, _Stage]]) -> None:
        """One flush for every path unpacked, then each renamed into place and its
        waiters told; temp dirs go."""
        temps = [s.tmp for _, s in staged if isinstance(s, _Staged)]
        results: list[tuple[str, Path | BaseException | None]] = []
        try:
            synced = True
            if temps:
                try:
                    _syncfs(self.local_store)
                except OSError as e:
                    log.warning(
                        "substituting %s: flushing the local store failed: %s",
                        [b for b, _ in staged], e,
                    )  # fmt: skip
                    synced = False
            for base, s in staged:
                if isinstance(s, _Staged):
                    results.append((base, self._place(base, s) if synced else None))
                else:
                    results.append((base, s))
        except BaseException as e:
            results = [(b, e) for b, _ in staged]
            raise
        finally:
            for tmp in temps:
                shutil.rmtree(tmp, ignore_errors=True)  # read-only modes do not stop it
            self._settle(results)

    def _place(self, base: str, s: _Staged) -> Path | None:
        final = self.local_store / base
        try:
            os.rename(s.tmp / "p", final)
        except OSError as e:  # another process won; same hash, same contents
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not os.path.lexists(final):
                log.warning("substituting %s: placing it failed: %s", base, e)
                return None
        log.info("substituted %s from %s into %s", base, s.cache.url, self.local_store)
        return final

    def _settle(self, results: Sequence[tuple[str, Path | BaseException | None]]) -> None:
        """Hands each outcome to the path's waiters and ends its flight."""
        with self._lock:
            for base, outcome in results:
                f = self._inflight.pop(base)
                if isinstance(outcome, BaseException):
                    f.set_exception(outcome)
                else:
                    f.set_result(outcome)

    def _stage(self, basename: str) -> Path | _Staged | None:
        """The path if already in place, else its NAR unpacked from the first cache that
        has it and verified (``_Staged``), else None."""
        final = self.local_store / basename
        if os.path.lexists(final):  # a fetch before ours placed it (only complete paths are)
            return final
        for cache in self.caches:
            try:
                if cache.narinfo(f"{STORE_DIR}/{basename}") is None:
                    continue
                return _Staged(self._unpack(cache, basename), cache)
            except (StowawayError, OSError) as e:  # OSError: the local disk (ENOSPC, EIO)
                log.warning("substituting %s from %s failed: %s", basename, cache.url, e)
        return None

    def _unpack(self, cache: BinaryCache, basename: str) -> Path:
        """The NAR of ``basename`` unpacked into a new temp dir's ``p``, verified (the
        stream ended); the temp dir is removed if anything fails."""
        tmp = Path(tempfile.mkdtemp(prefix=f"{FETCH_PREFIX}{basename[:8]}-", dir=self.local_store))
        try:
            root = tmp / "p"
            broot = os.fsencode(root)
            dirs: list[bytes] = []
            for entry in cache.entries(f"{STORE_DIR}/{basename}"):
                # bytes paths: no pathlib object per file (25k files in the benchmark)
                dest = broot + b"/" + entry.path if entry.path else broot
                if entry.kind == "directory":
                    os.mkdir(dest)
                    dirs.append(dest)
                elif entry.kind == "symlink":
                    os.symlink(entry.target, dest)
                    os.utime(dest, ns=(_NS, _NS), follow_symlinks=False)
                else:
                    mode = 0o555 if entry.executable else 0o444
                    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
                    try:
                        for chunk in entry.chunks:
                            view = memoryview(chunk)
                            while view:  # os.write may write less than asked
                                view = view[os.write(fd, view) :]
                        os.utime(fd, ns=(_NS, _NS))
                    finally:
                        os.close(fd)
            for d in reversed(dirs):
                os.chmod(d, 0o555)
                os.utime(d, ns=(_NS, _NS))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp
