"""Fetch store paths from signature-checked binary caches into a writable local store.

Why: a node whose shared store (SAN/NFS, mounted read-only) lacks a path can still skip
the registry download by substituting the path from a Nix binary cache. The NAR is
unpacked into ``<local>/.tmp-…`` and renamed into place only after the cache's NarHash
and NarSize checked out (``BinaryCache.entries`` verifies them when the stream ends), so
a crash or a corrupt download never leaves a half path that looks valid. Files get the
store's canonical form: 0444/0555, directories 0555, mtime 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from stowaway.errors import StowawayError
from stowaway.runtime.skeleton import CANONICAL_MTIME
from stowaway.store.binary_cache import BinaryCache
from stowaway.store.model import STORE_DIR

__all__ = ["Substituter"]

log = logging.getLogger(__name__)
_NS = CANONICAL_MTIME * 10**9


class Substituter:
    """Tries each cache in order; ``fetch`` returns the path on disk or None."""

    def __init__(self, caches: Sequence[BinaryCache], local_store: Path) -> None:
        self.caches = list(caches)
        self.local_store = local_store

    def fetch(self, basename: str) -> Path | None:
        final = self.local_store / basename
        for cache in self.caches:
            try:
                if cache.narinfo(f"{STORE_DIR}/{basename}") is None:
                    continue
                self._unpack(cache, basename, final)
            except StowawayError as e:
                log.warning("substituting %s from %s failed: %s", basename, cache.url, e)
                continue
            log.info("substituted %s from %s into %s", basename, cache.url, self.local_store)
            return final
        return None

    def _unpack(self, cache: BinaryCache, basename: str, final: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{basename[:8]}-", dir=self.local_store))
        try:
            root = tmp / "p"
            dirs: list[Path] = []
            for entry in cache.entries(f"{STORE_DIR}/{basename}"):
                dest = root / os.fsdecode(entry.path) if entry.path else root
                if entry.kind == "directory":
                    dest.mkdir()
                    dirs.append(dest)
                elif entry.kind == "symlink":
                    os.symlink(os.fsdecode(entry.target), dest)
                    os.utime(dest, ns=(_NS, _NS), follow_symlinks=False)
                else:
                    with open(dest, "xb", buffering=0) as f:
                        for chunk in entry.chunks:
                            f.write(chunk)
                        os.fsync(f.fileno())
                    os.chmod(dest, 0o555 if entry.executable else 0o444)
                    os.utime(dest, ns=(_NS, _NS))
            for d in reversed(dirs):
                os.chmod(d, 0o555)
                os.utime(d, ns=(_NS, _NS))
            if os.path.lexists(final):
                return  # a concurrent fetch won; same hash, same contents
            os.rename(root, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # root: read-only modes do not stop it
