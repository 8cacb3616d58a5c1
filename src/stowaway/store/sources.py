"""Several store sources in priority order, closures over them, and the factory the
CLI uses to turn ``--store`` / ``--substituter`` flags into sources."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stowaway.errors import PathNotFound, SignatureError, StowawayError
from stowaway.store.binary_cache import BinaryCache, CacheError
from stowaway.store.local import DirectoryStore, LocalStore, db_path_for
from stowaway.store.model import STORE_DIR, NarEntry, PathInfo, StoreSource
from stowaway.store.narinfo import PublicKey

__all__ = ["Sources", "closure", "open_sources"]

_PARALLEL_QUERIES = 8


class Sources:
    """A priority list of sources; the first one that has a path answers for it."""

    def __init__(self, sources: Sequence[StoreSource]) -> None:
        self.sources = list(sources)
        self.name = "; ".join(s.name for s in self.sources) or "no store sources"

    def close(self) -> None:
        """Close the sources that hold resources (a local store's database)."""
        for src in self.sources:
            if isinstance(src, LocalStore):
                src.close()

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def find(self, path: str) -> tuple[StoreSource, PathInfo] | None:
        """The first source that has ``path`` and its info.

        A cache whose copy is not trusted, or that cannot be reached, is passed over for
        the next one, as Nix does; the first such error is raised only if no later source
        has the path.
        """
        refused: SignatureError | CacheError | None = None
        for src in self.sources:
            try:
                info = src.query(path)
            except (SignatureError, CacheError) as e:
                refused = refused or e
                continue
            if info is not None:
                return src, info
        if refused is not None:
            raise refused
        return None

    def query(self, path: str) -> PathInfo | None:
        hit = self.find(path)
        return hit[1] if hit else None

    def path_for_hash(self, hash_part: str) -> str | None:
        """The full store path with ``hash_part`` that some source can provide, or None
        (``store/<hash>`` image names need it)."""
        for src in self.sources:
            if isinstance(src, LocalStore | DirectoryStore | BinaryCache):
                path = src.path_for_hash(hash_part)
                if path is not None and self.query(path) is not None:
                    return path
        return None

    def entries(self, path: str) -> Iterator[NarEntry]:
        hit = self.find(path)
        if hit is None:
            raise PathNotFound(f"{path}: not found in any source (tried: {self.name})")
        return hit[0].entries(path)


def _lookup(source: StoreSource, path: str) -> tuple[StoreSource, PathInfo] | None:
    if isinstance(source, Sources):
        return source.find(path)
    info = source.query(path)
    return (source, info) if info is not None else None


def closure(source: StoreSource, roots: Iterable[str]) -> dict[str, PathInfo]:
    """Infos of every path reachable from ``roots`` through references.

    Paths answered by a LocalStore bring their whole closure in one database query
    (a valid path's closure is always valid there); other paths are looked up level
    by level, several at a time (binary caches are network round trips).
    Raises PathNotFound naming the missing path, who referenced it and what was tried.
    """
    result: dict[str, PathInfo] = {}
    referrer: dict[str, str | None] = {}
    frontier: list[str] = []
    for r in roots:
        if r not in referrer:
            referrer[r] = None
            frontier.append(r)
    with ThreadPoolExecutor(_PARALLEL_QUERIES) as pool:
        while frontier:
            level = sorted(p for p in frontier if p not in result)
            frontier = []
            hits = pool.map(lambda p: _lookup(source, p), level)
            for path, hit in zip(level, hits, strict=True):
                if path in result:
                    continue
                if hit is None:
                    who = referrer[path]
                    by = f"referenced by {who}" if who else "requested as a root"
                    raise PathNotFound(f"{path} ({by}) not found; tried: {source.name}")
                src, info = hit
                infos = src.closure_infos([path]) if isinstance(src, LocalStore) else {}
                infos[path] = info
                for p, i in infos.items():
                    result.setdefault(p, i)
                for i in infos.values():
                    for ref in i.references:
                        if ref not in result and ref not in referrer:
                            referrer[ref] = i.path
                            frontier.append(ref)
    return result


def open_sources(
    store: str | None,
    substituters: Sequence[str],
    trusted_keys: Sequence[str],
    require_sigs: bool = True,
    *,
    logical_store_dir: str = STORE_DIR,
    keys_from: str = "--trusted-public-key",
) -> Sources:
    """Sources for the CLI: the local store first, then binary caches in order.

    ``store`` is a physical store directory (e.g. a SAN mount of ``/nix/store``);
    with a database next to it (``../var/nix/db/db.sqlite``) it is a LocalStore,
    otherwise a DirectoryStore that takes references from the caches' narinfos and
    scans file contents only as a fallback. Without ``store`` the system store is used
    if its database exists. ``keys_from`` says where ``trusted_keys`` came from (for
    the hint when a cache's signature is refused).
    """
    keys = [PublicKey.parse(k) for k in trusted_keys]
    caches = [
        BinaryCache(
            u,
            keys,
            require_signatures=require_sigs,
            store_dir=logical_store_dir,
            keys_from=keys_from,
        )
        for u in substituters
    ]
    local: list[StoreSource] = []
    if store is None:
        if db_path_for(STORE_DIR).is_file() and logical_store_dir == STORE_DIR:
            local.append(LocalStore(STORE_DIR))
    else:
        phys = Path(os.path.abspath(store))
        if db_path_for(phys).is_file():
            local.append(LocalStore(phys, logical_store_dir=logical_store_dir))
        else:
            local.append(DirectoryStore(phys, logical_store_dir, reference_sources=caches))
    if not local and not caches:
        raise StowawayError(
            f"no store to read from: {db_path_for(STORE_DIR)} does not exist",
            hint="pass --store DIR or --substituter URL",
        )
    return Sources([*local, *caches])
