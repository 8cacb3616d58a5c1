"""StoreSnapshotter driven directly: containerd's overlayfs semantics, store layers from
the real demo closure (mounted for real), label validation, restart, GC roots, filters."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from pathlib import Path

import pytest
from runtime_helpers import layer_labels, mount_like_containerd, ref_of, unpacked_name

from stowaway.errors import StowawayError
from stowaway.image.annotations import (
    MTIME_LABEL,
    PATHS_PREFIX,
    PREFETCH_PREFIX,
    REF_LABEL,
    encode_prefetch,
)
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings, build_layers
from stowaway.layering.model import PlannedLayer
from stowaway.runtime.filters import compile_filters, required_labels
from stowaway.runtime.snapshotter.contract import (
    AlreadyExists,
    FailedPrecondition,
    Info,
    InvalidArgument,
    Kind,
    Mount,
    NotFound,
)
from stowaway.runtime.snapshotter.state import SnapshotterConfig, link_dir_for
from stowaway.runtime.snapshotter.store_snapshotter import StoreSnapshotter
from stowaway.store.local import LocalStore
from stowaway.store.model import NarEntry

MISSING = "0" * 32 + "-not-here"


@pytest.fixture()
def snap(tmp_path: Path) -> Iterator[StoreSnapshotter]:
    s = StoreSnapshotter(SnapshotterConfig(root=tmp_path / "root", gcroots=tmp_path / "gc"))
    yield s
    s.close()


def mounted(ms: list[Mount], where: Path) -> Path:
    assert len(ms) == 1
    where.mkdir(exist_ok=True)
    mount_like_containerd(ms[0].type, ms[0].source, ms[0].options, where)
    return where


def umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=True)


def assert_container_reads(
    s: StoreSnapshotter, layer: list[str], greeting: str, where: Path
) -> None:
    """A container on the store layer of ``layer`` (holding ``greeting``) reads its
    message."""
    root = mounted(s.prepare("ctr", s.nix_name(ref_of(layer), ""), {}), where)
    try:
        msg = root / greeting.lstrip("/") / "share/greeting/message"
        assert msg.read_bytes() == Path(greeting, "share/greeting/message").read_bytes()
    finally:
        umount(root)


def tree_hash(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        for dirpath, dirnames, filenames in sorted(os.walk(p)):
            dirnames.sort()
            for n in sorted(filenames):
                f = Path(dirpath, n)
                h.update(str(f).encode())
                if not f.is_symlink():
                    h.update(f.read_bytes())
    return h.hexdigest()


def test_ordinary_layers_like_overlayfs(snap: StoreSnapshotter) -> None:
    (m,) = snap.prepare("a", "", {})
    assert m.type == "bind" and m.options == ("rw", "rbind")
    Path(m.source, "file").write_text("one")
    snap.commit("A", "a", {"l": "v"})
    assert snap.stat("A").kind == Kind.COMMITTED and snap.stat("A").labels == {"l": "v"}
    with pytest.raises(NotFound):
        snap.stat("a")
    assert snap.usage("A").inodes == 2

    (v,) = snap.view("v", "A", {})
    assert v.type == "bind" and v.options == ("ro", "rbind") and Path(v.source, "file").exists()
    (o,) = snap.prepare("b", "A", {})
    opts = dict(x.split("=", 1) for x in o.options if "=" in x)
    assert o.type == "overlay" and {"upperdir", "workdir", "lowerdir"} <= opts.keys()
    assert os.path.realpath(opts["lowerdir"]) == v.source  # via a short link
    assert snap.mounts("b") == [o]

    with pytest.raises(FailedPrecondition):
        snap.remove("A")  # has children
    with pytest.raises(FailedPrecondition):
        snap.prepare("c", "b", {})  # parent not committed
    with pytest.raises(AlreadyExists):
        snap.prepare("b", "A", {})
    with pytest.raises(FailedPrecondition):
        snap.mounts("A")
    info = snap.update(Info("A", "", Kind.COMMITTED, 0, 0, {"x": "y"}), ["labels.x"])
    assert info.labels == {"l": "v", "x": "y"}
    assert sorted(i.name for i in snap.walk([])) == ["A", "b", "v"]
    assert [i.name for i in snap.walk(["kind==view", "name==nothing"])] == ["v"]
    for k in ("b", "v", "A"):
        snap.remove(k)
    assert list(snap.walk([])) == []
    assert os.listdir(snap.snapshots_dir) == []


def test_store_layer_committed_and_mounted(
    snap: StoreSnapshotter, demo_closure: list[str], demo_app: str, tmp_path: Path
) -> None:
    with pytest.raises(AlreadyExists):
        snap.prepare("extract-1", "", layer_labels(demo_closure))
    ref = ref_of(demo_closure)
    name = snap.nix_name(ref, "")
    info = snap.stat(name)
    assert info.kind == Kind.COMMITTED and info.labels[REF_LABEL] == ref
    # what containerd's metadata layer looks for after ALREADY_EXISTS
    flt = f'labels."{REF_LABEL}"=={ref},parent==""'
    assert [i.name for i in snap.walk([flt])] == [name]
    with pytest.raises(AlreadyExists):  # second pull: nothing rebuilt
        snap.prepare("extract-2", "", layer_labels(demo_closure))

    before = tree_hash(demo_closure)
    ms = snap.prepare("ctr", name, {})
    assert "metacopy=on" in ms[0].options[-2:]
    root = mounted(ms, tmp_path / "mnt")
    try:
        assert sorted(os.listdir(root / "nix/store")) == sorted(
            os.path.basename(p) for p in demo_closure
        )
        for p in demo_closure:
            for dirpath, _, files in os.walk(p):
                for f in files:
                    host = Path(dirpath, f)
                    assert (root / host.relative_to("/")).read_bytes() == host.read_bytes()
        out = subprocess.run(
            ["chroot", str(root), f"{demo_app}/bin/demo"], capture_output=True, text=True
        )
        assert "hello from stowaway" in out.stdout
        busybox = next(p for p in demo_closure if p.endswith("-busybox"))
        with open(root / busybox.lstrip("/") / "bin/busybox", "ab") as out_file:
            out_file.write(b"container write")
    finally:
        umount(root)
    assert tree_hash(demo_closure) == before
    assert snap.usage("ctr").size > 0  # the copied-up file is in the container's upper
    snap.remove("ctr")
    snap.remove(name)
    assert snap.gcroots.rooted() == set()


@pytest.mark.parametrize(
    "value",
    ["../../etc", "/nix/store/" + "a" * 32 + "-x", "a" * 32 + "-x/../../y", "short-name", ".."],
)
def test_store_labels_validated(snap: StoreSnapshotter, value: str) -> None:
    with pytest.raises(InvalidArgument, match=r"stowaway\.paths\.0"):
        snap.prepare("k", "", {REF_LABEL: "sha256:" + "0" * 64, f"{PATHS_PREFIX}0": value})
    assert list(snap.walk([])) == []


def test_missing_paths_fall_back_to_unpack(snap: StoreSnapshotter, demo_app: str) -> None:
    labels = layer_labels([demo_app, MISSING], ref="sha256:" + "0" * 64)
    (m,) = snap.prepare("extract", "", labels)
    assert m.type == "bind" and snap.stat("extract").kind == Kind.ACTIVE
    assert snap.gcroots.rooted() == set()


def test_path_named_twice_in_labels_is_one_path(
    snap: StoreSnapshotter, demo_closure: list[str], tmp_path: Path
) -> None:
    labels = layer_labels(demo_closure)
    labels[f"{PATHS_PREFIX}1"] = os.path.basename(demo_closure[0])  # again, in another key
    with pytest.raises(AlreadyExists):
        snap.prepare("x", "", labels)
    name = snap.nix_name(ref_of(demo_closure), "")
    rec = snap.meta.get(name)  # NotFound if the layer was not committed
    assert sorted(snap.meta.paths_of(rec.id)) == sorted(demo_closure)
    root = mounted(snap.view("v", name, {}), tmp_path / "m")
    try:
        assert sorted(os.listdir(root / "nix/store")) == sorted(
            os.path.basename(p) for p in demo_closure
        )
    finally:
        umount(root)


def test_overlay_xattrs_from_layers_are_dropped_at_commit(
    snap: StoreSnapshotter, demo_closure: list[str], tmp_path: Path
) -> None:
    """A layer's files carrying metacopy + redirect (as an applier writes them from PAX
    SCHILY.xattr records) must not read a host store path outside the closure."""
    assert snap.mode == "overlay"
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    secret = Path(greeting, "share/greeting/message")
    parent = unpacked_name(1)
    (m,) = snap.prepare("a", "", {})
    leak = Path(m.source, "leak")
    leak.write_bytes(bytes(secret.stat().st_size))
    os.setxattr(leak, "trusted.overlay.metacopy", b"")
    redirect = f"/{os.path.basename(greeting)}/share/greeting/message"
    os.setxattr(leak, "trusted.overlay.redirect", redirect.encode())
    Path(m.source, "d").mkdir()
    os.setxattr(Path(m.source, "d"), "trusted.overlay.opaque", b"y")  # containerd's own
    snap.commit(parent, "a", {})
    assert os.listxattr(leak) == [] and os.listxattr(Path(m.source, "d")) == [
        "trusted.overlay.opaque"
    ]
    with pytest.raises(AlreadyExists):
        snap.prepare("s", parent, layer_labels([busybox], parent.rsplit("/", 1)[-1]))
    name = snap.nix_name(ref_of([busybox], parent.rsplit("/", 1)[-1]), parent)
    root = mounted(snap.view("v", name, {}), tmp_path / "m")
    try:
        assert sorted(os.listdir(root / "nix/store")) == [os.path.basename(busybox)]
        assert (root / "leak").read_bytes() == bytes(secret.stat().st_size)
    finally:
        umount(root)


def test_concurrent_prepare_same_layer(snap: StoreSnapshotter, demo_closure: list[str]) -> None:
    results: list[str] = []

    def pull(i: int) -> None:
        try:
            snap.prepare(f"extract-{i}", "", layer_labels(demo_closure))
        except AlreadyExists:
            results.append("exists")

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["exists"] * 4
    assert [i.kind for i in snap.walk([])] == [Kind.COMMITTED]


def test_restart_keeps_snapshots_and_cleans_orphans(
    tmp_path: Path, demo_closure: list[str]
) -> None:
    cfg = SnapshotterConfig(root=tmp_path / "root", gcroots=tmp_path / "gc")
    s = StoreSnapshotter(cfg)
    with pytest.raises(AlreadyExists):
        s.prepare("x", "", layer_labels(demo_closure))
    name = s.nix_name(ref_of(demo_closure), "")
    before = s.prepare("ctr", name, {})
    s.close()
    (cfg.root / "snapshots" / "999").mkdir()  # what a crash mid-Prepare may leave
    (cfg.gcroots or tmp_path).joinpath("stray").symlink_to("/nix/store")
    s2 = StoreSnapshotter(cfg)
    try:
        assert s2.mounts("ctr") == before
        assert {p.name for p in (tmp_path / "gc").iterdir()} == {
            os.path.basename(p) for p in demo_closure
        }
        s2.cleanup()
        assert not (cfg.root / "snapshots" / "999").exists()
        assert s2.stat(name).kind == Kind.COMMITTED
    finally:
        s2.close()


def test_remove_during_commit_keeps_shared_roots(
    snap: StoreSnapshotter, demo_closure: list[str]
) -> None:
    """A Remove of the last snapshot using a path, racing with the commit of another
    layer using it, must not drop the root the new layer needs."""
    two = [p for p in demo_closure if not p.endswith("-stowaway-demo-app")]  # shared paths
    with pytest.raises(AlreadyExists):
        snap.prepare("x1", "", layer_labels(demo_closure))
    add = snap.gcroots.add
    racers: list[threading.Thread] = []

    def add_then_race(target: Path) -> None:
        add(target)
        if not racers:  # the commit of "two" has rooted a path: remove "one" right now
            racers.append(
                threading.Thread(
                    target=snap.remove, args=(snap.nix_name(ref_of(demo_closure), ""),)
                )
            )
            racers[0].start()
            racers[0].join(timeout=0.5)  # the fix makes it wait for the commit instead

    snap.gcroots.add = add_then_race  # type: ignore[method-assign]
    with pytest.raises(AlreadyExists):
        snap.prepare("x2", "", layer_labels(two))
    racers[0].join()
    assert [i.name for i in snap.walk([])] == [snap.nix_name(ref_of(two), "")]
    assert snap.gcroots.rooted() == {os.path.basename(p) for p in two}


def test_gc_roots_protect_paths_from_nix_gc(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text(f"throwaway {tmp_path}\n")
    path = subprocess.run(
        ["nix-store", "--add", str(victim)], check=True, capture_output=True, text=True
    ).stdout.strip()
    # a root directory nix scans: below /nix/var/nix/gcroots, owned by this test
    gc = Path("/nix/var/nix/gcroots/stowaway-test") / tmp_path.name
    s = StoreSnapshotter(SnapshotterConfig(root=tmp_path / "root", gcroots=gc))
    try:
        with pytest.raises(AlreadyExists):
            s.prepare("x", "", layer_labels([path]))
        r = subprocess.run(["nix-store", "--delete", path], capture_output=True, text=True)
        assert r.returncode != 0 and os.path.exists(path), r.stderr
        s.remove(s.nix_name(ref_of([path]), ""))
        subprocess.run(["nix-store", "--delete", path], check=True, capture_output=True)
        assert not os.path.exists(path)
    finally:
        s.close()
        subprocess.run(["rm", "-rf", str(gc)], check=True)
        with contextlib.suppress(OSError):  # another run's roots may still be there
            gc.parent.rmdir()


def test_filters() -> None:
    info = Info("k", "p", Kind.ACTIVE, 0, 0, {"a.b/c": "x,y", "n": "1"})
    match = [
        'labels."a.b/c"=="x,y"',
        "labels.n==1,parent==p",
        "kind==active",
        "name~=^k$",
        "labels.n",
        'name!="z"',
    ]
    for f in match:
        assert compile_filters([f])(info), f
    for f in ["labels.n==2", "parent==q,kind==active", "labels.missing", "kind==view"]:
        assert not compile_filters([f])(info), f
    with pytest.raises(InvalidArgument, match="offset"):
        compile_filters(["bogus!"])
    # what a store may pre-select on: only the equalities of a single filter
    assert required_labels(['labels."a.b/c"=="x,y",parent==p,labels.n!=2']) == {"a.b/c": "x,y"}
    assert required_labels(["labels.n==1", "labels.n==2"]) == {}
    assert required_labels(["kind==active"]) == {}


def test_list_by_ref_label_is_exact(snap: StoreSnapshotter) -> None:
    """containerd finds a remote snapshotter's commit by its ref label after each layer;
    the answer is exactly the labelled snapshot, however odd the label values are."""
    odd = 'sha256:a"b,c\\d'
    decoy = {"other": f'"{REF_LABEL}": "{odd}"'}  # the pair, as text inside another value
    snap.view("decoy", "", decoy)
    snap.view("plain", "", {REF_LABEL: "sha256:plain"})
    snap.view("target", "", {REF_LABEL: odd, "n": "1"})
    quoted = odd.replace("\\", "\\\\").replace('"', '\\"')
    found = list(snap.walk([f'labels."{REF_LABEL}"=="{quoted}"']))
    assert [i.name for i in found] == ["target"]
    assert found[0].labels == {REF_LABEL: odd, "n": "1"}
    assert [i.name for i in snap.walk([f'labels."{REF_LABEL}"=="{quoted}",parent==x'])] == []
    assert sorted(i.name for i in snap.walk([])) == ["decoy", "plain", "target"]
    assert snap.stat("target") == found[0]


def test_read_only_store_plus_substituted_local_store(
    tmp_path: Path,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
) -> None:
    """A read-only store (bind mount, standing in for a SAN) lacking one path; that path
    is substituted from a signed cache into --local-store; the rootfs reads both."""
    copy, ro = tmp_path / "copy", tmp_path / "ro"
    copy.mkdir()
    ro.mkdir()
    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    for p in demo_closure:
        if p != greeting:
            subprocess.run(["cp", "-a", p, str(copy)], check=True)
    subprocess.run(["mount", "--bind", str(copy), str(ro)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
    try:
        cfg = SnapshotterConfig(
            root=tmp_path / "root",
            store=ro,
            local_store=tmp_path / "local",
            substituters=(signed_caches["zstd"],),
            trusted_public_keys=(cache_keys["good"],),
        )
        s = StoreSnapshotter(cfg)
        try:
            with pytest.raises(AlreadyExists):
                s.prepare("x", "", layer_labels(demo_closure))
            local = tmp_path / "local" / os.path.basename(greeting)
            assert sorted(os.listdir(local)) == sorted(os.listdir(greeting))
            assert_container_reads(s, demo_closure, greeting, tmp_path / "m")
        finally:
            s.close()
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def substituting_snapshotter(tmp_path: Path, cache: str, key: str) -> StoreSnapshotter:
    """A snapshotter over an empty store, substituting into ``tmp_path``/local."""
    store = tmp_path / "empty-store"
    store.mkdir()
    return StoreSnapshotter(
        SnapshotterConfig(
            root=tmp_path / "root",
            store=store,
            local_store=tmp_path / "local",
            substituters=(cache,),
            trusted_public_keys=(key,),
        )
    )


def test_cleanup_drops_local_paths_no_snapshot_uses(
    tmp_path: Path,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
) -> None:
    """containerd's Cleanup (after its GC) removes substituted paths once no snapshot
    uses them; paths still used, or located by a Prepare not yet committed, stay; so do
    entries that are no store paths. Crash leftovers go at start-up."""
    local = tmp_path / "local"
    local.mkdir()
    (local / ".tmp-abcdefgh-crashed").mkdir()  # a fetch a crash interrupted
    (local / "README").write_text("not a store path: never ours to delete")
    s = substituting_snapshotter(tmp_path, signed_caches["zstd"], cache_keys["good"])
    assert os.listdir(local) == ["README"]
    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    sub = s.store_paths.substituter
    assert sub is not None
    fetch_all = sub.fetch_all
    cleaned: list[bool] = []

    def fetch_then_cleanup(basenames: Sequence[str], pool: Executor | None) -> list[Path | None]:
        got = fetch_all(basenames, pool)
        s.cleanup()  # a GC between locating a path and committing the layer
        cleaned.append(True)
        return got

    try:
        sub.fetch_all = fetch_then_cleanup  # type: ignore[method-assign]
        with pytest.raises(AlreadyExists):
            s.prepare("x", "", layer_labels(demo_closure))
        sub.fetch_all = fetch_all  # type: ignore[method-assign]
        assert cleaned == [True]
        everything = sorted([*(os.path.basename(p) for p in demo_closure), "README"])
        assert sorted(os.listdir(local)) == everything
        with pytest.raises(AlreadyExists):
            s.prepare("y", "", layer_labels([greeting]))
        s.cleanup()
        assert sorted(os.listdir(local)) == everything  # both layers use them

        s.remove(s.nix_name(ref_of(demo_closure), ""))
        s.cleanup()
        assert sorted(os.listdir(local)) == sorted([os.path.basename(greeting), "README"])
        s.remove(s.nix_name(ref_of([greeting]), ""))
        s.cleanup()
        assert os.listdir(local) == ["README"]

        with pytest.raises(AlreadyExists):  # needed again: substituted again
            s.prepare("z", "", layer_labels(demo_closure))
        assert_container_reads(s, demo_closure, greeting, tmp_path / "m")
    finally:
        s.close()


def test_first_layer_starts_substituting_the_later_layers(
    tmp_path: Path,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first store layer's prefetch list starts substituting the later layers' paths
    at its own Prepare, after its own; their Prepares then download nothing more and
    are still proven (a later layer naming paths of another layer than its ref falls
    back to unpack). A bad list is only a hint: ignored with a warning, the layer still
    commits."""
    local = tmp_path / "local"
    s = substituting_snapshotter(tmp_path, signed_caches["zstd"], cache_keys["good"])
    sub = s.store_paths.substituter
    assert sub is not None
    cache = sub.caches[0]
    entries = cache.entries
    downloads: list[str] = []

    def counted(path: str) -> Iterator[NarEntry]:
        downloads.append(os.path.basename(path))
        return entries(path)

    cache.entries = counted  # type: ignore[method-assign]
    first, *later = [[p] for p in sorted(demo_closure)]
    try:
        labels = {**layer_labels(first), **encode_prefetch([p for ps in later for p in ps])}
        with pytest.raises(AlreadyExists):
            s.prepare("a", "", labels)
        everything = sorted(os.path.basename(p) for p in demo_closure)
        deadline = time.monotonic() + 60
        while sorted(os.listdir(local)) != everything and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(os.listdir(local)) == everything
        assert sorted(downloads) == everything  # each once, the later ones at "a"
        workers = max(2, os.cpu_count() or 2)  # the snapshotter's I/O pool
        assert os.path.basename(first[0]) in downloads[:workers]  # its own paths go first
        chain, parent = ref_of(first), s.nix_name(ref_of(first), "")
        wrong = layer_labels(later[0], chain, ref=ref_of(later[1], chain))
        s.prepare("lie", parent, wrong)  # no AlreadyExists: an active snapshot to unpack
        for i, paths in enumerate(later):
            ref = ref_of(paths, chain)
            with pytest.raises(AlreadyExists):
                s.prepare(f"l{i}", parent, layer_labels(paths, chain))
            chain, parent = ref, s.nix_name(ref, parent)
        assert sorted(downloads) == everything
        bad = {**layer_labels(first), f"{PREFETCH_PREFIX}0": "../../etc/shadow"}
        with caplog.at_level(logging.WARNING), pytest.raises(AlreadyExists):
            s.prepare("b", "", bad)
        assert "ignoring its prefetch list" in caplog.text
    finally:
        s.close()


