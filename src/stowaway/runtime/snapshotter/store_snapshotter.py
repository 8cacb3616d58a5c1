"""The stowaway snapshotter: containerd's overlayfs semantics plus Nix-store layers.

Ordinary layers behave as with containerd's overlayfs snapshotter. A Prepare carrying
``containerd.io/snapshot/stowaway.paths.<i>`` and ``containerd.io/snapshot.ref`` labels
(what CRI passes from a stowaway layer's annotations) is answered from the Nix store:
when every listed path is in ``store`` or ``local_store`` (or can be substituted into
it) and the tar rebuilt from them is the layer the ref names (``verify.py``: the claim is
proven, never trusted), the layer is committed as a *stub tree* snapshot under a name
carrying the ref label and containerd gets ALREADY_EXISTS, so it never downloads the
blob. Otherwise it becomes an ordinary active snapshot and containerd unpacks the layer:
never a broken rootfs. So does a layer marked ``stowaway.rules`` (its owners or modes
were changed at build time, so the store's files are not its files), without a proof.
An image's first store layer also names the later layers' paths
(``stowaway.prefetch.<i>``): with binary caches configured, their substitution starts
there, so the image downloads as a whole while containerd prepares layer after layer.

Order of work (crash safety): expensive file work in temp dirs (under ``snapshots/``,
and for stub trees under the link dir); GC roots before metadata; then one SQLite
transaction inserts the row and renames the temp dirs into place before COMMIT. A crash
leaves at most an orphan dir or an extra root, both removed by ``cleanup`` / start-up
reconciliation. ``cleanup`` (containerd calls it after its GC) also deletes the paths in
``local_store`` that no snapshot uses any more.

Stub trees (why, and what profiling found: docs/runtime.md, "Root filesystems"): in
``overlay`` mode the metacopy stubs live on a private tmpfs mounted on the
link dir (``<link dir>/<id>`` *is* the layer's lower dir): stubs hold no data, and a
tree is derived state — rebuilt from the store at start-up when missing (a reboot, or a
crash before it was finished). Hence a store layer is committed as soon as its paths
are located and rooted, and its tree is built by a low-priority child process
(``stub_tree_builder``) while containerd goes on with the next layer; whatever mounts a chain
(Prepare/View/Mounts) first waits for the trees in it. The tmpfs stays mounted while
any overlay uses it (restarts never disturb running containers) and is dropped by
``close`` once nothing does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stowaway.errors import StowawayError
from stowaway.image.annotations import (
    PATHS_PREFIX,
    REF_LABEL,
    RULES_LABEL,
    PathsAnnotationError,
    decode_mtime,
    decode_paths,
    decode_prefetch,
)
from stowaway.runtime.filters import compile_filters, required_labels
from stowaway.runtime.gcroots import GcRoots
from stowaway.runtime.metadata import MetaStore, Record
from stowaway.runtime.mounts import Layout, mounts
from stowaway.runtime.snapshotter.contract import (
    AlreadyExists,
    FailedPrecondition,
    Info,
    InvalidArgument,
    Kind,
    Mount,
    NotFound,
    Snapshotter,
    Usage,
)
from stowaway.runtime.snapshotter.files import disk_usage, entries, rmtree, strip_overlay_xattrs
from stowaway.runtime.snapshotter.state import (
    SnapshotterConfig,
    check_apart,
    choose_mode,
    default_gcroots,
    drop_link_dir,
    keep_mode,
    link_dir_for,
    mount_tmpfs,
)
from stowaway.runtime.snapshotter.store_paths import StorePaths
from stowaway.runtime.snapshotter.trees import StubTrees
from stowaway.runtime.snapshotter.verify import LayerProof, is_digest
from stowaway.runtime.stub_tree_builder import StubTreeBuilder
from stowaway.runtime.stub_trees import materialise

__all__ = ["StoreSnapshotter"]

log = logging.getLogger(__name__)


def _requested_paths(labels: Mapping[str, str]) -> list[str] | None:
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
            check_apart(config.store, config.local_store)
        self.link_dir = config.link_dir or link_dir_for(root)
        mount_tmpfs(self.link_dir)
        try:
            self.mode, why = choose_mode(config, self.link_dir)  # probe where stubs will live
        except StowawayError:  # e.g. bind mode on containerd 1.6: leave nothing behind
            drop_link_dir(self.link_dir)
            raise
        self.meta = MetaStore(root / "metadata.db")
        try:
            keep_mode(root / "mode", self.mode, bool(self.meta.ids()))
        except StowawayError:
            self.meta.close()
            drop_link_dir(self.link_dir)
            raise
        # substitution and start-up tree rebuilds: I/O-bound, so threads overlap well
        self._pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2), "stowaway-io")
        self._lock = threading.Lock()
        builder = StubTreeBuilder(self.link_dir) if self.mode == "overlay" else None
        self.trees = StubTrees(self.link_dir, self.meta, self._pool, self._lock, builder)
        log.info("stowaway snapshotter: rootfs mode %s (%s)", self.mode, why)
        data = [config.store, *([config.local_store] if config.local_store else [])]
        self.layout = Layout(
            self.snapshots_dir,
            self.mode,
            tuple(d.resolve() for d in data),
            index_off=os.path.exists("/sys/module/overlay/parameters/index"),
            link_dir=self.link_dir,
        )
        self._sync_links()
        self.gcroots = GcRoots(config.gcroots or default_gcroots(config))
        self.gcroots.reconcile(Path(p) for p in self.meta.store_paths())
        self.store_paths = StorePaths(config, self._pool)
        self.proof = LayerProof(self.meta)
        self._name_locks: dict[str, threading.Lock] = {}
        self._inflight: set[str] = set()
        self._placing: Counter[str] = Counter()  # basenames located, not yet in a row

    def close(self) -> None:
        self.trees.close()
        self._pool.shutdown()
        self.meta.close()
        self.store_paths.close()
        drop_link_dir(self.link_dir)

    # ------------------------------------------------------------------ store paths

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
        """Commit the stub tree snapshot for ``bases``; False when a path cannot be had."""
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
        for base, where in zip(bases, self.store_paths.locate(bases), strict=True):
            if where is None:
                log.info("layer %s: %s not available; containerd will unpack it", target, base)
                return False
            located.append((base, where))
        try:
            mtime = decode_mtime(labels)
        except PathsAnnotationError as e:
            raise InvalidArgument(f"label {e.message}") from None
        if not self.proof.holds(target, self._chain_of(parent), located, mtime):
            log.warning(
                "layer %s: its %d store paths on this node do not make that layer (parent "
                "%r); containerd will unpack it",
                target,
                len(located),
                parent,
            )
            return False
        # overlay: no directory under snapshots/ at all; the tree is built after
        # COMMIT (see the module docstring) and usage() measures it
        tmp = None if self.mode == "overlay" else self._tempdir()
        try:
            use = Usage(0, 0)
            if tmp is not None:
                materialise(self.mode, located, tmp / "fs")
                use = disk_usage(tmp)
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
                    self.trees.schedule(rec.id, located)
        finally:
            if tmp is not None:
                self._done(tmp)
        log.info("layer %s: committed %s from %d store paths", target, name, len(located))
        return True

    def _chain_of(self, parent: str) -> str | None:
        """The chain ID of the snapshot ``parent`` ("" for none; None when unknown).

        A store layer's is its ref, proven when it was committed. containerd's metadata
        layer names an unpacked layer's backend snapshot ``<ns>/<n>/<chain ID>``; a
        parent named otherwise cannot be placed in a chain, so its children unpack."""
        if not parent:
            return ""
        try:
            rec = self.meta.get(parent)
        except NotFound:
            return None
        if rec.nix:
            return rec.labels.get(REF_LABEL)
        tail = parent.rsplit("/", 1)[-1]
        return tail if is_digest(tail) else None

    # ------------------------------------------------------------------ directories

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
                rmtree(e)
        for sid in sorted(ids):
            entry = d / str(sid)
            if not self._is_tree(sid, nix):
                self._link(sid)
            elif entry.is_symlink() or not entry.is_dir():
                rmtree(entry)
                try:
                    self.trees.rebuild(sid)
                except (OSError, StowawayError) as e:  # e.g. a path gone from a SAN store
                    # start anyway (other images still work); mounts of this chain
                    # retry the tree, and are refused while it cannot be built
                    log.error("snapshot %d: its stub tree cannot be rebuilt: %s", sid, e)
                    self.trees.failed(sid, e)

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
        bases = _requested_paths(labels)
        target = labels.get(REF_LABEL, "")
        if bases is not None and target and RULES_LABEL in labels:
            log.info("layer %s: owners/modes changed by rules; containerd will unpack it", target)
        elif bases is not None and target:
            self._prefetch(target, labels, bases)
            if self._commit_store_layer(target, parent, labels, bases):
                raise AlreadyExists(f"target snapshot {target!r} committed from the Nix store")
        return self._create_mounted(key, parent, Kind.ACTIVE, labels)

    def _prefetch(self, target: str, labels: Mapping[str, str], bases: list[str]) -> None:
        """Start substituting the paths of the image's later layers (the first store
        layer names them), so they download while containerd works through the layers
        one by one; this layer's own paths go first (fetches start in order). Only a
        hint: a bad list is ignored, each layer is still proven."""
        try:
            later = decode_prefetch(labels)
        except PathsAnnotationError as e:
            log.warning("layer %s: ignoring its prefetch list: %s", target, e.message)
            return
        if later:
            self.store_paths.prefetch([*bases, *later])

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
        self.trees.wait(rec)  # containerd mounts what we return right away
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
            walked = entries(fs)
            if self.mode == "overlay" and (n := strip_overlay_xattrs(walked)):
                log.warning("snapshot %r: dropped %d overlay xattrs from its files", key, n)
            use = disk_usage(fs, walked)  # after the strip: xattr blocks count
        self.meta.commit(name, key, labels, use.size, use.inodes)

    def remove(self, key: str) -> None:
        self.trees.settle(self.meta.get(key).id)  # its builder finishes before the tree goes
        with self._lock:
            rec = self.meta.remove(key)  # refused with children: a failed tree stays known
            self.trees.forget(rec.id)
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
            return disk_usage(self.layout.fs(rec.id))
        if self._is_tree(rec.id, {rec.id} if rec.nix else set()):
            self.trees.wait(rec)
            return disk_usage(self.link_dir / str(rec.id))  # tmpfs: inodes, no blocks
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
            # the local store is ours: what no snapshot uses and no Prepare is placing
            keep = {Path(p).name for p in self.meta.store_paths()} | set(self._placing)
            unused = self.store_paths.unused(keep)
            for e in unused:  # retired under the lock: a Prepare sees it whole or not at all
                self.store_paths.retire(e)
        for e in self.snapshots_dir.iterdir():
            if e.name.startswith("rm-"):
                shutil.rmtree(e, ignore_errors=True)
        self.store_paths.drop_retired()
        if unused:
            log.info("cleanup: %d unused paths left %s", len(unused), self.config.local_store)
