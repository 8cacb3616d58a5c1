"""Snapshot metadata in SQLite (WAL): rows, parent links, labels and store-path uses.

Why SQLite: every change is one transaction, so a crash leaves either the old or the
new state, never half of one; a restarted snapshotter reads back exactly what it served.
File work (directories, stub trees) happens outside this module; callers order it so a
crash leaves at most an orphan directory, which ``Cleanup`` removes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stowaway.runtime.snapshotter.contract import (
    AlreadyExists,
    FailedPrecondition,
    Info,
    Kind,
    NotFound,
)

__all__ = ["MetaStore", "Record"]

#: A snapshot with its parent's key; columns 0-5 make an Info (see ``_info``).
_SELECT_INFO = (
    "SELECT s.key, COALESCE(p.key, ''), s.kind, s.created_ns, s.updated_ns, s.labels,"
    " s.id, s.size, s.inodes, s.nix FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
)
#: (id, nix) of snapshot ?'s ancestors, nearest first, in one statement.
_CHAIN = (
    "WITH RECURSIVE up(id, depth) AS ("
    " SELECT parent_id, 1 FROM snapshots WHERE id = ?"
    " UNION ALL SELECT s.parent_id, up.depth + 1 FROM snapshots s JOIN up ON s.id = up.id)"
    " SELECT up.id, s.nix FROM up JOIN snapshots s ON s.id = up.id ORDER BY up.depth"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    nix INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS store_paths (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, path)
);
CREATE INDEX IF NOT EXISTS store_paths_path ON store_paths(path);
CREATE TABLE IF NOT EXISTS verified_layers (
    key TEXT PRIMARY KEY,
    diff_id TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Record:
    """One snapshot row plus its parent chain (ids, nearest first)."""

    id: int
    key: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str]
    size: int
    inodes: int
    nix: bool
    chain: tuple[int, ...] = ()
    chain_nix: tuple[bool, ...] = field(default=())

    def info(self) -> Info:
        return Info(
            self.key, self.parent, self.kind, self.created_ns, self.updated_ns, dict(self.labels)
        )


def _info(row: tuple[Any, ...]) -> Info:
    key, parent, kind, created, updated, labels = row[:6]
    return Info(key, parent, Kind(kind), created, updated, json.loads(labels))


class MetaStore:
    """Thread-safe access to ``<root>/metadata.db``: each write method is one
    transaction, reads are plain statements under the same lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def verified_diff_id(self, key: str) -> str | None:
        """The diff_id remembered for a store layer's (paths, tar settings) ``key``."""
        with self._lock:
            row = self._db.execute(
                "SELECT diff_id FROM verified_layers WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else str(row[0])

    def remember_diff_id(self, key: str, diff_id: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO verified_layers (key, diff_id) VALUES (?, ?)",
                (key, diff_id),
            )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT; rolled back on any exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ reads

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """Reads take only the lock, no BEGIN: this process is the database's only
        writer and writes under the same lock, so the statements see one state."""
        with self._lock:
            yield self._db

    def _row(self, db: sqlite3.Connection, key: str) -> Record:
        row = db.execute(_SELECT_INFO + " WHERE s.key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        chain = db.execute(_CHAIN, (row[6],)).fetchall()
        return Record(
            id=row[6],
            key=row[0],
            parent=row[1],
            kind=Kind(row[2]),
            created_ns=row[3],
            updated_ns=row[4],
            labels=json.loads(row[5]),
            size=row[7],
            inodes=row[8],
            nix=bool(row[9]),
            chain=tuple(i for i, _ in chain),
            chain_nix=tuple(bool(n) for _, n in chain),
        )

    def get(self, key: str) -> Record:
        with self._reading() as db:
            return self._row(db, key)

    def kind_of(self, key: str) -> Kind | None:
        with self._reading() as db:
            row = db.execute("SELECT kind FROM snapshots WHERE key = ?", (key,)).fetchone()
        return Kind(row[0]) if row else None

    def info(self, key: str) -> Info:
        """What Stat answers: one row, no parent chain."""
        with self._reading() as db:
            row = db.execute(_SELECT_INFO + " WHERE s.key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return _info(row)

    def infos(self, labels: Mapping[str, str] | None = None) -> list[Info]:
        """Every snapshot, or (a superset of) those carrying all of ``labels``.

        containerd lists with a ``containerd.io/snapshot.ref`` filter after each layer
        of a pull, so that case must not decode every row. The prefilter looks for the
        pair as ``json.dumps`` wrote it into the labels column (same encoder, and quotes
        inside JSON strings are escaped, so a labelled row always matches); callers
        apply the full filter to what comes back."""
        sql, args = _SELECT_INFO, []
        if labels:
            sql += " WHERE " + " AND ".join("instr(s.labels, ?) > 0" for _ in labels)
            args = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in labels.items()]
        with self._reading() as db:
            rows = db.execute(sql + " ORDER BY s.id", args).fetchall()
        return [_info(r) for r in rows]

    def ids(self) -> set[int]:
        with self._reading() as db:
            return {i for (i,) in db.execute("SELECT id FROM snapshots")}

    def nix_ids(self) -> set[int]:
        """Snapshots committed from the store (their trees can be rebuilt from it)."""
        with self._reading() as db:
            return {i for (i,) in db.execute("SELECT id FROM snapshots WHERE nix = 1")}

    def paths_of(self, sid: int) -> list[str]:
        """The store paths (on disk) snapshot ``sid`` uses."""
        with self._reading() as db:
            q = "SELECT path FROM store_paths WHERE snapshot_id = ? ORDER BY path"
            return [p for (p,) in db.execute(q, (sid,))]

    def users_of(self, paths: Sequence[str]) -> dict[str, list[int]]:
        """The snapshots using each store path (on disk), in one query; paths nobody
        uses are absent."""
        out: dict[str, list[int]] = {}
        marks = ",".join("?" * len(paths))
        q = f"SELECT path, snapshot_id FROM store_paths WHERE path IN ({marks})"
        q += " ORDER BY snapshot_id"
        with self._reading() as db:
            for path, sid in db.execute(q, list(paths)):
                out.setdefault(path, []).append(sid)
        return out

    def store_paths(self) -> set[str]:
        """Every store path some snapshot uses (what must stay GC-rooted)."""
        with self._reading() as db:
            return {p for (p,) in db.execute("SELECT DISTINCT path FROM store_paths")}

    # ------------------------------------------------------------------ writes

    def create(
        self,
        db: sqlite3.Connection,
        key: str,
        parent: str,
        kind: Kind,
        labels: Mapping[str, str],
        *,
        nix: bool = False,
        paths: Sequence[str] = (),
        size: int = 0,
        inodes: int = 0,
    ) -> Record:
        """Insert a snapshot inside the caller's transaction (so the caller can move its
        directory into place before COMMIT)."""
        if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
            raise AlreadyExists(f"snapshot {key!r} already exists")
        parent_id = None
        chain: tuple[int, ...] = ()
        chain_nix: tuple[bool, ...] = ()
        if parent:
            p = self._row(db, parent)
            if p.kind != Kind.COMMITTED:
                raise FailedPrecondition(
                    f"parent {parent!r} is {p.kind.name.lower()}, not committed"
                )
            parent_id, chain, chain_nix = p.id, (p.id, *p.chain), (p.nix, *p.chain_nix)
        now = time.time_ns()
        cur = db.execute(
            "INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns, labels,"
            " size, inodes, nix) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, parent_id, int(kind), now, now, json.dumps(dict(labels)), size, inodes, nix),
        )
        sid = cur.lastrowid
        assert sid is not None
        db.executemany(
            "INSERT OR IGNORE INTO store_paths (snapshot_id, path) VALUES (?, ?)",
            [(sid, p) for p in paths],
        )
        return Record(
            sid, key, parent, kind, now, now, dict(labels), size, inodes, nix, chain, chain_nix
        )

    def commit(
        self, name: str, key: str, labels: Mapping[str, str], size: int, inodes: int
    ) -> Record:
        """Active ``key`` becomes committed ``name`` (same id, so the directory stays)."""
        with self.transaction() as db:
            rec = self._row(db, key)
            if rec.kind != Kind.ACTIVE:
                raise FailedPrecondition(
                    f"snapshot {key!r} is {rec.kind.name.lower()}; only active ones commit"
                )
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                raise AlreadyExists(f"snapshot {name!r} already exists")
            db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated_ns = ?,"
                " size = ?, inodes = ? WHERE id = ?",
                (
                    name,
                    int(Kind.COMMITTED),
                    json.dumps(dict(labels)),
                    time.time_ns(),
                    size,
                    inodes,
                    rec.id,
                ),
            )
            return self._row(db, name)

    def remove(self, key: str) -> Record:
        with self.transaction() as db:
            rec = self._row(db, key)
            if db.execute("SELECT 1 FROM snapshots WHERE parent_id = ?", (rec.id,)).fetchone():
                raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
            db.execute("DELETE FROM store_paths WHERE snapshot_id = ?", (rec.id,))
            db.execute("DELETE FROM snapshots WHERE id = ?", (rec.id,))
            return rec

    def set_labels(self, key: str, labels: Mapping[str, str]) -> Record:
        with self.transaction() as db:
            rec = self._row(db, key)
            db.execute(
                "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                (json.dumps(dict(labels)), time.time_ns(), rec.id),
            )
            return self._row(db, key)