@pytest.mark.parametrize("local", ["store", "store/sub", "."])
def test_a_local_store_overlapping_the_store_is_refused(tmp_path: Path, local: str) -> None:
    """cleanup() deletes unused paths in the local store: never let that be the store."""
    store = tmp_path / "store"
    kept = store / ("0" * 32 + "-precious")
    kept.mkdir(parents=True)
    cfg = SnapshotterConfig(root=tmp_path / "root", store=store, local_store=tmp_path / local)
    with pytest.raises(StowawayError, match="overlaps --store") as e:
        StoreSnapshotter(cfg)
    assert e.value.hint and "directory of its own" in e.value.hint
    assert kept.is_dir()


def test_a_restart_in_another_mode_is_refused_while_snapshots_exist(
    tmp_path: Path, store_fs_path: Path, demo_closure: list[str]
) -> None:
    """Store layers live elsewhere per mode: a start that would pick another mode for
    existing snapshots (a new kernel, a moved state dir) stops with what to do."""
    root = store_fs_path / "root"  # hardlink mode: on the store's filesystem
    s = StoreSnapshotter(SnapshotterConfig(root=root, mode="copy", gcroots=tmp_path / "gc"))
    s.close()  # no snapshots yet: another mode is fine
    s = StoreSnapshotter(SnapshotterConfig(root=root, mode="hardlink", gcroots=tmp_path / "gc"))
    try:
        with pytest.raises(AlreadyExists):
            s.prepare("x", "", layer_labels(demo_closure))
    finally:
        s.close()
    with pytest.raises(StowawayError, match="made in hardlink mode") as e:
        StoreSnapshotter(SnapshotterConfig(root=root, mode="copy", gcroots=tmp_path / "gc"))
    assert e.value.hint and "--mode hardlink" in e.value.hint
    assert not link_dir_for(root).exists()  # the refused start left nothing mounted
    s = StoreSnapshotter(SnapshotterConfig(root=root, mode="hardlink", gcroots=tmp_path / "gc"))
    try:
        assert s.stat(s.nix_name(ref_of(demo_closure), "")).kind == Kind.COMMITTED
    finally:
        s.close()


