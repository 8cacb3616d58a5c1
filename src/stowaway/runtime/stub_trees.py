"""Stub trees: the file trees a stowaway layer's snapshot holds instead of bytes.

Four ways to give a container its store paths, chosen once at start-up:

- ``overlay``: each regular file is an empty sparse file of the right size and mode with
  xattrs ``trusted.overlay.metacopy`` (empty) and ``trusted.overlay.redirect=/<base>/<path>``;
  the store directory is a *data-only* lower layer (``lowerdir=…::STORE``, Linux ≥ 6.5),
  so reads hit the host's files (shared page cache) and nothing is copied. These trees
  hold no data, only inodes, so the snapshotter keeps them on a tmpfs (``stub_layer``):
  creating ~25k inodes with xattrs there takes ~1 s, on a busy ext4 ten times that.
  A store path already stubbed for another layer is hard-linked from it, not rebuilt.
- ``hardlink``: regular files are hard links to the store's files (same filesystem only).
- ``copy``: regular files are copied (last resort).
- ``bind`` (containerd ≥ 1.7): only mount points — an empty directory (or empty file)
  per store path, a symlink store path as itself; containerd bind-mounts each store path
  read-only onto its mount point (``Mount.target``, see ``mounts.py``).

Everything gets mtime 1, the store's canonical time, so trees are reproducible.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import Executor
from pathlib import Path
from typing import Literal

from stowaway.errors import StowawayError

__all__ = ["Mode", "materialise", "probe_data_only_overlay", "stub_layer"]

Mode = Literal["overlay", "bind", "hardlink", "copy"]

METACOPY = "trusted.overlay.metacopy"
REDIRECT = "trusted.overlay.redirect"
CANONICAL_MTIME = 1
_CANON_NS = (CANONICAL_MTIME * 10**9,) * 2
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import: os.umask cannot be read without setting it
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
    os.utime(path, ns=_CANON_NS, follow_symlinks=False)


def _finish_dirs(dirs: Sequence[tuple[Path, int]]) -> None:
    """Set directory modes and times after their children exist (deepest first)."""
    for d, mode in reversed(dirs):
        os.chmod(d, mode)
        _canonical_time(d)


def _copy_tree(src: Path, dest: Path, mode: Mode) -> None:
    """Recreate ``src`` at ``dest``; regular files hard-linked or copied per ``mode``."""
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
            if mode != "copy":
                os.link(s, d)
                continue  # shares the inode: mode, xattrs and times come with it
            shutil.copyfile(s, d)  # copy_file_range/sendfile: no Python byte loop
            os.chmod(d, stat.S_IMODE(st.st_mode))
            _canonical_time(d)
        else:
            raise StowawayError(f"{s}: unsupported file type in a store path (mode {st.st_mode:o})")
    _finish_dirs(dirs)


def _mount_point(src: Path, dest: Path) -> None:
    """What a bind mount of store path ``src`` lands on: an empty directory or file with
    its mode, or (a symlink store path needs no mount) the symlink itself."""
    st = os.lstat(src)
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFDIR:
        dest.mkdir(0o700)
        _finish_dirs([(dest, stat.S_IMODE(st.st_mode))])
        return
    if kind == stat.S_IFLNK:
        os.symlink(os.readlink(src), dest)
    elif kind == stat.S_IFREG:
        dest.touch(0o600)
        os.chmod(dest, stat.S_IMODE(st.st_mode))
    else:
        raise StowawayError(f"{src}: unsupported file type in a store path (mode {st.st_mode:o})")
    _canonical_time(dest)


def materialise(mode: Mode, paths: Sequence[tuple[str, Path]], fs: Path) -> None:
    """Fill snapshot directory ``fs`` with ``nix/store/<basename>`` for each
    (basename, location on disk) in ``paths``, files hard-linked or copied (the
    ``hardlink`` and ``copy`` modes), or mount points only (``bind``); ``overlay`` uses
    ``stub_layer``."""
    store = fs / "nix" / "store"
    store.mkdir(parents=True)
    for base, source in paths:
        if mode == "bind":
            _mount_point(source, store / base)
        else:
            _copy_tree(source, store / base, mode)
    _finish_dirs([(fs / "nix", 0o755), (store, 0o755)])


# ---------------------------------------------------------------- metacopy stubs
# Per-file work below uses directory fds (openat/mkdirat/linkat) and fd-based
# ftruncate/fsetxattr/futimens: no path is resolved twice, ~6 syscalls a file.


def _stub_file(dfd: int, name: str, st: os.stat_result, redirect: bytes) -> None:
    mode = stat.S_IMODE(st.st_mode)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode, dir_fd=dfd)
    try:
        if st.st_size:
            os.ftruncate(fd, st.st_size)  # sparse: size without blocks
        if mode & _UMASK:
            os.chmod(fd, mode)
        os.setxattr(fd, METACOPY, b"")
        os.setxattr(fd, REDIRECT, redirect)
        os.utime(fd, ns=_CANON_NS)
    finally:
        os.close(fd)


def _stub_entry(sfd: int, dfd: int, name: str, st: os.stat_result, redirect: bytes) -> int:
    """Stub ``name`` (lstat ``st``) from directory fd ``sfd`` into ``dfd``; inodes made."""
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFREG:
        _stub_file(dfd, name, st, redirect)
        return 1
    if kind == stat.S_IFLNK:
        os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
        os.utime(name, ns=_CANON_NS, dir_fd=dfd, follow_symlinks=False)
        return 1
    if kind != stat.S_IFDIR:
        raise StowawayError(
            f"{redirect.decode(errors='replace')}: unsupported file type in a store path "
            f"(mode {st.st_mode:o})"
        )
    with _subdir(sfd, dfd, name, st) as (sub_s, sub_d):
        with os.scandir(sub_s) as it:
            entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        return 1 + sum(
            _stub_entry(sub_s, sub_d, child, cst, redirect + b"/" + os.fsencode(child))
            for child, cst in entries
        )


@contextlib.contextmanager
def _subdir(sfd: int, dfd: int, name: str, st: os.stat_result) -> Iterator[tuple[int, int]]:
    """Make directory ``name`` in ``dfd`` (private until filled), yield fds of it and of
    its source in ``sfd``; then give it the source's mode and the canonical mtime."""
    os.mkdir(name, 0o700, dir_fd=dfd)
    sub_s = os.open(name, _DIR_FLAGS, dir_fd=sfd)
    try:
        sub_d = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        try:
            yield sub_s, sub_d
            os.chmod(sub_d, stat.S_IMODE(st.st_mode))
            os.utime(sub_d, ns=_CANON_NS)
        finally:
            os.close(sub_d)
    finally:
        os.close(sub_s)


