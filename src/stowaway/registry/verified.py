"""Which local blob files (the layer cache, served in place) hold their digest.

Resolver output is served straight from the layer cache with sendfile, so nobody
hashes it on the way out; this is where it is hashed instead, once per version of
the file. A file is known by (device, inode, mtime, size): rewriting or replacing
it (a damaged write, another build renaming a new copy into place) changes that
key, so the next use hashes it again, while an unchanged file costs one ``stat``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from stowaway.registry.storage_api import hash_file

#: Files remembered before the memory is cleared (each entry is ~200 bytes).
MAX_ENTRIES = 100_000

_Stamp = tuple[int, int, int, int]


def _stamp(st: os.stat_result) -> _Stamp:
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _sha256_file(path: Path) -> str:
    return "sha256:" + hash_file(path)[0].hexdigest()


class VerifiedFiles:
    """Remembers the files found to hold their digest (see module docstring)."""

    def __init__(self) -> None:
        #: keyed by path too: the layer cache's copy and storage's copy of one blob
        #: are different files, and one stamp for both would re-hash each on every pull
        self._good: dict[tuple[str, Path], _Stamp] = {}
        self._digests: set[str] = set()

    def tracks(self, digest: str) -> bool:
        """Whether a file for ``digest`` was verified (and so should be re-checked)."""
        return digest in self._digests

    async def check(self, digest: str, path: Path) -> bool:
        """True when ``path`` exists and holds ``digest``; hashes (in a thread) only
        when the file changed since it last passed."""
        key = (digest, path)
        try:
            before = _stamp(os.stat(path))
        except FileNotFoundError:
            self._good.pop(key, None)
            return False
        if self._good.get(key) == before:
            return True
        try:
            actual = await asyncio.to_thread(_sha256_file, path)
            after = _stamp(os.stat(path))
        except FileNotFoundError:
            actual, after = "", before
        if actual != digest:  # damaged (or gone)
            self._good.pop(key, None)
            return False
        # The file opened held the digest. If another build renamed a new copy into place
        # meanwhile, that copy is not damaged either (writers never write in place), but
        # this stamp is stale: nothing is remembered and the next use hashes again.
        if after == before:
            if len(self._good) >= MAX_ENTRIES:
                self._good.clear()
                self._digests.clear()
            self._good[key] = before
        self._digests.add(digest)
        return True