def test_a_path_being_built_in_the_store_is_not_taken_from_the_local_store(
    tmp_path: Path, demo_closure: list[str]
) -> None:
    """On disk in a store with a Nix database but not valid yet (being built): overlay
    would read it before the local store's copy, so the layer is unpacked instead."""
    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    root = tmp_path / "chroot"
    subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "copy", "--no-check-sigs",
         "--to", f"local?root={root}", greeting],
        check=True, capture_output=True,
    )  # fmt: skip
    store, local = root / "nix/store", tmp_path / "local"
    local.mkdir()
    for where in (store, local):  # in the store: on disk, not registered
        subprocess.run(["cp", "-a", busybox, str(where)], check=True)
    cfg = SnapshotterConfig(root=tmp_path / "root", store=store, local_store=local)
    s = StoreSnapshotter(cfg)
    try:
        (m,) = s.prepare("extract", "", layer_labels([greeting, busybox]))
        assert m.type == "bind" and s.stat("extract").kind == Kind.ACTIVE
        with pytest.raises(AlreadyExists):  # valid in the store: taken from there
            s.prepare("x", "", layer_labels([greeting]))
    finally:
        s.close()


def test_untrusted_cache_falls_back_to_unpack(
    tmp_path: Path,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
) -> None:
    store = tmp_path / "empty-store"
    store.mkdir()
    cfg = SnapshotterConfig(
        root=tmp_path / "root",
        store=store,
        local_store=tmp_path / "local",
        substituters=(signed_caches["zstd"],),
        trusted_public_keys=(cache_keys["other"],),  # the cache is signed by 'good'
    )
    s = StoreSnapshotter(cfg)
    try:
        (m,) = s.prepare("extract", "", layer_labels(demo_closure))
        assert m.type == "bind" and s.stat("extract").kind == Kind.ACTIVE
        assert os.listdir(tmp_path / "local") == []
    finally:
        s.close()


