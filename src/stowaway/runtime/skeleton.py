"""Closure skeletons: the file trees a stowaway layer's snapshot holds instead of bytes.

Three ways to give a container its store paths, chosen once at start-up:

- ``overlay``: each regular file is an empty sparse file of the right size and mode with
  xattrs ``trusted.overlay.metacopy`` (empty) and ``trusted.overlay.redirect=/<base>/<path>``;
  the store directory is a *data-only* lower layer (``lowerdir=…::STORE``, Linux ≥ 6.5),
  so reads hit the host's files (shared page cache) and nothing is copied.
- ``hardlink``: regular files are hard links to the store's files (same filesystem only).
- ``copy``: regular files are copied (last resort).

Skeletons are built once per store path into a cache (temp dir renamed into place) and
hard-linked into each snapshot, so a second image using the same path costs one link per
file. Everything gets mtime 1, the store's canonical time, so trees are reproducible.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from stowaway.errors import StowawayError

__all__ = ["Mode", "SkeletonCache", "materialise", "probe_data_only_overlay"]

Mode = Literal["overlay", "hardlink", "copy"]

METACOPY = "trusted.overlay.metacopy"
REDIRECT = "trusted.overlay.redirect"
CANONICAL_MTIME = 1


def _walk(src: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of ``src`` and everything below it, parents first."""
    top = os.lstat(src)
    yield "", top
    stack = [""] if stat.S_ISDIR(top.st_mode) else []
    while stack:
        rel = stack.pop()
        with os.scandir(src / rel if rel else src) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            sub = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            yield sub, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(sub)


def _canonical_time(path: Path) -> None:
    os.utime(path, ns=(CANONICAL_MTIME * 10**9,) * 2, follow_symlinks=False)


def _finish_dirs(dirs: Sequence[tuple[Path, int]]) -> None:
    """Set directory modes and times after their children exist (deepest first)."""
    for d, mode in reversed(dirs):
        os.chmod(d, mode)
        _canonical_time(d)


def _copy_tree(src: Path, dest: Path, mode: Mode | Literal["stub"], base: str) -> None:
    """Recreate ``src`` at ``dest``; regular files per ``mode`` (``stub`` = metacopy stub,
    ``overlay`` = hard link into the skeleton cache, ``hardlink``, ``copy``)."""
    dirs: list[tuple[Path, int]] = []
    for rel, st in _walk(src):
        s, d = (src / rel, dest / rel) if rel else (src, dest)
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFDIR:
            d.mkdir(0o700)
            dirs.append((d, stat.S_IMODE(st.st_mode)))
        elif kind == stat.S_IFLNK:
            os.symlink(os.readlink(s), d)
            _canonical_time(d)
        elif kind == stat.S_IFREG:
            if mode in ("overlay", "hardlink"):
                os.link(s, d)
                continue  # shares the inode: mode, xattrs and times come with it
            if mode == "copy":
                shutil.copyfile(s, d)  # copy_file_range/sendfile: no Python byte loop
            else:
                fd = os.open(d, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.ftruncate(fd, st.st_size)  # sparse: size without blocks
                finally:
                    os.close(fd)
                os.setxattr(d, METACOPY, b"")
                os.setxattr(d, REDIRECT, f"/{base}/{rel}".rstrip("/").encode())
            os.chmod(d, stat.S_IMODE(st.st_mode))
            _canonical_time(d)
        else:
            raise StowawayError(f"{s}: unsupported file type in a store path (mode {st.st_mode:o})")
    _finish_dirs(dirs)


class SkeletonCache:
    """``<dir>/<basename>``: the metacopy skeleton of one store path, built once."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, basename: str) -> Path:
        return self.dir / basename

    def ensure(self, basename: str, source: Path) -> Path:
        """The skeleton of ``source`` (a store path on disk), building it if missing."""
        final = self.path(basename)
        if os.path.lexists(final):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{basename[:8]}-", dir=self.dir))
        try:
            _copy_tree(source, tmp / "t", "stub", basename)
            try:
                os.rename(tmp / "t", final)
            except OSError as e:  # a concurrent builder won: its tree is identical
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def prune(self, keep: set[str]) -> None:
        """Drop skeletons (and stale temp dirs) of store paths no snapshot uses."""
        for entry in self.dir.iterdir():
            if entry.name not in keep:
                _rmtree(entry)


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


def materialise(
    mode: Mode, paths: Sequence[tuple[str, Path]], fs: Path, skeletons: SkeletonCache
) -> None:
    """Fill snapshot directory ``fs`` with ``nix/store/<basename>`` for each
    (basename, location on disk) in ``paths``."""
    store = fs / "nix" / "store"
    store.mkdir(parents=True)
    for base, source in paths:
        src = skeletons.ensure(base, source) if mode == "overlay" else source
        _copy_tree(src, store / base, mode, base)
    _finish_dirs([(fs / "nix", 0o755), (store, 0o755)])


def probe_data_only_overlay(workdir: Path) -> str | None:
    """Mount a tiny data-only overlay once and read through a metacopy redirect.

    Returns None when it works, else why not (for the start-up log)."""
    base = Path(tempfile.mkdtemp(prefix="probe-", dir=workdir))
    skel, data, upper, work, mnt = (base / n for n in ("l", "d", "u", "w", "m"))
    try:
        for d in (skel, data, upper, work, mnt):
            d.mkdir()
        (data / "x").write_bytes(b"probe")
        fd = os.open(skel / "x", os.O_WRONLY | os.O_CREAT, 0o444)
        os.ftruncate(fd, 5)
        os.close(fd)
        try:
            os.setxattr(skel / "x", METACOPY, b"")
            os.setxattr(skel / "x", REDIRECT, b"/x")
        except OSError as e:
            return f"cannot set trusted.overlay xattrs in {workdir}: {e.strerror}"
        opts = (
            f"lowerdir={skel}::{data},upperdir={upper},workdir={work},metacopy=on,redirect_dir=on"
        )
        r = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            return f"data-only overlay mount failed: {r.stderr.strip()}"
        try:
            got = (mnt / "x").read_bytes()
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
        return None if got == b"probe" else f"redirect read gave {got!r}, not b'probe'"
    finally:
        shutil.rmtree(base, ignore_errors=True)
