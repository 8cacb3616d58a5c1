"""Which local blob files (the layer cache, served in place) hold their digest.

Resolver output is served straight from the layer cache with sendfile, so nobody
hashes it on the way out; this is where it is hashed instead, once per version of
the file. A file is known by (device, inode, mtime, size): rewriting or replacing
it (a damaged write, another build renaming a new copy into place) changes that
key, so the next use hashes it again, while an unchanged file costs one ``stat``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from stowaway.registry.storage import CHUNK

#: Files remembered before the memory is cleared (each entry is ~200 bytes).
MAX_ENTRIES = 100_000

_Stamp = tuple[int, int, int, int]


def _stamp(st: os.stat_result) -> _Stamp:
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class VerifiedFiles:
    """Remembers the files found to hold their digest (see module docstring)."""

    def __init__(self) -> None:
        self._good: dict[str, _Stamp] = {}

    def tracks(self, digest: str) -> bool:
        """Whether a file for ``digest`` was verified (and so should be re-checked)."""
        return digest in self._good

    async def check(self, digest: str, path: Path) -> bool:
        """True when ``path`` exists and holds ``digest``; hashes (in a thread) only
        when the file changed since it last passed."""
        try:
            before = _stamp(os.stat(path))
        except FileNotFoundError:
            self._good.pop(digest, None)
            return False
        if self._good.get(digest) == before:
            return True
        try:
            actual = await asyncio.to_thread(_sha256_file, path)
            after = _stamp(os.stat(path))
        except FileNotFoundError:
            actual, after = "", before
        if actual != digest or after != before:  # damaged, or changed while hashing
            self._good.pop(digest, None)
            return False
        if len(self._good) >= MAX_ENTRIES:
            self._good.clear()
        self._good[digest] = before
        return True