def test_many_layers_fit_one_mount(tmp_path: Path, demo_closure: list[str]) -> None:
    """125 layers under a long state dir: the lowerdir (with `::STORE`, which containerd
    1.6 cannot shorten) still fits in one page thanks to the short links, and mounts."""
    root = tmp_path / ("long-state-directory-name-" * 3) / "root"
    s = StoreSnapshotter(SnapshotterConfig(root=root, gcroots=tmp_path / "gc"))
    try:
        parent = ""
        for i in range(125):
            (m,) = s.prepare(f"k{i}", parent, {})
            Path(
                m.source
                if m.type == "bind"
                else dict(o.split("=", 1) for o in m.options if "=" in o)["upperdir"],
                f"f{i}",
            ).write_text(str(i))
            s.commit(unpacked_name(i), f"k{i}", {})
            parent = unpacked_name(i)
        chain = parent.rsplit("/", 1)[-1]
        with pytest.raises(AlreadyExists):
            s.prepare("x", parent, layer_labels(demo_closure, chain))
        ms = s.prepare("ctr", s.nix_name(ref_of(demo_closure, chain), parent), {})
        assert len(str(s.layout.fs(1))) * 125 > 4096  # would not fit without the links
        assert len(",".join(ms[0].options)) < 4096
        root_fs = mounted(ms, tmp_path / "mnt")
        try:
            assert (root_fs / "f0").read_text() == "0" and (root_fs / "f124").read_text() == "124"
            demo = next(p for p in demo_closure if p.endswith("-greeting-data"))
            msg = "share/greeting/message"
            assert (root_fs / demo.lstrip("/") / msg).read_bytes() == Path(demo, msg).read_bytes()
        finally:
            umount(root_fs)
    finally:
        s.close()
    assert not s.link_dir.exists()


