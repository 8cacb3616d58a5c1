"""Rootfs mode choice (the decision table, containerd version) and ``bind`` mode
(``Mount.target``). No containerd >= 1.7 runs here, so bind mode's mounts are applied
by the test the way containerd 1.7 applies them (each in order, ``target`` joined to the
rootfs), on the real demo closure."""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from runtime_helpers import layer_labels, mount_like_containerd, ref_of

from stowaway.errors import StowawayError
from stowaway.runtime.cli_snapshotter import snapshotter_command
from stowaway.runtime.metadata import Record
from stowaway.runtime.modes import ModeFacts, choose, containerd_version, parse_version
from stowaway.runtime.mounts import Layout, mounts
from stowaway.runtime.snapshots_service import _mounts
from stowaway.runtime.snapshotter.contract import AlreadyExists, Kind, Mount
from stowaway.runtime.snapshotter.state import SnapshotterConfig
from stowaway.runtime.snapshotter.store_snapshotter import StoreSnapshotter
from stowaway.runtime.stub_trees import materialise

NO_OVERLAY = "cannot set trusted.overlay.metacopy"


@pytest.mark.parametrize(
    ("failure", "version", "same", "mode"),
    [
        (None, (1, 6), True, "overlay"),
        (None, (1, 7), False, "overlay"),  # overlay preferred even when bind would work
        (NO_OVERLAY, (1, 7), True, "bind"),
        (NO_OVERLAY, (2, 0), False, "bind"),
        (NO_OVERLAY, (1, 6), True, "hardlink"),
        (NO_OVERLAY, (1, 6), False, "copy"),
        (NO_OVERLAY, (0, 9), False, "copy"),
    ],
)
def test_auto_decision_table(
    failure: str | None, version: tuple[int, int], same: bool, mode: str
) -> None:
    got, why = choose("auto", ModeFacts(failure, version, same))
    assert got == mode
    if failure is not None:
        assert why.startswith(NO_OVERLAY)
    if mode in ("hardlink", "copy"):
        assert f"containerd {version[0]}.{version[1]} has no Mount.target" in why


@pytest.mark.parametrize("mode", ["overlay", "bind", "hardlink", "copy"])
def test_forced_modes(mode: str) -> None:
    assert choose(mode, ModeFacts(NO_OVERLAY, (1, 7), True)) == (mode, "forced by configuration")


def test_hardlink_refused_across_filesystems() -> None:
    """Every hard link would fail with EXDEV at pull time: refused at start-up, naming
    the mode that works."""
    with pytest.raises(StowawayError, match="--mode hardlink needs the store") as e:
        choose("hardlink", ModeFacts(NO_OVERLAY, (1, 6), False))
    assert e.value.hint and "--mode copy" in e.value.hint
    assert choose("copy", ModeFacts(NO_OVERLAY, (1, 6), False))[0] == "copy"


def test_hardlink_snapshotter_on_a_tmpfs_root_is_refused(tmp_path: Path) -> None:
    """The state dir on a tmpfs (as /tmp is on Debian 13), the store on disk."""
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True)
    try:
        link_dir = tmp_path / "links"
        config = SnapshotterConfig(
            root=tmpfs / "root", mode="hardlink", gcroots=tmp_path / "gc", link_dir=link_dir
        )
        with pytest.raises(StowawayError, match="hard links cannot cross filesystems"):
            StoreSnapshotter(config)
        assert not os.path.ismount(link_dir)  # nothing left mounted
        StoreSnapshotter(replace(config, mode="copy")).close()  # the mode the hint names
    finally:
        subprocess.run(["umount", "-l", str(tmpfs)], check=True)


def test_bind_refused_on_containerd_1_6() -> None:
    with pytest.raises(StowawayError, match=r"--mode bind needs containerd >= 1\.7") as e:
        choose("bind", ModeFacts(None, (1, 6), True))
    assert "containerd 1.6 ignores targets" in str(e.value)
    with pytest.raises(StowawayError, match="expected auto, overlay, bind"):
        choose("fast", ModeFacts(None, (1, 7), True))