def _link_entry(sfd: int, dfd: int, name: str) -> int:
    """Hard-link copy of an existing stub tree entry (directories recreated)."""
    st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.link(name, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        return 0  # shares the inode: mode, xattrs and times come with it
    with _subdir(sfd, dfd, name, st) as (sub_s, sub_d):
        return 1 + sum(_link_entry(sub_s, sub_d, child) for child in os.listdir(sub_s))


def _one_path(store_fd: int, base: str, source: Path, stubbed: Path | None) -> int:
    """``<store_fd>/<base>``: linked from an existing stub tree, else stubbed from source."""
    if stubbed is not None:
        sfd = os.open(stubbed.parent, _DIR_FLAGS)
        try:
            return _link_entry(sfd, store_fd, base)
        except OSError:  # that tree was removed while we read it: build afresh
            _remove_entry(store_fd, base)
        finally:
            os.close(sfd)
    sfd = os.open(source.parent, _DIR_FLAGS)
    try:
        st = os.stat(source.name, dir_fd=sfd, follow_symlinks=False)
        return _stub_entry(sfd, store_fd, base, st, b"/" + os.fsencode(source.name))
    finally:
        os.close(sfd)


def _remove_entry(dfd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def stub_layer(
    paths: Sequence[tuple[str, Path]],
    dest: Path,
    pool: Executor,
    stubbed: Callable[[str], Path | None],
) -> int:
    """Build ``dest/nix/store/<base>`` metacopy stubs for each (basename, store path on
    disk); ``dest`` must be an empty directory. ``stubbed(base)`` names an existing stub
    tree of the same path (hard-linked instead of rebuilt). Store paths are done in
    parallel on ``pool`` (the syscalls release the GIL). Returns the inodes made."""
    store = dest / "nix" / "store"
    store.mkdir(parents=True)
    store_fd = os.open(store, _DIR_FLAGS)
    jobs = []
    try:
        jobs = [pool.submit(_one_path, store_fd, b, src, stubbed(b)) for b, src in paths]
        made = sum(j.result() for j in jobs)
    finally:
        # every job ends before the fd closes, also when one failed: a job still running
        # would otherwise write through a closed fd number the next tree may reuse
        futures.wait(jobs)
        os.close(store_fd)
    _finish_dirs([(dest / "nix", 0o755), (store, 0o755)])
    return made + 2


def probe_data_only_overlay(workdir: Path) -> str | None:
    """Mount a tiny data-only overlay once and read through a metacopy redirect.

    Returns None when it works, else why not (for the start-up log)."""
    base = Path(tempfile.mkdtemp(prefix="probe-", dir=workdir))
    stub, data, upper, work, mnt = (base / n for n in ("l", "d", "u", "w", "m"))
    try:
        for d in (stub, data, upper, work, mnt):
            d.mkdir()
        (data / "x").write_bytes(b"probe")
        fd = os.open(stub / "x", os.O_WRONLY | os.O_CREAT, 0o444)
        os.ftruncate(fd, 5)
        os.close(fd)
        try:
            os.setxattr(stub / "x", METACOPY, b"")
            os.setxattr(stub / "x", REDIRECT, b"/x")
        except OSError as e:
            return f"cannot set trusted.overlay xattrs in {workdir}: {e.strerror}"
        opts = (
            f"lowerdir={stub}::{data},upperdir={upper},workdir={work},metacopy=on,redirect_dir=on"
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