def test_stub_trees_rebuilt_after_reboot_and_shared(
    tmp_path: Path, demo_closure: list[str], demo_app: str
) -> None:
    """Stub trees live on a tmpfs: after a 'reboot' (the tmpfs gone) a restarted
    snapshotter rebuilds them from the store; a second layer with the same paths gets
    hard links to the first one's stubs, not new inodes."""
    cfg = SnapshotterConfig(root=tmp_path / "root", gcroots=tmp_path / "gc")
    s = StoreSnapshotter(cfg)
    try:
        assert os.path.ismount(s.link_dir)
        parents = [unpacked_name(1), unpacked_name(2)]  # the same paths on two parents
        names = []
        for i, parent in enumerate(parents):
            s.prepare(f"p{i}", "", {})
            s.commit(parent, f"p{i}", {})
            chain = parent.rsplit("/", 1)[-1]
            with pytest.raises(AlreadyExists):
                s.prepare(f"x{i}", parent, layer_labels(demo_closure, chain))
            names.append(s.nix_name(ref_of(demo_closure, chain), parent))
        one, two = (s.meta.get(n).id for n in names)
        assert s.usage(names[1]).inodes > 2  # waits for both trees
        rel = Path(demo_app.lstrip("/"), "bin/demo")
        st1, st2 = (os.lstat(s.link_dir / str(i) / rel) for i in (one, two))
        assert st1.st_ino == st2.st_ino and st1.st_blocks == 0
        assert os.getxattr(s.link_dir / str(one) / rel, "trusted.overlay.redirect") == (
            f"/{os.path.basename(demo_app)}/bin/demo".encode()
        )
    finally:
        s.close()
    assert not s.link_dir.exists()  # nothing mounted it: tmpfs dropped
    s = StoreSnapshotter(cfg)  # "after a reboot": trees rebuilt at start-up
    try:
        ms = s.prepare("ctr", names[0], {})
        root = mounted(ms, tmp_path / "mnt")
        try:
            out = subprocess.run(
                ["chroot", str(root), f"{demo_app}/bin/demo"], capture_output=True, text=True
            )
            assert "hello from stowaway" in out.stdout
        finally:
            umount(root)
    finally:
        s.close()


