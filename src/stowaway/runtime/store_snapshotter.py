"""The stowaway snapshotter: containerd's overlayfs semantics plus Nix-store layers.

Ordinary layers behave as with containerd's overlayfs snapshotter. A Prepare carrying
``containerd.io/snapshot/stowaway.paths.<i>`` and ``containerd.io/snapshot.ref`` labels
(what CRI passes from a stowaway layer's annotations) is answered from the Nix store:
when every listed path is in ``store`` or ``local_store`` (or can be substituted into
it), the layer is committed as a *skeleton* snapshot under a name carrying the ref label
and containerd gets ALREADY_EXISTS, so it never downloads the blob. Otherwise it becomes
an ordinary active snapshot and containerd unpacks the layer: never a broken rootfs.

Order of work (crash safety): expensive file work in temp dirs (under ``snapshots/``,
and for stub trees under the link dir); GC roots before metadata; then one SQLite
transaction inserts the row and renames the temp dirs into place before COMMIT. A crash
leaves at most an orphan dir or an extra root, both removed by ``cleanup`` / start-up
reconciliation. ``cleanup`` (containerd calls it after its GC) also deletes the paths in
``local_store`` that no snapshot uses any more.

Where the time goes (profiled on the benchmark's 82-layer, 25k-file image): creating
the metacopy stubs. So in ``overlay`` mode they live on a private tmpfs mounted on the
link dir (``<link dir>/<id>`` *is* the layer's lower dir): stubs hold no data, and a
tree is derived state — rebuilt from the store at start-up when missing (a reboot, or a
crash before it was finished). Hence a store layer is committed as soon as its paths
are located and rooted, and its tree is built by a low-priority child process
(``tree_builder``) while containerd goes on with the next layer; whatever mounts a chain
(Prepare/View/Mounts) first waits for the trees in it. The tmpfs stays mounted while
any overlay uses it (restarts never disturb running containers) and is dropped by
``close`` once nothing does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from stowaway.errors import StowawayError
from stowaway.fsutil import atomic_write
from stowaway.image.annotations import (
    PATHS_PREFIX,
    REF_LABEL,
    PathsAnnotationError,
    decode_paths,
)
from stowaway.runtime.filters import compile_filters, required_labels
from stowaway.runtime.gcroots import GcRoots
from stowaway.runtime.metadata import MetaStore, Record
from stowaway.runtime.modes import ModeFacts, choose, containerd_version
from stowaway.runtime.mounts import Layout, mounts
from stowaway.runtime.skeleton import Mode, materialise, probe_data_only_overlay
from stowaway.runtime.snapshotter import (
    AlreadyExists,
    FailedPrecondition,
    Info,
    InvalidArgument,
    Kind,
    Mount,
    Snapshotter,
    Usage,
)
from stowaway.runtime.substitute import FETCH_PREFIX, Substituter
from stowaway.runtime.tree_builder import TreeBuilder, make_tree
from stowaway.store.binary_cache import BinaryCache
from stowaway.store.local import LocalStore, db_path_for
from stowaway.store.narinfo import PublicKey
from stowaway.store.paths import is_basename

__all__ = ["SnapshotterConfig", "StoreSnapshotter"]

log = logging.getLogger(__name__)

DEFAULT_GCROOTS = Path("/nix/var/nix/gcroots/stowaway")
LINKS_BASE = Path("/run/stowaway")
#: Local-store entries being deleted by ``cleanup`` (renamed first, then removed).
GC_PREFIX = ".gc-"


@dataclass(frozen=True)
class SnapshotterConfig:
    """Start-up settings; ``mode`` None means auto (overlay, else bind on containerd ≥
    1.7, else hardlink, else copy: ``modes.choose``)."""

    root: Path
    store: Path = Path("/nix/store")
    local_store: Path | None = None
    substituters: tuple[str, ...] = ()
    trusted_public_keys: tuple[str, ...] = ()
    gcroots: Path | None = None
    mode: Mode | None = None
    link_dir: Path | None = None  # default: link_dir_for(root)
    containerd_version: str | None = None  # "X.Y"; None: `containerd --version` or 1.6


def link_dir_for(root: Path) -> Path:
    """A short directory for the lowerdir links, unique per state dir (on tmpfs: the
    links are rebuilt at start-up)."""
    return LINKS_BASE / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]


def choose_mode(config: SnapshotterConfig, probe_dir: Path) -> tuple[Mode, str]:
    """The rootfs strategy and why (for the start-up log); see ``modes.choose``."""
    requested = config.mode or "auto"
    version, whence = containerd_version(config.containerd_version)
    log.info("containerd version %d.%d (from %s)", *version, whence)
    failure = probe_data_only_overlay(probe_dir) if requested == "auto" else "not probed"
    stores = [config.store, *([config.local_store] if config.local_store else [])]
    same = all(os.stat(s).st_dev == os.stat(config.root).st_dev for s in stores)
    return choose(requested, ModeFacts(failure, version, same))


def _mount_tmpfs(d: Path) -> None:
    """A private tmpfs on ``d`` for the stub trees, unless one is already there (a
    restart keeps it: running containers' overlays use it)."""
    d.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(d):
        return
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "mode=0700,nosuid,nodev", "stowaway", str(d)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        log.warning("no tmpfs on %s (%s): stub trees go to its filesystem", d, r.stderr.strip())


def _drop_link_dir(d: Path) -> None:
    """Unmount and remove the stub tmpfs unless running containers still read it (its
    trees are rebuilt at start-up)."""
    if not _in_use(d):
        if os.path.ismount(d):
            subprocess.run(["umount", str(d)], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def _in_use(d: Path) -> bool:
    """Whether some mount (an overlay's lowerdir) refers to a path below ``d``."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return f"{d}/" in f.read()


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _check_apart(store: Path, local_store: Path) -> None:
    """The local store is collected by ``cleanup``: it must not be, contain or lie
    inside the store, or paths the snapshotter never placed there would be deleted."""
    a, b = store.resolve(), local_store.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise StowawayError(
            f"--local-store {local_store} overlaps --store {store}",
            hint="give --local-store a directory of its own (e.g. /var/lib/stowaway/store): "
            "the snapshotter deletes the paths there that no snapshot uses",
        )


def _keep_mode(record: Path, mode: Mode, has_snapshots: bool) -> None:
    """Refuse to serve existing snapshots in another mode than they were made in (a
    new kernel, a moved state dir): store layers live elsewhere per mode (a stub tree on
    the tmpfs, or files under ``snapshots/<id>/fs``), and only overlay mode strips
    overlay xattrs from unpacked layers, which it mounts with ``metacopy=on``."""
    try:
        before = record.read_text().strip()
    except FileNotFoundError:
        before = ""
    if before and before != mode and has_snapshots:
        raise StowawayError(
            f"the snapshots in {record.parent} were made in {before} mode; this start "
            f"would use {mode} mode",
            hint=f"pass --mode {before} if it still works here, or remove the images "
            "(or the state directory) first",
        )
    if before != mode:
        atomic_write(record, (mode + "\n").encode())


def _drop_leftovers(local_store: Path, prefixes: tuple[str, ...]) -> None:
    """Remove the local-store entries whose names start with one of ``prefixes``."""
    for e in local_store.iterdir():
        if e.name.startswith(prefixes):
            _rmtree(e)


def _entries(root: Path) -> list[tuple[str, bool]]:
    """Every path below ``root`` (itself included) and whether it is a directory, from
    one walk (Commit both strips and measures an unpacked layer: one walk, not two)."""
    out: list[tuple[str, bool]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        out.append((dirpath, True))
        out += [(os.path.join(dirpath, n), True) for n in dirnames]
        out += [(os.path.join(dirpath, n), False) for n in filenames]
    return out


def _disk_usage(path: Path, entries: list[tuple[str, bool]] | None = None) -> Usage:
    """Bytes allocated and inodes below ``path``, each inode counted once."""
    seen: set[int] = set()
    size = 0
    for entry, _ in _entries(path) if entries is None else entries:
        st = os.lstat(entry)
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            size += st.st_blocks * 512
    return Usage(size, len(seen))


def _strip_overlay_xattrs(entries: list[tuple[str, bool]]) -> int:
    """Remove ``trusted.overlay.*`` xattrs from ``entries`` (all but a directory's
    ``opaque``, which containerd itself sets for opaque whiteouts); returns how many.

    Why: containerd's tar applier writes a layer's ``SCHILY.xattr.*`` records as they
    are, straight into the snapshot dir, and in overlay mode a chain holding a store
    layer is mounted with ``metacopy=on`` over the store as a data-only layer. A
    ``metacopy`` + ``redirect`` pair from any image would then read *any* host store
    path, not just the image's closure. Only our own stub trees may carry them.
    """
    removed = 0
    for path, is_dir in entries:
        for attr in os.listxattr(path, follow_symlinks=False):
            if attr.startswith("trusted.overlay.") and not (
                is_dir and attr == "trusted.overlay.opaque"
            ):
                os.removexattr(path, attr, follow_symlinks=False)
                removed += 1
    return removed


class StoreSnapshotter(Snapshotter):
    """See the module docstring. Thread-safe: gRPC calls arrive on a thread pool."""

    def __init__(self, config: SnapshotterConfig) -> None:
        self.config = config
        root = config.root
        self.snapshots_dir = root / "snapshots"
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        if not config.store.is_dir():
            raise StowawayError(f"store directory {config.store} does not exist")
        if config.local_store:
            config.local_store.mkdir(parents=True, exist_ok=True)
            _check_apart(config.store, config.local_store)
        self.link_dir = config.link_dir or link_dir_for(root)
        _mount_tmpfs(self.link_dir)
        try:
            self.mode, why = choose_mode(config, self.link_dir)  # probe where stubs will live
        except StowawayError:  # e.g. bind mode on containerd 1.6: leave nothing behind
            _drop_link_dir(self.link_dir)
            raise
        self.meta = MetaStore(root / "metadata.db")
        try:
            _keep_mode(root / "mode", self.mode, bool(self.meta.ids()))
        except StowawayError:
            self.meta.close()
            _drop_link_dir(self.link_dir)
            raise
        # substitution and start-up tree rebuilds: I/O-bound, so threads overlap well
        self._pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2), "stowaway-io")
        self._builder = TreeBuilder(self.link_dir) if self.mode == "overlay" else None
        self._pending: dict[int, Future[None]] = {}
        self._helping: set[int] = set()  # trees this process builds for a waiting mount
        log.info("stowaway snapshotter: rootfs mode %s (%s)", self.mode, why)
        data = [config.store, *([config.local_store] if config.local_store else [])]
        self.layout = Layout(
            self.snapshots_dir,
            self.mode,
            tuple(d.resolve() for d in data),
            index_off=os.path.exists("/sys/module/overlay/parameters/index"),
            link_dir=self.link_dir,
        )
        self._lock = threading.Lock()
        self._sync_links()
        self.gcroots = GcRoots(config.gcroots or self._default_gcroots())
        self.gcroots.reconcile(Path(p) for p in self.meta.store_paths())
        self.substituter = self._substituter()
        self._db = self._open_nix_db()
        self._name_locks: dict[str, threading.Lock] = {}
        self._inflight: set[str] = set()
        self._placing: Counter[str] = Counter()  # basenames located, not yet in a row
        if config.local_store:  # what a crash left: no fetch of ours runs yet
            _drop_leftovers(config.local_store, (GC_PREFIX, FETCH_PREFIX))

    # ------------------------------------------------------------------ setup

    def _default_gcroots(self) -> Path:
        if self.config.store.resolve() == Path("/nix/store"):
            return DEFAULT_GCROOTS
        return self.config.root / "gcroots"

    def _substituter(self) -> Substituter | None:
        if not self.config.substituters:
            return None
        if self.config.local_store is None:
            raise StowawayError(
                "--substituter needs --local-store DIR: a writable directory for fetched paths"
            )
        keys = [PublicKey.parse(k) for k in self.config.trusted_public_keys]
        caches = [BinaryCache(u, keys) for u in self.config.substituters]
        return Substituter(caches, self.config.local_store)

    def _open_nix_db(self) -> LocalStore | None:
        """The store's Nix database, if it has one: presence there means a path is valid
        (complete), not merely being built."""
        if db_path_for(self.config.store).is_file():
            return LocalStore(self.config.store)
        return None

    def close(self) -> None:
        if self._builder is not None:
            self._builder.close()  # unbuilt trees: rebuilt at start-up
        self._pool.shutdown()
        self.meta.close()
        if self._db is not None:
            self._db.close()
        _drop_link_dir(self.link_dir)

    # ------------------------------------------------------------------ store paths

    def _requested_paths(self, labels: Mapping[str, str]) -> list[str] | None:
        """Basenames named by stowaway labels (validated), or None when there are none."""
        try:
            bases = decode_paths(labels)
        except PathsAnnotationError as e:
            raise InvalidArgument(f"label {e.message}") from None
        if bases is None:
            return None
        if not bases:
            keys = sorted(k for k in labels if k.startswith(PATHS_PREFIX))
            raise InvalidArgument(f"labels {keys} name no store paths")
        return list(dict.fromkeys(bases))  # a path named twice is one path of the layer

    def _present(self, bases: Sequence[str]) -> list[Path | None]:
        """Each path in the store (valid in its database, if it has one), else in the
        local store, else None.

        A path on disk in the store but not valid (still being built) is None even when
        the local store has it: overlay looks data up in the store first (``::store::
        local``), so a layer from the local copy would read the half-built one."""
        valid: set[str] | None = None
        if self._db is not None:
            logical = {b: f"{self._db.logical_store_dir}/{b}" for b in bases}
            ok = self._db.valid_paths(list(logical.values()))
            valid = {b for b, path in logical.items() if path in ok}
        out: list[Path | None] = []
        for b in bases:
            p = self.config.store / b
            if os.path.lexists(p):
                out.append(p if valid is None or b in valid else None)
            elif self.config.local_store and os.path.lexists(q := self.config.local_store / b):
                out.append(q)
            else:
                out.append(None)
        return out

    def _locate(self, bases: Sequence[str]) -> list[Path | None]:
        """Each path in the store or local store, else substituted (in parallel); a
        path still being built in the store is not substituted (see ``_present``)."""
        found = self._present(bases)
        missing = [
            b
            for b, w in zip(bases, found, strict=True)
            if w is None and not os.path.lexists(self.config.store / b)
        ]
        if missing and self.substituter is not None:
            got = dict(zip(missing, self.substituter.fetch_all(missing, self._pool), strict=True))
            found = [w or got.get(b) for b, w in zip(bases, found, strict=True)]
        return found

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    @staticmethod
    def nix_name(target: str, parent: str) -> str:
        """The committed name of a store layer: unique per (ref, parent), because the
        same chain id may be pulled in several namespaces with different parent keys."""
        if not parent:
            return f"stowaway/{target}"
        return f"stowaway/{target}@{hashlib.sha256(parent.encode()).hexdigest()[:16]}"

    def _commit_store_layer(
        self, target: str, parent: str, labels: Mapping[str, str], bases: list[str]
    ) -> bool:
        """Commit the skeleton snapshot for ``bases``; False when a path cannot be had."""
        name = self.nix_name(target, parent)
        with self._name_lock(name):
            if self.meta.kind_of(name) == Kind.COMMITTED:
                return True
            with self._lock:
                self._placing.update(bases)  # cleanup() leaves them in the local store
            try:
                return self._locate_and_commit(name, target, parent, labels, bases)
            finally:
                with self._lock:
                    self._placing -= Counter(bases)

    def _locate_and_commit(
        self, name: str, target: str, parent: str, labels: Mapping[str, str], bases: list[str]
    ) -> bool:
        """Locate ``bases`` and commit ``name`` from them (the caller holds its name lock)."""
        located: list[tuple[str, Path]] = []
        for base, where in zip(bases, self._locate(bases), strict=True):
            if where is None:
                log.info("layer %s: %s not available; containerd will unpack it", target, base)
                return False
            located.append((base, where))
        # overlay: no directory under snapshots/ at all; the tree is built after
        # COMMIT (see the module docstring) and usage() measures it
        tmp = None if self.mode == "overlay" else self._tempdir()
        try:
            use = Usage(0, 0)
            if tmp is not None:
                materialise(self.mode, located, tmp / "fs")
                use = _disk_usage(tmp)
            with self._lock, self.meta.transaction() as db:
                # roots under the lock remove() holds while it computes which roots
                # are still needed: it must see this row or not yet see these roots
                for _, where in located:
                    self.gcroots.add(where)
                rec = self.meta.create(
                    db,
                    name,
                    parent,
                    Kind.COMMITTED,
                    labels,
                    nix=True,
                    paths=[str(w) for _, w in located],
                    size=use.size,
                    inodes=use.inodes,
                )
                if tmp is not None:
                    self._place(tmp, rec.id)
                else:  # registered before anyone can see the row
                    assert self._builder is not None
                    _rmtree(self.link_dir / str(rec.id))  # orphan of a failed COMMIT
                    self._pending[rec.id] = self._builder.submit(
                        rec.id, located, self._donors(located)
                    )
        finally:
            if tmp is not None:
                self._done(tmp)
        log.info("layer %s: committed %s from %d store paths", target, name, len(located))
        return True

    # ------------------------------------------------------------------ directories

    def _rebuild_tree(self, sid: int) -> None:
        paths = [Path(p) for p in self.meta.paths_of(sid)]
        located = [(p.name, p) for p in paths]
        make_tree(self.link_dir, sid, located, self._donors(located), self._pool)
        log.debug("snapshot %d: stub tree of %d store paths built here", sid, len(paths))

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
                    self._rebuild_tree(sid)
        finally:
            with self._lock:
                self._helping.difference_update(mine)

    def _shares_with(self, sid: int, others: Sequence[int]) -> bool:
        users = self.meta.users_of(self.meta.paths_of(sid)).values()
        return bool(set(others).intersection(u for us in users for u in us))

    def _wait_trees(self, rec: Record) -> None:
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
                    self._rebuild_tree(sid)
                except (OSError, StowawayError) as e2:
                    raise FailedPrecondition(
                        f"snapshot {rec.key!r}: the stub tree of layer {sid} cannot be built "
                        f"in {self.link_dir}: {e2}"
                    ) from e2
            with self._lock:
                if self._pending.get(sid) is fut:
                    del self._pending[sid]

    def _donors(self, located: Sequence[tuple[str, Path]]) -> dict[str, list[Path]]:
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

    def _is_tree(self, sid: int, nix: set[int]) -> bool:
        """Whether snapshot ``sid`` keeps its files in a stub tree on the link dir (an
        overlay-mode store layer), not in ``snapshots/<id>/fs``."""
        return sid in nix and self.mode == "overlay" and not (self.layout.fs(sid) / "nix").exists()

    def _link(self, sid: int) -> None:
        """(Re)point ``<link_dir>/<id>`` at the snapshot's fs dir, atomically."""
        d = self.link_dir
        tmp = d / f".{sid}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(self.layout.fs(sid), tmp)
        os.replace(tmp, d / str(sid))

    def _sync_links(self) -> None:
        """Exactly one link or stub tree per snapshot: a reboot empties the tmpfs (trees
        are rebuilt from the store), a crash may leave extras or temp dirs."""
        d = self.link_dir
        ids, nix = self.meta.ids(), self.meta.nix_ids()
        for e in d.iterdir():
            if not (e.name.isdigit() and int(e.name) in ids):
                _rmtree(e)
        for sid in sorted(ids):
            entry = d / str(sid)
            if not self._is_tree(sid, nix):
                self._link(sid)
            elif entry.is_symlink() or not entry.is_dir():
                _rmtree(entry)
                try:
                    self._rebuild_tree(sid)
                except (OSError, StowawayError) as e:  # e.g. a path gone from a SAN store
                    # start anyway (other images still work); mounts of this chain
                    # retry the tree, and are refused while it cannot be built
                    log.error("snapshot %d: its stub tree cannot be rebuilt: %s", sid, e)
                    failed: Future[None] = Future()
                    failed.set_exception(e)
                    self._pending[sid] = failed

    def _tempdir(self) -> Path:
        with self._lock:  # registered before Cleanup can see it
            tmp = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
            self._inflight.add(tmp.name)
        return tmp

    def _done(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        with self._lock:
            self._inflight.discard(tmp.name)

    def _place(self, tmp: Path, sid: int) -> None:
        """Rename a finished temp dir to ``snapshots/<id>`` and link ``<link dir>/<id>``
        to its fs dir (inside the transaction)."""
        dest = self.snapshots_dir / str(sid)
        if os.path.lexists(dest):  # orphan of a transaction that rolled back
            shutil.rmtree(dest)
        os.rename(tmp, dest)
        self._link(sid)

    def _create(self, key: str, parent: str, kind: Kind, labels: Mapping[str, str]) -> Record:
        tmp = self._tempdir()
        try:
            (tmp / "fs").mkdir(0o755)
            if kind == Kind.ACTIVE:
                (tmp / "work").mkdir(0o711)
            with self._lock, self.meta.transaction() as db:
                rec = self.meta.create(db, key, parent, kind, labels)
                self._place(tmp, rec.id)
        finally:
            self._done(tmp)
        return rec

    # ------------------------------------------------------------------ Snapshotter

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        bases = self._requested_paths(labels)
        target = labels.get(REF_LABEL, "")
        if bases is not None and target:
            if self._commit_store_layer(target, parent, labels, bases):
                raise AlreadyExists(f"target snapshot {target!r} committed from the Nix store")
        return self._create_mounted(key, parent, Kind.ACTIVE, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create_mounted(key, parent, Kind.VIEW, labels)

    def _create_mounted(
        self, key: str, parent: str, kind: Kind, labels: Mapping[str, str]
    ) -> list[Mount]:
        """A new snapshot's mounts; when its chain cannot be mounted (a stub tree that
        cannot be built) the snapshot goes again: to containerd a failed call made none."""
        rec = self._create(key, parent, kind, labels)
        try:
            return self._mounts(rec)
        except FailedPrecondition:
            self.remove(key)
            raise

    def _mounts(self, rec: Record) -> list[Mount]:
        self._wait_trees(rec)  # containerd mounts what we return right away
        if self.mode != "bind":
            return mounts(rec, self.layout)
        ids, nix = (rec.id, *rec.chain), (rec.nix, *rec.chain_nix)
        layers = [sid for sid, n in zip(ids, nix, strict=True) if n]
        paths = [Path(p) for sid in layers for p in self.meta.paths_of(sid)]
        return mounts(rec, self.layout, [p for p in paths if not p.is_symlink()])

    def mounts(self, key: str) -> list[Mount]:
        rec = self.meta.get(key)
        if rec.kind == Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key!r} is committed: it has no mounts")
        return self._mounts(rec)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        rec = self.meta.get(key)
        use = Usage(0, 0)
        if rec.kind == Kind.ACTIVE:
            fs = self.layout.fs(rec.id)
            entries = _entries(fs)
            if self.mode == "overlay" and (n := _strip_overlay_xattrs(entries)):
                log.warning("snapshot %r: dropped %d overlay xattrs from its files", key, n)
            use = _disk_usage(fs, entries)  # after the strip: xattr blocks count
        self.meta.commit(name, key, labels, use.size, use.inodes)

    def remove(self, key: str) -> None:
        with self._lock:
            fut = self._pending.get(self.meta.get(key).id)
        if fut is not None:  # let its builder finish before the tree goes
            with contextlib.suppress(Exception):
                fut.result()
        with self._lock:
            rec = self.meta.remove(key)  # refused with children: a failed tree stays known
            self._pending.pop(rec.id, None)
            gone = self.snapshots_dir / f"rm-{rec.id}"
            entry, gone_tree = self.link_dir / str(rec.id), self.link_dir / f".rm-{rec.id}"
            if entry.is_dir() and not entry.is_symlink():
                os.rename(entry, gone_tree)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            if os.path.lexists(self.snapshots_dir / str(rec.id)):
                os.rename(self.snapshots_dir / str(rec.id), gone)
            still = {Path(p).name for p in self.meta.store_paths()}
            for base in self.gcroots.rooted() - still:
                self.gcroots.remove(base)
        shutil.rmtree(gone, ignore_errors=True)
        shutil.rmtree(gone_tree, ignore_errors=True)

    def stat(self, key: str) -> Info:
        return self.meta.info(key)

    def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        rec = self.meta.get(info.name)
        labels = dict(rec.labels)
        if not fieldpaths:
            labels = dict(info.labels)
        for fp in fieldpaths:
            if fp == "labels":
                labels = dict(info.labels)
            elif fp.startswith("labels."):
                k = fp[len("labels.") :]
                if k in info.labels:
                    labels[k] = info.labels[k]
                else:
                    labels.pop(k, None)
            else:
                raise InvalidArgument(f"cannot update field {fp!r} of snapshot {info.name!r}")
        return self.meta.set_labels(info.name, labels).info()

    def walk(self, filters: Sequence[str]) -> Iterator[Info]:
        match = compile_filters(filters)
        yield from filter(match, self.meta.infos(required_labels(filters)))

    def usage(self, key: str) -> Usage:
        rec = self.meta.get(key)
        if rec.kind == Kind.ACTIVE:
            return _disk_usage(self.layout.fs(rec.id))
        if self._is_tree(rec.id, {rec.id} if rec.nix else set()):
            self._wait_trees(rec)
            return _disk_usage(self.link_dir / str(rec.id))  # tmpfs: inodes, no blocks
        return Usage(rec.size, rec.inodes)

    def cleanup(self) -> None:
        """containerd calls this after its garbage collection: orphan snapshot dirs go,
        and so do paths in the local store that no snapshot uses any more."""
        with self._lock:
            ids = {str(i) for i in self.meta.ids()}
            for e in self.snapshots_dir.iterdir():
                if e.name in ids or e.name in self._inflight or e.name.startswith("rm-"):
                    continue
                os.rename(e, self.snapshots_dir / f"rm-{e.name}")
            unused = self._unused_local_paths()
            for e in unused:  # renamed under the lock: a Prepare sees it whole or not at all
                os.rename(e, e.with_name(f"{GC_PREFIX}{secrets.token_hex(4)}-{e.name}"))
        for e in self.snapshots_dir.iterdir():
            if e.name.startswith("rm-"):
                shutil.rmtree(e, ignore_errors=True)
        if self.config.local_store:
            _drop_leftovers(self.config.local_store, (GC_PREFIX,))
            if unused:
                log.info("cleanup: %d unused paths left %s", len(unused), self.config.local_store)

    def _unused_local_paths(self) -> list[Path]:
        """Store paths in the local store that no snapshot uses and no Prepare is placing
        (call under the lock). The local store is the snapshotter's own: whatever is in
        it was substituted for a snapshot, and the next pull that needs it substitutes
        it again."""
        if self.config.local_store is None:
            return []
        keep = {Path(p).name for p in self.meta.store_paths()} | set(self._placing)
        return [
            e
            for e in self.config.local_store.iterdir()
            if e.name not in keep and is_basename(e.name)
        ]
