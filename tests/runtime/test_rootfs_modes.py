"""The fallback rootfs modes for real: the demo image pulled through CRI and run with
`--mode hardlink` (store and state on one filesystem) and `--mode copy`; the container
sees exactly its closure, byte for byte, and its writes never reach the host store
(hard links share the store's inodes: overlay copy-up must protect them). The start-up
probe's choice is checked on filesystems where the data-only overlay cannot work."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from runtime_helpers import (
    NS,
    SnapshotterDaemon,
    StowawayContainerd,
    blob_gets,
    cri_pull,
    manifest_layers,
    store_layer_digests,
)

from daemons import Registry
from stowaway.runtime.modes import BIND_MIN, containerd_version
from stowaway.runtime.snapshotter.state import SnapshotterConfig, choose_mode
from stowaway.runtime.snapshotter.store_snapshotter import StoreSnapshotter


def regular_files(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames.sort()
            out += [
                os.path.join(dirpath, n)
                for n in sorted(filenames)
                if not os.path.islink(os.path.join(dirpath, n))
            ]
    return out


def host_state(files: list[str]) -> dict[str, tuple[str, int, int, int]]:
    """sha256, mode, mtime and inode of each file: a write through a shared inode (or a
    chmod/touch) shows up here."""
    out = {}
    for f in files:
        st = os.lstat(f)
        digest = hashlib.sha256(Path(f).read_bytes()).hexdigest()
        out[f] = (digest, st.st_mode, st.st_mtime_ns, st.st_ino)
    return out


@pytest.mark.parametrize("mode", ["hardlink", "copy"])
def test_fallback_mode_runs_demo_image(
    mode: str,
    store_fs_path: Path,
    registry: Registry,
    demo_ref: str,
    demo_app: str,
    demo_closure: list[str],
) -> None:
    assert os.stat(store_fs_path).st_dev == os.stat("/nix/store").st_dev  # one filesystem
    files = regular_files(demo_closure)
    before = host_state(files)
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    message = f"{greeting}/share/greeting/message"
    with SnapshotterDaemon(
        store_fs_path, "--mode", mode, "--gcroots", str(store_fs_path / "gc")
    ) as snap:
        assert f"rootfs mode {mode} (forced by configuration)" in snap.log_text()
        plugins = {"stowaway": {"type": "snapshot", "address": snap.socket}}
        StowawayContainerd.registry_host = registry.host
        with StowawayContainerd(store_fs_path, cri=True, proxy_plugins=plugins) as ctrd:
            seen = blob_gets(registry)
            cri_pull(ctrd, demo_ref)
            store_layers = store_layer_digests(manifest_layers(registry, "demo", "v1"))
            assert store_layers and not (blob_gets(registry) - seen) & store_layers

            # the snapshot really is a hard-link farm (shared inodes) or real copies
            linked = list((snap.root / "snapshots").glob(f"*/fs{message}"))
            assert linked
            same = {os.stat(f).st_ino == os.stat(message).st_ino for f in linked}
            assert same == {mode == "hardlink"}

            run = ["run", "--rm", "--snapshotter", "stowaway", demo_ref]
            assert "hello from stowaway" in ctrd.ctr(*run, "d1", namespace=NS).stdout
            ls = ctrd.ctr(*run, "l1", f"{busybox}/bin/ls", "/nix/store", namespace=NS).stdout
            assert sorted(ls.split()) == sorted(os.path.basename(p) for p in demo_closure)
            sums = ctrd.ctr(
                *run, "s1", f"{busybox}/bin/busybox", "sha256sum", *files, namespace=NS
            ).stdout
            inside = {ln[66:]: ln[:64] for ln in sums.splitlines()}
            assert inside == {f: before[f][0] for f in files}

            # every way of writing to a lower file: append, truncate, chmod, touch, link
            script = (
                f"echo tampered >> {demo_app}/bin/demo && echo x > {message} && "
                f"chmod 600 {message} && {busybox}/bin/busybox touch {message} && "
                f"ln {message} {greeting}/hardlinked && cat {message}"
            )
            sh = [f"{busybox}/bin/sh", "-c", script]
            assert ctrd.ctr(*run, "w1", *sh, namespace=NS).stdout == "x\n"
            again = ctrd.ctr(*run, "r1", f"{busybox}/bin/cat", message, namespace=NS).stdout
            assert again.startswith("hello from stowaway")  # a fresh upper layer
    assert host_state(files) == before
    assert not os.path.exists(f"{greeting}/hardlinked")


@pytest.mark.skipif(
    containerd_version(None)[0] < BIND_MIN,
    reason="bind mode needs containerd >= 1.7 (Debian 13 has 1.7.24, Debian 12 1.6.20)",
)
def test_bind_mode_runs_demo_image(
    tmp_path: Path,
    registry: Registry,
    demo_ref: str,
    demo_app: str,
    demo_closure: list[str],
) -> None:
    """containerd >= 1.7 bind-mounts each store path read-only at its ``Mount.target``:
    CRI pulls without downloading the store layers, the container sees exactly its
    closure with the host's bytes, and cannot write to it."""
    files = regular_files(demo_closure)
    before = host_state(files)
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    message = f"{greeting}/share/greeting/message"
    with SnapshotterDaemon(tmp_path, "--mode", "bind", "--gcroots", str(tmp_path / "gc")) as snap:
        assert "rootfs mode bind (forced by configuration)" in snap.log_text()
        plugins = {"stowaway": {"type": "snapshot", "address": snap.socket}}
        StowawayContainerd.registry_host = registry.host
        with StowawayContainerd(tmp_path, cri=True, proxy_plugins=plugins) as ctrd:
            seen = blob_gets(registry)
            cri_pull(ctrd, demo_ref)
            store_layers = store_layer_digests(manifest_layers(registry, "demo", "v1"))
            assert store_layers and not (blob_gets(registry) - seen) & store_layers

            run = ["run", "--rm", "--snapshotter", "stowaway", demo_ref]
            assert "hello from stowaway" in ctrd.ctr(*run, "d1", namespace=NS).stdout
            ls = ctrd.ctr(*run, "l1", f"{busybox}/bin/ls", "/nix/store", namespace=NS).stdout
            assert sorted(ls.split()) == sorted(os.path.basename(p) for p in demo_closure)
            sums = ctrd.ctr(
                *run, "s1", f"{busybox}/bin/busybox", "sha256sum", *files, namespace=NS
            ).stdout
            assert {ln[66:]: ln[:64] for ln in sums.splitlines()} == {
                f: before[f][0] for f in files
            }
            script = (
                f"for f in {demo_app}/bin/demo {message}; do "
                f"if echo x >> $f; then echo wrote $f; else echo refused; fi; done; "
                f"{busybox}/bin/busybox touch {greeting}/new 2>/dev/null || echo refused"
            )
            out = ctrd.ctr(*run, "w1", f"{busybox}/bin/sh", "-c", script, namespace=NS).stdout
            assert out.split() == ["refused"] * 3
    assert host_state(files) == before
    assert not os.path.exists(f"{greeting}/new")