def test_a_store_path_missing_after_reboot_refuses_only_its_mounts(
    tmp_path: Path, demo_closure: list[str]
) -> None:
    """A store path gone while the node was down (a SAN store collected elsewhere, a
    mount not up yet): the snapshotter still starts, its chains' mounts are refused
    with a clear error, and work again once the path is back."""
    store = tmp_path / "store"
    store.mkdir()
    for p in demo_closure:
        subprocess.run(["cp", "-a", p, str(store)], check=True)
    cfg = SnapshotterConfig(root=tmp_path / "root", store=store, gcroots=tmp_path / "gc")
    s = StoreSnapshotter(cfg)
    try:
        with pytest.raises(AlreadyExists):
            s.prepare("x", "", layer_labels(demo_closure))
        s.prepare("running", s.nix_name(ref_of(demo_closure), ""), {})  # a container's rootfs
    finally:
        s.close()
    greeting = store / os.path.basename(next(p for p in demo_closure if "greeting" in p))
    os.rename(greeting, tmp_path / "away")
    s = StoreSnapshotter(cfg)  # "after a reboot": the tree cannot be rebuilt
    try:
        (m,) = s.prepare("plain", "", {})  # ordinary images still work
        assert m.type == "bind"
        with pytest.raises(FailedPrecondition, match="stub tree of layer"):
            s.prepare("ctr", s.nix_name(ref_of(demo_closure), ""), {})
        with pytest.raises(NotFound):  # the failed Prepare made no snapshot
            s.stat("ctr")
        with pytest.raises(FailedPrecondition, match="children"):
            s.remove(s.nix_name(ref_of(demo_closure), ""))
        with pytest.raises(FailedPrecondition, match="stub tree of layer"):
            s.mounts("running")  # still refused: the failed remove forgot nothing
        os.rename(tmp_path / "away", greeting)
        assert s.prepare("ctr", s.nix_name(ref_of(demo_closure), ""), {})[0].type == "overlay"
        assert s.mounts("running")[0].type == "overlay"
    finally:
        s.close()


