"""Where a layer's store paths are: the store (valid in its Nix database, if it has
one), the snapshotter's local store, or substituted into it from binary caches; and
which local-store paths no snapshot needs any more (the local store is ours to
collect)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Collection, Sequence
from concurrent.futures import Executor
from pathlib import Path

from stowaway.errors import StowawayError
from stowaway.runtime.snapshotter.files import rmtree
from stowaway.runtime.snapshotter.state import SnapshotterConfig
from stowaway.runtime.substitute import FETCH_PREFIX, Substituter
from stowaway.store.binary_cache import BinaryCache
from stowaway.store.local import LocalStore, db_path_for
from stowaway.store.narinfo import PublicKey
from stowaway.store.paths import is_basename

__all__ = ["StorePaths"]

#: Local-store entries being deleted by ``cleanup`` (renamed first, then removed).
GC_PREFIX = ".gc-"


class StorePaths:
    """Finds store paths by basename for the snapshotter; ``pool`` runs substitutions.
    Opening it removes what a crash left in the local store (no fetch of ours runs yet)."""

    def __init__(self, config: SnapshotterConfig, pool: Executor) -> None:
        self.store = config.store
        self.local_store = config.local_store
        self._pool = pool
        self.substituter = _substituter(config)
        # presence in the Nix database means a path is valid (complete), not being built
        self._db = LocalStore(config.store) if db_path_for(config.store).is_file() else None
        if self.local_store:
            self._drop_entries((GC_PREFIX, FETCH_PREFIX))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def present(self, bases: Sequence[str]) -> list[Path | None]:
        """Each path in the store (valid in its database, if it has one), else in the
        local store, else None.

        A path on disk in the store but not valid (still being built) is None even when
        the local store has it: overlay looks data up in the store first (``::store::
        local``), so a layer from the local copy would read the half-built one."""
        valid: set[str] | None = None
        if self._db is not None:
            logical = {b: f"{self._db.logical_store_dir}/{b}" for b in bases}
            ok = self._db.valid_paths(list(logical.values()))
            valid = {b for b, path in logical.items() if path in ok}
        out: list[Path | None] = []
        for b in bases:
            p = self.store / b
            if os.path.lexists(p):
                out.append(p if valid is None or b in valid else None)
            elif self.local_store and os.path.lexists(q := self.local_store / b):
                out.append(q)
            else:
                out.append(None)
        return out

    def locate(self, bases: Sequence[str]) -> list[Path | None]:
        """Each path in the store or local store, else substituted (in parallel); a
        path still being built in the store is not substituted (see ``present``)."""
        found = self.present(bases)
        missing = self._missing(bases, found)
        if missing and self.substituter is not None:
            got = dict(zip(missing, self.substituter.fetch_all(missing, self._pool), strict=True))
            found = [w or got.get(b) for b, w in zip(bases, found, strict=True)]
        return found

    def prefetch(self, bases: Sequence[str]) -> None:
        """Start substituting those of ``bases`` ``locate`` would substitute, without
        waiting: a later ``locate`` of them waits for these fetches."""
        if self.substituter is not None:
            if missing := self._missing(bases, self.present(bases)):
                self.substituter.start(missing, self._pool)

    def _missing(self, bases: Sequence[str], found: Sequence[Path | None]) -> list[str]:
        """The paths found nowhere and not being built in the store."""
        return [
            b
            for b, w in zip(bases, found, strict=True)
            if w is None and not os.path.lexists(self.store / b)
        ]

    def unused(self, keep: Collection[str]) -> list[Path]:
        """The store paths in the local store whose basenames are not in ``keep``.
        Whatever is in it was substituted for a snapshot, and the next pull that needs
        it substitutes it again."""
        if self.local_store is None:
            return []
        return [e for e in self.local_store.iterdir() if e.name not in keep and is_basename(e.name)]

    @staticmethod
    def retire(path: Path) -> None:
        """Take a local-store path out of sight at once (a rename), to delete later."""
        os.rename(path, path.with_name(f"{GC_PREFIX}{secrets.token_hex(4)}-{path.name}"))

    def drop_retired(self) -> None:
        if self.local_store:
            self._drop_entries((GC_PREFIX,))

    def _drop_entries(self, prefixes: tuple[str, ...]) -> None:
        """Remove the local-store entries whose names start with one of ``prefixes``."""
        assert self.local_store is not None
        for e in self.local_store.iterdir():
            if e.name.startswith(prefixes):
                rmtree(e)


def _substituter(config: SnapshotterConfig) -> Substituter | None:
    if not config.substituters:
        return None
    if config.local_store is None:
        raise StowawayError(
            "--substituter needs --local-store DIR: a writable directory for fetched paths"
        )
    keys = [PublicKey.parse(k) for k in config.trusted_public_keys]
    caches = [BinaryCache(u, keys) for u in config.substituters]
    return Substituter(caches, config.local_store)
