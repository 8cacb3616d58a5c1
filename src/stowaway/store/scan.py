"""Reference scanning: which store paths' hash parts occur in some bytes.

This is how Nix itself discovers references after a build, and our fallback when a
store directory has no database. A C-level regex finds runs of Nix base-32
characters; only runs of 32 or more are checked against the candidate set, so bulk
data costs one regex pass, not a Python loop per byte.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

__all__ = ["scan_references"]

_LEN = 32
_RUN = re.compile(rb"[0-9a-df-np-sv-z]{32,}")


def _scan(buf: bytes, candidates: Collection[bytes], found: set[bytes]) -> None:
    for m in _RUN.finditer(buf):
        run = m.group()
        if len(run) == _LEN:
            if run in candidates:
                found.add(run)
        else:  # a longer run: every 32-byte window could be a hash (as in Nix)
            for i in range(len(run) - _LEN + 1):
                if run[i : i + _LEN] in candidates:
                    found.add(run[i : i + _LEN])


def scan_references(chunks: Iterable[bytes], candidates: Collection[str]) -> set[str]:
    """Hash parts from ``candidates`` that occur anywhere in the concatenated ``chunks``.

    A hash split across two chunks is found: the last 31 bytes of what came before
    are scanned together with the first 31 of the next chunk.
    """
    cand = {c.encode() for c in candidates}
    found: set[bytes] = set()
    tail = b""
    for chunk in chunks:
        if tail:
            _scan(tail + chunk[: _LEN - 1], cand, found)
        _scan(chunk, cand, found)
        tail = (tail + chunk)[-(_LEN - 1) :] if len(chunk) < _LEN - 1 else chunk[-(_LEN - 1) :]
    return {f.decode() for f in found}