@pytest.fixture()
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs mount: no xattrs at all, so the data-only overlay probe must fail."""
    where = tmp_path / "ramfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_probe_picks_overlay_here(tmp_path: Path) -> None:
    mode, why = choose_mode(SnapshotterConfig(root=tmp_path), tmp_path)
    assert (mode, why) == ("overlay", "data-only overlay with metacopy works on this kernel")


def test_probe_falls_back_to_hardlink_then_copy(
    ramfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ramfs / "store"
    store.mkdir()
    # the probe runs where the stub trees would live (normally the snapshotter's own
    # tmpfs, which has xattrs): here a ramfs, which has none
    (ramfs / "root").mkdir()
    # containerd 1.6 has no Mount.target: no bind mode (on 1.7 the probe picks bind)
    v16 = SnapshotterConfig(root=ramfs / "root", store=store, containerd_version="1.6")
    mode, why = choose_mode(v16, ramfs)
    assert mode == "hardlink"
    assert why.startswith("cannot set ") and why.endswith("; store and state share a filesystem")
    mode, why = choose_mode(replace(v16, containerd_version="1.7"), ramfs)
    assert mode == "bind" and why.endswith("containerd 1.7 honours Mount.target")
    caplog.set_level(logging.INFO, logger="stowaway.runtime.snapshotter")
    s = StoreSnapshotter(SnapshotterConfig(root=ramfs / "root", store=store))
    s.close()
    assert s.mode == "overlay"  # stubs on its tmpfs: the state dir's xattrs do not matter
    (line,) = [r.getMessage() for r in caplog.records if "rootfs mode" in r.getMessage()]
    assert line.startswith("stowaway snapshotter: rootfs mode overlay (data-only overlay")

    mode, why = choose_mode(replace(v16, root=ramfs, store=Path("/nix/store")), ramfs)
    assert mode == "copy" and why.endswith("store on another filesystem, copying files")