@pytest.mark.parametrize(
    ("text", "version"),
    [("1.7", (1, 7)), ("1.6.20~ds1", (1, 6)), ("v1.7.13", (1, 7)), ("2.0.0-rc.1", (2, 0))],
)
def test_parse_version(text: str, version: tuple[int, int]) -> None:
    assert parse_version(text, "--containerd-version") == version


def test_parse_version_error_names_its_source() -> None:
    with pytest.raises(StowawayError, match=r"--containerd-version: no containerd version"):
        parse_version("latest", "--containerd-version")


def test_containerd_version_flag_and_probe() -> None:
    assert containerd_version("1.7") == ((1, 7), "--containerd-version 1.7")
    # Debian's containerd on PATH: 1.6.20 (Debian 12) or 1.7.24 (Debian 13)
    printed = subprocess.run(["containerd", "--version"], capture_output=True, text=True).stdout
    version, whence = containerd_version(None)
    assert whence == printed.strip()
    assert version in ((1, 6), (1, 7)) and f" {version[0]}.{version[1]}." in printed


def _rec(kind: Kind, chain: tuple[int, ...], chain_nix: tuple[bool, ...]) -> Record:
    return Record(9, "k", "p", kind, 0, 0, {}, 0, 0, False, chain, chain_nix)


STORE_A = Path("/nix/store/" + "a" * 32 + "-lib")
STORE_B = Path("/var/local-store/" + "b" * 32 + "-app")


def test_bind_mode_mounts_for_mixed_chain() -> None:
    layout = Layout(Path("/s"), "bind", (Path("/nix/store"),), index_off=True)
    # active on [ordinary customisation, store layer, ordinary base]
    rec = _rec(Kind.ACTIVE, (3, 2, 1), (False, True, False))
    ms = mounts(rec, layout, [STORE_B, STORE_A, STORE_A])
    assert ms == [
        Mount(
            "overlay",
            "overlay",
            (
                "index=off",
                "workdir=/s/9/work",
                "upperdir=/s/9/fs",
                "lowerdir=/s/3/fs:/s/2/fs:/s/1/fs",
            ),
        ),
        Mount("bind", str(STORE_A), ("ro", "rbind"), f"/nix/store/{STORE_A.name}"),
        Mount("bind", str(STORE_B), ("ro", "rbind"), f"/nix/store/{STORE_B.name}"),
    ]
    # a view of one store layer: a read-only bind of its mount points, then the binds
    view = mounts(_rec(Kind.VIEW, (2,), (True,)), layout, [STORE_A])
    assert view == [
        Mount("bind", "/s/2/fs", ("ro", "rbind")),
        Mount("bind", str(STORE_A), ("ro", "rbind"), f"/nix/store/{STORE_A.name}"),
    ]
    # no store layer: exactly containerd's overlayfs answer, no targets
    plain = mounts(_rec(Kind.ACTIVE, (), ()), layout)
    assert plain == [Mount("bind", "/s/9/fs", ("rw", "rbind"))]
    # overlay mode ignores bind paths and keeps the single data-only overlay
    over = mounts(rec, Layout(Path("/s"), "overlay", (Path("/nix/store"),)), [STORE_A])
    assert len(over) == 1 and over[0].options[-2:] == ("metacopy=on", "redirect_dir=on")


def test_target_reaches_the_wire() -> None:
    (pb,) = _mounts([Mount("bind", "/x", ("ro", "rbind"), "/nix/store/y")])
    assert (pb.type, pb.source, pb.target, list(pb.options)) == (
        "bind",
        "/x",
        "/nix/store/y",
        ["ro", "rbind"],
    )
    assert _mounts([Mount("overlay", "overlay", ())])[0].target == ""