def test_a_waiting_mount_builds_queued_trees_itself(
    snap: StoreSnapshotter, demo_closure: list[str], demo_app: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While the tree child is busy (here: stopped) a mount builds the queued trees
    newest first in the snapshotter itself, leaving the child its current one; the
    child then skips what is already built. The rootfs is complete either way."""
    assert snap.trees.builder is not None and (child := snap.trees.builder.pid) is not None
    os.kill(child, signal.SIGSTOP)
    resume = threading.Timer(1.0, os.kill, (child, signal.SIGCONT))
    try:
        parent = chain = ""
        for i, path in enumerate(sorted(demo_closure)):
            with pytest.raises(AlreadyExists):
                snap.prepare(f"x{i}", parent, layer_labels([path], chain))
            chain = ref_of([path], chain)
            parent = snap.nix_name(chain, parent)
        caplog.set_level(logging.DEBUG, logger="stowaway.runtime.snapshotter")
        resume.start()
        root = mounted(snap.prepare("ctr", parent, {}), Path(snap.config.root, "mnt"))
    finally:
        resume.join()
        os.kill(child, signal.SIGCONT)
    try:
        store = root / "nix" / "store"
        assert sorted(os.listdir(store)) == sorted(map(os.path.basename, demo_closure))
        for path in demo_closure:  # every byte read through the stubs is the host's
            subprocess.run(["diff", "-r", "--no-dereference", path, f"{root}{path}"], check=True)
        out = subprocess.run(["chroot", str(root), f"{demo_app}/bin/demo"], capture_output=True)
        assert b"hello from stowaway" in out.stdout
    finally:
        umount(root)
    built_here = [r.getMessage() for r in caplog.records if "built here" in r.getMessage()]
    assert len(built_here) == len(demo_closure) - 1, built_here  # all but the child's current


def test_claims_are_proven_before_a_layer_is_committed(
    snap: StoreSnapshotter, demo_closure: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever the annotations say, a store layer is committed only when the tar of
    the named paths is the layer containerd asks for (its chain ID); otherwise it is an
    ordinary unpack and nothing of the host store is used."""
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    parent = unpacked_name(7)
    snap.prepare("p", "", {})
    snap.commit(parent, "p", {})
    chain = parent.rsplit("/", 1)[-1]
    lies = {
        # the layer holds busybox; its annotations name another host path
        "other paths": ("", layer_labels([greeting], ref=ref_of([busybox]))),
        # one path more than the layer holds
        "extra path": ("", layer_labels([busybox, greeting], ref=ref_of([busybox]))),
        # the right paths, but the chain ID of another parent
        "other parent": (parent, layer_labels([busybox])),
        # a parent that is no chain: nothing to prove the claim against
        "unknown parent": ("A", layer_labels([busybox], chain)),
        # the members' mtime the annotation gives is not the layer's
        "other mtime": ("", {**layer_labels([busybox]), MTIME_LABEL: "1234"}),
        # no chain ID at all
        "no chain id": ("", layer_labels([busybox], ref="layer-one")),
    }
    snap.prepare("a", "", {})
    snap.commit("A", "a", {})
    for what, (on, labels) in lies.items():
        (m,) = snap.prepare(f"extract-{what}", on, labels)
        assert snap.stat(f"extract-{what}").kind == Kind.ACTIVE, what
        snap.remove(f"extract-{what}")
    assert not [i for i in snap.walk([]) if i.name.startswith("stowaway/")]
    assert snap.gcroots.rooted() == set()
    assert "do not make that layer" in caplog.text
    with pytest.raises(InvalidArgument, match="stowaway.mtime"):
        snap.prepare("bad", "", {**layer_labels([busybox]), MTIME_LABEL: "soon"})
    # the truth is committed, on a chain too
    with pytest.raises(AlreadyExists):
        snap.prepare("x", parent, layer_labels([busybox], chain))


def test_each_layer_is_hashed_once_per_node(tmp_path: Path, demo_closure: list[str]) -> None:
    """A layer's (paths, tar settings) → diff_id is remembered in the state dir: the same
    paths on another parent, or after a restart, are not hashed again."""
    cfg = SnapshotterConfig(root=tmp_path / "root", gcroots=tmp_path / "gc")
    s = StoreSnapshotter(cfg)
    try:
        with pytest.raises(AlreadyExists):
            s.prepare("x", "", layer_labels(demo_closure))
        parent = unpacked_name(3)
        s.prepare("p", "", {})
        s.commit(parent, "p", {})
        with pytest.raises(AlreadyExists):
            s.prepare("y", parent, layer_labels(demo_closure, parent.rsplit("/", 1)[-1]))
        assert s.proof.hashed == 1
    finally:
        s.close()
    s = StoreSnapshotter(cfg)
    try:
        s.remove(s.nix_name(ref_of(demo_closure), ""))
        with pytest.raises(AlreadyExists):
            s.prepare("z", "", layer_labels(demo_closure))
        assert s.proof.hashed == 0
    finally:
        s.close()


def test_layers_built_with_another_mtime_are_proven_too(
    snap: StoreSnapshotter, demo_closure: list[str], local_store: LocalStore, tmp_path: Path
) -> None:
    """SOURCE_DATE_EPOCH changes every member's mtime: the composer records it in the
    layer's annotations, and the snapshotter rebuilds the tar with it."""
    closure = local_store.closure_infos(demo_closure)
    planned = [PlannedLayer(tuple(sorted(demo_closure)), 0)]
    settings = LayerSettings(mtime=1234)
    (layer,) = build_layers(local_store, planned, closure, settings, LayerCache(tmp_path / "cache"))
    assert layer.annotations[MTIME_LABEL] == "1234"
    with pytest.raises(AlreadyExists):
        snap.prepare("x", "", {**layer.annotations, REF_LABEL: layer.diff_id})
