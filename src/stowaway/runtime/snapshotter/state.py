"""The snapshotter's start-up settings and the state it keeps outside its database:
the state directory's mode record, the stub tmpfs on the link dir, GC roots' home."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stowaway.errors import StowawayError
from stowaway.fsutil import atomic_write
from stowaway.runtime.modes import ModeFacts, choose, containerd_version
from stowaway.runtime.stub_trees import Mode, probe_data_only_overlay

__all__ = [
    "SnapshotterConfig",
    "check_apart",
    "choose_mode",
    "default_gcroots",
    "drop_link_dir",
    "keep_mode",
    "link_dir_for",
    "mount_tmpfs",
]

log = logging.getLogger(__name__)

DEFAULT_GCROOTS = Path("/nix/var/nix/gcroots/stowaway")
LINKS_BASE = Path("/run/stowaway")


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


def default_gcroots(config: SnapshotterConfig) -> Path:
    """Nix's own GC roots directory for the system store, else one in the state dir."""
    if config.store.resolve() == Path("/nix/store"):
        return DEFAULT_GCROOTS
    return config.root / "gcroots"


def choose_mode(config: SnapshotterConfig, probe_dir: Path) -> tuple[Mode, str]:
    """The rootfs strategy and why (for the start-up log); see ``modes.choose``."""
    requested = config.mode or "auto"
    version, whence = containerd_version(config.containerd_version)
    log.info("containerd version %d.%d (from %s)", *version, whence)
    failure = probe_data_only_overlay(probe_dir) if requested == "auto" else "not probed"
    stores = [config.store, *([config.local_store] if config.local_store else [])]
    same = all(os.stat(s).st_dev == os.stat(config.root).st_dev for s in stores)
    return choose(requested, ModeFacts(failure, version, same))


def mount_tmpfs(d: Path) -> None:
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


def drop_link_dir(d: Path) -> None:
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


def check_apart(store: Path, local_store: Path) -> None:
    """The local store is collected by ``cleanup``: it must not be, contain or lie
    inside the store, or paths the snapshotter never placed there would be deleted."""
    a, b = store.resolve(), local_store.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise StowawayError(
            f"--local-store {local_store} overlaps --store {store}",
            hint="give --local-store a directory of its own (e.g. /var/lib/stowaway/store): "
            "the snapshotter deletes the paths there that no snapshot uses",
        )


def keep_mode(record: Path, mode: Mode, has_snapshots: bool) -> None:
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