def test_bind_stub_tree_is_mount_points_only(tmp_path: Path, demo_closure: list[str]) -> None:
    paths = [(os.path.basename(p), Path(p)) for p in demo_closure]
    materialise("bind", paths, tmp_path / "a")
    materialise("bind", paths, tmp_path / "b")
    store = tmp_path / "a/nix/store"
    assert sorted(os.listdir(store)) == sorted(b for b, _ in paths)
    for base, src in paths:
        point, st = store / base, os.lstat(src)
        if stat.S_ISDIR(st.st_mode):
            assert point.is_dir() and not point.is_symlink() and os.listdir(point) == []
        elif stat.S_ISLNK(st.st_mode):
            assert os.readlink(point) == os.readlink(src)
        else:
            assert point.stat().st_size == 0
        assert stat.S_IMODE(os.lstat(point).st_mode) == stat.S_IMODE(st.st_mode)
        assert os.lstat(point).st_mtime == 1
    listing = [
        (str(p.relative_to(d)), os.lstat(p).st_mode, os.lstat(p).st_mtime_ns)
        for d in (tmp_path / "a", tmp_path / "b")
        for p in sorted(d.rglob("*"))
    ]
    half = len(listing) // 2
    assert listing[:half] == listing[half:]  # same inputs, same tree


def _apply_like_containerd_1_7(ms: list[Mount], root: Path) -> None:
    """Each mount in order; a target is joined to the rootfs (what 1.7's mount.All does)."""
    root.mkdir()
    for m in ms:
        dest = root / m.target.lstrip("/") if m.target else root
        if m.type == "bind":
            ro = ["-o", "ro"] if "ro" in m.options else []
            subprocess.run(["mount", "--rbind", *ro, m.source, str(dest)], check=True)
        else:
            mount_like_containerd(m.type, m.source, m.options, dest)


def test_bind_mode_snapshotter_end_to_end(
    tmp_path: Path, demo_closure: list[str], demo_app: str
) -> None:
    config = SnapshotterConfig(
        root=tmp_path / "root", gcroots=tmp_path / "gc", mode="bind", containerd_version="1.7"
    )
    snap = StoreSnapshotter(config)
    try:
        assert snap.mode == "bind"
        labels = layer_labels(demo_closure)
        with pytest.raises(AlreadyExists):
            snap.prepare("extract", "", labels)
        ms = snap.prepare("ctr", snap.nix_name(ref_of(demo_closure), ""), {})
        targets = [m.target for m in ms[1:]]
        dirs = [p for p in demo_closure if not os.path.islink(p)]
        assert targets == sorted(f"/nix/store/{os.path.basename(p)}" for p in dirs)
        root = tmp_path / "rootfs"
        _apply_like_containerd_1_7(ms, root)
        try:
            out = subprocess.run(
                ["chroot", str(root), f"{demo_app}/bin/demo"], capture_output=True, text=True
            )
            assert "hello from stowaway" in out.stdout
            with pytest.raises(OSError, match="Read-only file system"):
                (root / demo_app.lstrip("/") / "new-file").write_bytes(b"x")
        finally:
            subprocess.run(["umount", "-R", str(root)], check=True)
    finally:
        snap.close()


def test_bind_mode_refused_on_1_6(tmp_path: Path) -> None:
    link_dir = tmp_path / "links"
    config = SnapshotterConfig(
        root=tmp_path / "root", mode="bind", containerd_version="1.6", link_dir=link_dir
    )
    with pytest.raises(StowawayError, match="needs containerd >= 1.7"):
        StoreSnapshotter(config)
    assert not os.path.ismount(link_dir)  # nothing left mounted
    r = CliRunner().invoke(
        snapshotter_command,
        [
            "--socket",
            str(tmp_path / "s.sock"),
            "--root",
            str(tmp_path / "root"),
            "--mode",
            "bind",
            "--containerd-version",
            "1.6",
        ],
    )
    assert r.exit_code == 1 and "--mode bind needs containerd >= 1.7" in r.output
