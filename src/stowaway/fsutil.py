"""Atomic file publication: the one way stowaway writes a file that others read.

A file is written to a temp file in its destination directory (so the rename
stays on one filesystem and is atomic), optionally fsynced, given its final mode
and renamed into place; the directory is fsynced after the rename when ``sync``
is set, so the new name survives a crash too. A failure at any step removes the
temp file: readers see the old file or the new one, never a torn one.

Files get mode 0644 by default whatever the umask (``fchmod`` ignores it): the
layer cache is shared by ``build`` and by ``serve`` running as another user, and
OCI layouts hard-link cache files, so every path must produce the same mode.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

#: Mode of every published file: readable by all, writable by the owner.
FILE_MODE = 0o644
#: Temp files start with this (never a valid digest, tag or index name).
TEMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Persist the directory entry changes (renames) made in ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: Path, dest: Path, *, mode: int = FILE_MODE, sync: bool = True) -> None:
    """Give the finished file ``temp`` its mode and rename it to ``dest`` (same
    filesystem). The caller has already synced the data if it wanted to."""
    os.chmod(temp, mode)
    os.replace(temp, dest)
    if sync:
        fsync_dir(dest.parent)


class AtomicFile:
    """A temp file in ``directory``; ``commit(dest)`` publishes it, leaving the block
    without a commit removes it. Use as a context manager."""

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
        self.path = Path(name)
        self.file: BinaryIO = os.fdopen(fd, "wb", buffering=1 << 20)
        self.committed = False

    def commit(self, dest: Path, *, mode: int = FILE_MODE, sync: bool = True) -> None:
        """Flush, optionally fsync, set ``mode`` and rename the file to ``dest``."""
        self.file.flush()
        if sync:
            os.fsync(self.file.fileno())
        os.fchmod(self.file.fileno(), mode)
        self.file.close()
        os.replace(self.path, dest)
        self.committed = True
        if sync:
            fsync_dir(dest.parent)

    def discard(self) -> None:
        """Close and remove the temp file unless it was committed (idempotent)."""
        self.file.close()
        if not self.committed:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()


def atomic_write(
    path: Path,
    data: bytes | Callable[[BinaryIO], object],
    *,
    mode: int = FILE_MODE,
    sync: bool = True,
) -> None:
    """Replace ``path`` with ``data`` (bytes, or a function writing to the file),
    creating the parent directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path.parent) as f:
        if isinstance(data, bytes):
            f.file.write(data)
        else:
            data(f.file)
        f.commit(path, mode=mode, sync=sync)
