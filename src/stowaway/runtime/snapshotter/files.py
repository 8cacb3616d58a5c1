"""Walks of snapshot files: disk usage, overlay xattr stripping, removal."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from stowaway.runtime.snapshotter.contract import Usage

__all__ = ["disk_usage", "entries", "rmtree", "strip_overlay_xattrs"]


def rmtree(path: Path) -> None:
    """Remove a directory tree, a file or a link; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def entries(root: Path) -> list[tuple[str, bool]]:
    """Every path below ``root`` (itself included) and whether it is a directory, from
    one walk (Commit both strips and measures an unpacked layer: one walk, not two)."""
    out: list[tuple[str, bool]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        out.append((dirpath, True))
        out += [(os.path.join(dirpath, n), True) for n in dirnames]
        out += [(os.path.join(dirpath, n), False) for n in filenames]
    return out


def disk_usage(path: Path, walked: list[tuple[str, bool]] | None = None) -> Usage:
    """Bytes allocated and inodes below ``path`` (``walked``: its ``entries`` if the
    caller has them), each inode counted once."""
    seen: set[int] = set()
    size = 0
    for entry, _ in entries(path) if walked is None else walked:
        st = os.lstat(entry)
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            size += st.st_blocks * 512
    return Usage(size, len(seen))


def strip_overlay_xattrs(walked: list[tuple[str, bool]]) -> int:
    """Remove ``trusted.overlay.*`` xattrs from the ``walked`` entries (all but a
    directory's ``opaque``, which containerd itself sets for opaque whiteouts); returns
    how many.

    Why: containerd's tar applier writes a layer's ``SCHILY.xattr.*`` records as they
    are, straight into the snapshot dir, and in overlay mode a chain holding a store
    layer is mounted with ``metacopy=on`` over the store as a data-only layer. A
    ``metacopy`` + ``redirect`` pair from any image would then read *any* host store
    path, not just the image's closure. Only our own stub trees may carry them.
    """
    removed = 0
    for path, is_dir in walked:
        for attr in os.listxattr(path, follow_symlinks=False):
            if attr.startswith("trusted.overlay.") and not (
                is_dir and attr == "trusted.overlay.opaque"
            ):
                os.removexattr(path, attr, follow_symlinks=False)
                removed += 1
    return removed
