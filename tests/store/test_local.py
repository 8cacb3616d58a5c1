from __future__ import annotations

import hashlib
import sqlite3
import subprocess
from pathlib import Path

import pytest
from storetest_helpers import events

from stowaway.errors import PathNotFound, StowawayError
from stowaway.store.local import DirectoryStore, LocalStore, db_path_for
from stowaway.store.nar import nar_hash_and_size, walk_path


def nix_refs(path: str) -> list[str]:
    out = subprocess.run(["nix-store", "-q", "--references", path], capture_output=True, text=True)
    return sorted(out.stdout.split())


def test_query_matches_nix(demo_closure: list[str], local_store: LocalStore) -> None:
    store = local_store
    for path in demo_closure:
        info = store.query(path)
        assert info is not None and info.path == path
        assert list(info.references) == nix_refs(path)
        assert info.nar_hash.startswith("sha256:") and len(info.nar_hash) == 7 + 52
        assert info.deriver and info.deriver.endswith(".drv")
    assert store.query("/nix/store/00000000000000000000000000000000-missing") is None


def test_valid_paths_is_one_lookup_for_many(
    demo_closure: list[str], local_store: LocalStore
) -> None:
    missing = "/nix/store/00000000000000000000000000000000-missing"
    assert local_store.valid_paths([*demo_closure, missing]) == set(demo_closure)
    assert local_store.valid_paths([]) == set()
    with pytest.raises(StowawayError, match="not-a-store-path"):
        local_store.valid_paths(["/tmp/not-a-store-path"])


def test_closure_equals_nix_store_qR(
    demo_app: str, demo_closure: list[str], local_store: LocalStore
) -> None:
    infos = local_store.closure_infos([demo_app])
    assert sorted(infos) == sorted(demo_closure)
    with pytest.raises(PathNotFound, match="00000000000000000000000000000000-missing"):
        local_store.closure_infos(["/nix/store/00000000000000000000000000000000-missing"])


def test_entries_walk_the_disk(demo_app: str, local_store: LocalStore) -> None:
    assert events(local_store.entries(demo_app)) == events(walk_path(demo_app))


def test_missing_db_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StowawayError, match=f"no Nix database at {tmp_path}"):
        LocalStore(tmp_path / "nix" / "store")


def db_digest(db: Path) -> str:
    return hashlib.sha256(db.read_bytes()).hexdigest()


def test_store_mounted_elsewhere_reads_wal_db_while_written(
    tmp_path: Path, demo_app: str, demo_closure: list[str]
) -> None:
    """A copy of the store + db elsewhere: logical paths stay /nix/store, bytes come from
    the copy; reading works while another connection holds a write transaction."""
    store = tmp_path / "nix" / "store"
    store.mkdir(parents=True)
    subprocess.run(["cp", "-a", *demo_closure, str(store)], check=True)
    db = db_path_for(store)
    db.parent.mkdir(parents=True)
    src = sqlite3.connect("file:/nix/var/nix/db/db.sqlite?mode=ro", uri=True)
    dst = sqlite3.connect(db)
    src.backup(dst)
    src.close()
    dst.execute("PRAGMA journal_mode=WAL")
    dst.commit()
    # a writer like nix: committed rows sit in the WAL, and a transaction stays open
    dst.execute("UPDATE ValidPaths SET narSize = narSize WHERE path = ?", (demo_app,))
    dst.commit()
    dst.execute("BEGIN IMMEDIATE")
    dst.execute("DELETE FROM Refs")
    assert (db.parent / "db.sqlite-wal").exists()
    before = db_digest(db)

    with LocalStore(store) as local:
        infos = local.closure_infos([demo_app])
        assert sorted(infos) == sorted(demo_closure)  # uncommitted delete is invisible
        assert infos[demo_app].nar_hash == nar_hash_and_size(store / Path(demo_app).name)[0]
        assert events(local.entries(demo_app)) == events(walk_path(demo_app))
        with pytest.raises(PathNotFound, match=str(store)):
            list(local.entries("/nix/store/00000000000000000000000000000000-gone"))
    dst.rollback()
    dst.close()
    assert db_digest(db) == before  # we never wrote


def test_directory_store_scans_references_like_nix(
    copied_store: Path, demo_closure: list[str], local_store: LocalStore
) -> None:
    d = DirectoryStore(copied_store)
    db = local_store
    for path in demo_closure:
        mine, theirs = d.query(path), db.query(path)
        assert mine is not None and theirs is not None
        assert mine.references == theirs.references
        assert (mine.nar_hash, mine.nar_size) == (theirs.nar_hash, theirs.nar_size)
        assert events(d.entries(path)) == events(walk_path(path))
    assert d.query("/nix/store/00000000000000000000000000000000-missing") is None


def test_directory_store_prefers_paths_over_lock_files(
    copied_store: Path, demo_app: str, demo_closure: list[str]
) -> None:
    for p in demo_closure:
        (copied_store / (Path(p).name + ".lock")).write_bytes(b"")
    info = DirectoryStore(copied_store).query(demo_app)
    assert info is not None and list(info.references) == nix_refs(demo_app)


def test_directory_store_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(StowawayError, match="does not exist"):
        DirectoryStore(tmp_path / "nope")


def test_directory_store_copy_is_independent(
    copied_store: Path, demo_app: str, local_store: LocalStore
) -> None:
    """Changing the copy changes the computed hash: it really reads the directory."""
    target = copied_store / Path(demo_app).name
    target.chmod(0o755)
    (target / "extra").write_bytes(b"x")
    info, original = DirectoryStore(copied_store).query(demo_app), local_store.query(demo_app)
    assert info is not None and original is not None
    assert info.nar_hash != original.nar_hash and info.nar_size > original.nar_size
