"""Stores on this machine: a Nix store with its database, or a bare store directory.

The *logical* store dir (what paths are called, ``/nix/store``) is kept separate
from the *physical* directory the files are read from, so a store mounted elsewhere
(``/mnt/san/nix/store``) yields the same paths and the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from stowaway.errors import InvalidStorePath, PathNotFound, StowawayError
from stowaway.store import nixbase32
from stowaway.store.model import STORE_DIR, NarEntry, PathInfo, StoreSource
from stowaway.store.nar import dump_path, walk_path
from stowaway.store.paths import StorePath, parse_basename, parse_store_path
from stowaway.store.scan import scan_references

__all__ = ["DirectoryStore", "LocalStore", "db_path_for"]


def db_path_for(store_dir: str | os.PathLike[str]) -> Path:
    """Where Nix keeps the database of a store: ``<store_dir>/../var/nix/db/db.sqlite``."""
    return Path(store_dir).parent / "var" / "nix" / "db" / "db.sqlite"


def _hex_to_nix32(value: str, where: str) -> str:
    algo, _, digest = value.partition(":")
    try:
        raw = bytes.fromhex(digest) if len(digest) == 64 else nixbase32.decode(digest)
    except (ValueError, StowawayError):
        raise StowawayError(f"{where}: unreadable hash {value!r}") from None
    return f"{algo}:{nixbase32.encode(raw)}"


class _PathsOnDisk:
    """Mapping between logical store paths and files in a physical directory."""

    def __init__(self, physical_dir: str | os.PathLike[str], logical_store_dir: str) -> None:
        self.physical_dir = Path(physical_dir)
        self.logical_store_dir = logical_store_dir.rstrip("/")

    def parse(self, path: str) -> StorePath:
        return parse_store_path(path, self.logical_store_dir)

    def on_disk(self, path: str) -> Path:
        return self.physical_dir / self.parse(path).basename

    def walk(self, path: str, source: str) -> Iterator[NarEntry]:
        fs = self.on_disk(path)
        if not os.path.lexists(fs):
            raise PathNotFound(f"{path}: not present in {source} (looked for {fs})")
        return walk_path(fs)


class LocalStore(_PathsOnDisk):
    """A Nix store and its ``db.sqlite``, opened strictly read-only.

    The database is in WAL mode and may be in use by nix at the same time; SQLite's
    read-only mode reads a consistent snapshot without ever writing to it.
    """

    def __init__(
        self,
        store_dir: str | os.PathLike[str] = STORE_DIR,
        db_path: str | os.PathLike[str] | None = None,
        *,
        logical_store_dir: str = STORE_DIR,
    ) -> None:
        super().__init__(store_dir, logical_store_dir)
        self.db_path = Path(db_path) if db_path is not None else db_path_for(store_dir)
        self.name = f"local store {self.physical_dir} (database {self.db_path})"
        if not self.db_path.is_file():
            raise StowawayError(f"no Nix database at {self.db_path} for store {store_dir}")
        uri = f"file:{urllib.parse.quote(str(self.db_path.resolve()))}?mode=ro"
        try:
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        except sqlite3.Error as e:
            raise StowawayError(f"cannot read Nix database {self.db_path}: {e}") from None
        try:
            self._db.execute("SELECT 1 FROM ValidPaths LIMIT 1").fetchall()
        except sqlite3.Error as e:
            self._db.close()
            hint = None
            if "readonly" in str(e) and not os.access(self.db_path.parent, os.W_OK):
                # WAL mode: while nix has changes in db.sqlite-wal, a reader must be able
                # to write the shared-memory index next to it, which this user cannot
                hint = (
                    f"nix is writing the database and this user may not write in "
                    f"{self.db_path.parent}; retry when nix is done, or run as the store's owner"
                )
            message = f"cannot read Nix database {self.db_path}: {e}"
            raise StowawayError(message, hint=hint) from None
        self._lock = threading.Lock()

    def _rows(self, sql: str, args: Sequence[object]) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StowawayError(f"reading Nix database {self.db_path}: {e}") from None

    def _infos(self, rows: Iterable[tuple[object, ...]]) -> dict[str, PathInfo]:
        """Rows of (path, hash, narSize, deriver, sigs, ca, reference or NULL) → infos."""
        grouped: dict[str, tuple[tuple[object, ...], list[str]]] = {}
        for row in rows:
            path = str(row[0])
            entry = grouped.setdefault(path, (row, []))
            if row[6] is not None:
                entry[1].append(str(row[6]))
        out = {}
        for path, (row, refs) in grouped.items():
            _, hash_, size, deriver, sigs, ca, _ = row
            out[path] = PathInfo(
                path=path,
                nar_hash=_hex_to_nix32(str(hash_), f"{self.db_path} row {path}"),
                nar_size=int(str(size or 0)),
                references=tuple(sorted(refs)),
                deriver=str(deriver) if deriver else None,
                sigs=tuple(str(sigs).split()) if sigs else (),
                ca=str(ca) if ca else None,
            )
        return out

    _SELECT = (
        "SELECT v.path, v.hash, v.narSize, v.deriver, v.sigs, v.ca, r2.path"
        " FROM ValidPaths v LEFT JOIN Refs r ON r.referrer = v.id"
        " LEFT JOIN ValidPaths r2 ON r2.id = r.reference"
    )

    def query(self, path: str) -> PathInfo | None:
        self.parse(path)
        return self._infos(self._rows(self._SELECT + " WHERE v.path = ?", [path])).get(path)

    def valid_paths(self, paths: Sequence[str]) -> set[str]:
        """Those of ``paths`` the database lists as valid, in one query."""
        for p in paths:
            self.parse(p)
        marks = ",".join("?" * len(paths))
        rows = self._rows(f"SELECT path FROM ValidPaths WHERE path IN ({marks})", list(paths))
        return {str(r[0]) for r in rows}

    def path_for_hash(self, hash_part: str) -> str | None:
        """The valid path whose hash part is ``hash_part``, or None."""
        prefix = f"{self.logical_store_dir}/{hash_part}"
        # '-' < '.' in ASCII: the range holds exactly the paths "<prefix>-*"
        rows = self._rows(
            "SELECT path FROM ValidPaths WHERE path > ? AND path < ? LIMIT 1",
            [prefix + "-", prefix + "."],
        )
        return str(rows[0][0]) if rows else None

    def closure_infos(self, roots: Iterable[str]) -> dict[str, PathInfo]:
        """Every path in the closure of ``roots`` in one recursive query.

        Raises PathNotFound naming the first root the database does not know.
        """
        roots = sorted(set(roots))
        for r in roots:
            self.parse(r)
        marks = ",".join("?" * len(roots))
        sql = (
            "WITH RECURSIVE closure(id) AS ("
            f" SELECT id FROM ValidPaths WHERE path IN ({marks})"
            " UNION SELECT r.reference FROM Refs r JOIN closure c ON r.referrer = c.id)"
            + self._SELECT
            + " WHERE v.id IN (SELECT id FROM closure)"
        )
        infos = self._infos(self._rows(sql, roots)) if roots else {}
        for r in roots:
            if r not in infos:
                raise PathNotFound(f"{r}: not a valid path in {self.name}")
        return infos

    def entries(self, path: str) -> Iterator[NarEntry]:
        return self.walk(path, self.name)

    def close(self) -> None:
        """Close the database connection (the owner of a LocalStore must: an open
        connection is a file descriptor, and Python 3.13 warns about leaked ones)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirectoryStore(_PathsOnDisk):
    """A store directory without a database (e.g. a SAN mount of just ``/nix/store``).

    ``query`` computes the NAR hash and size by serialising the path (slow: it reads
    every byte) and takes references from ``reference_sources`` (binary caches that
    know the same path with the same NAR hash) or else scans the NAR for the hash parts
    of the other paths in the directory, the way Nix finds references after a build.
    Results are cached per instance.
    """

    def __init__(
        self,
        physical_dir: str | os.PathLike[str],
        logical_store_dir: str = STORE_DIR,
        *,
        reference_sources: Sequence[StoreSource] = (),
    ) -> None:
        super().__init__(physical_dir, logical_store_dir)
        if not self.physical_dir.is_dir():
            raise StowawayError(f"store directory {self.physical_dir} does not exist")
        self.name = f"store directory {self.physical_dir} (no database)"
        self.reference_sources = list(reference_sources)
        self._cache: dict[str, PathInfo] = {}
        self._candidates: dict[str, str] | None = None
        self._lock = threading.Lock()

    def _hash_to_basename(self) -> dict[str, str]:
        """Hash part → basename of the paths in the directory (``.lock`` files lose)."""
        if self._candidates is None:
            out: dict[str, str] = {}
            for name in sorted(os.listdir(self.physical_dir)):
                try:
                    sp = parse_basename(name)
                except InvalidStorePath:
                    continue
                if sp.hash_part not in out or out[sp.hash_part].endswith(".lock"):
                    out[sp.hash_part] = name
            self._candidates = out
        return self._candidates

    def path_for_hash(self, hash_part: str) -> str | None:
        """The path in the directory whose hash part is ``hash_part``, or None."""
        name = self._hash_to_basename().get(hash_part)
        if name is None or name.endswith(".lock"):
            return None
        return f"{self.logical_store_dir}/{name}"

    def _hash_and_scan(self, fs: Path, scan: bool) -> tuple[str, int, set[str]]:
        """NAR hash and size of ``fs`` and, if ``scan``, the hash parts it mentions;
        one pass over the NAR bytes (which include file names and link targets)."""
        h = hashlib.sha256()
        size = 0

        def hashed() -> Iterator[bytes]:
            nonlocal size
            for chunk in dump_path(fs):
                h.update(chunk)
                size += len(chunk)
                yield chunk

        found: set[str] = set()
        if scan:
            found = scan_references(hashed(), self._hash_to_basename().keys())
        else:
            for _ in hashed():
                pass
        return "sha256:" + nixbase32.encode(h.digest()), size, found

    def _hinted(self, path: str) -> PathInfo | None:
        for src in self.reference_sources:
            try:
                info = src.query(path)
            except StowawayError:
                continue
            if info is not None:
                return info
        return None

    def query(self, path: str) -> PathInfo | None:
        with self._lock:
            if path in self._cache:
                return self._cache[path]
        fs = self.on_disk(path)
        if not os.path.lexists(fs):
            return None
        hint = self._hinted(path)
        nar_hash, size, found = self._hash_and_scan(fs, scan=hint is None)
        if hint is not None and hint.nar_hash == nar_hash:
            refs = hint.references
        else:
            if hint is not None:  # the cache describes different contents: scan instead
                nar_hash, size, found = self._hash_and_scan(fs, scan=True)
            names = self._hash_to_basename()
            refs = tuple(sorted(f"{self.logical_store_dir}/{names[h]}" for h in found))
        info = PathInfo(path=path, nar_hash=nar_hash, nar_size=size, references=refs)
        with self._lock:
            self._cache[path] = info
        return info

    def entries(self, path: str) -> Iterator[NarEntry]:
        return self.walk(path, self.name)
