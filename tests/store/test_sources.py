from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from storetest_helpers import events

from stowaway.errors import PathNotFound, SignatureError
from stowaway.store.binary_cache import BinaryCache
from stowaway.store.local import DirectoryStore, LocalStore
from stowaway.store.narinfo import PublicKey
from stowaway.store.sources import Sources, closure, open_sources


def test_closure_local_equals_nix(
    demo_app: str, demo_closure: list[str], local_store: LocalStore
) -> None:
    assert sorted(closure(local_store, [demo_app])) == sorted(demo_closure)


def test_closure_from_cache_only(
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    demo_app: str,
    demo_closure: list[str],
    local_store: LocalStore,
) -> None:
    with open_sources(None, [signed_caches["zstd"]], [cache_keys["good"]]) as opened:
        src = Sources([s for s in opened.sources if isinstance(s, BinaryCache)])
        infos = closure(src, [demo_app])
    assert sorted(infos) == sorted(demo_closure)
    local = local_store.closure_infos([demo_app])
    assert {p: (i.nar_hash, i.references) for p, i in infos.items()} == {
        p: (i.nar_hash, i.references) for p, i in local.items()
    }


def test_missing_reference_names_referrer_and_sources(
    tmp_path: Path, signed_caches: dict[str, str], demo_app: str, demo_closure: list[str]
) -> None:
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    root = tmp_path / "c"
    subprocess.run(["cp", "-a", signed_caches["xz"].removeprefix("file://"), str(root)], check=True)
    (root / (Path(busybox).name[:32] + ".narinfo")).unlink()
    src = Sources([BinaryCache(f"file://{root}", [], require_signatures=False)])
    with pytest.raises(PathNotFound) as exc:
        closure(src, [demo_app])
    msg = str(exc.value)
    assert busybox in msg and f"referenced by {demo_app}" in msg and f"file://{root}" in msg


def test_priority_and_untrusted_first_cache(
    unsigned_cache: str,
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    demo_app: str,
    local_store: LocalStore,
) -> None:
    key = [PublicKey.parse(cache_keys["good"])]
    first = BinaryCache(unsigned_cache, key)
    second = BinaryCache(signed_caches["bzip2"], key)
    src = Sources([first, second])
    hit = src.find(demo_app)
    assert hit is not None and hit[0] is second  # the untrusted copy is passed over
    assert events(src.entries(demo_app)) == events(local_store.entries(demo_app))
    with pytest.raises(SignatureError):
        Sources([first]).query(demo_app)


def test_open_sources_default_is_local_then_caches(signed_caches: dict[str, str]) -> None:
    with open_sources(None, [signed_caches["xz"]], [], require_sigs=False) as src:
        assert [type(s) for s in src.sources] == [LocalStore, BinaryCache]


def test_open_sources_directory_store_uses_cache_references(
    copied_store: Path,
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    demo_app: str,
    demo_closure: list[str],
) -> None:
    src = open_sources(str(copied_store), [signed_caches["none"]], [cache_keys["good"]])
    d = src.sources[0]
    assert isinstance(d, DirectoryStore) and d.reference_sources == src.sources[1:]
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    subprocess.run(["rm", "-rf", str(copied_store / Path(busybox).name)], check=True)
    # busybox is gone from the directory, so scanning could not find it: the reference
    # comes from the cache's narinfo, and busybox itself from the cache
    info = d.query(demo_app)
    assert info is not None and busybox in info.references
    infos = closure(src, [demo_app])
    assert sorted(infos) == sorted(demo_closure)
    assert src.find(demo_app)[0] is d and src.find(busybox)[0] is src.sources[1]  # type: ignore[index]


def test_open_sources_store_with_db_is_local(tmp_path: Path) -> None:
    store = tmp_path / "nix" / "store"
    store.mkdir(parents=True)
    db = tmp_path / "nix" / "var" / "nix" / "db"
    db.mkdir(parents=True)
    subprocess.run(["cp", "/nix/var/nix/db/db.sqlite", str(db)], check=True)
    with open_sources(str(store), [], []) as src:
        assert isinstance(src.sources[0], LocalStore)
        assert re.search(str(store), src.name)


def test_path_for_hash_in_every_kind_of_source(
    demo_app: str,
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    copied_store: Path,
    local_store: LocalStore,
) -> None:
    hash_part = demo_app.split("/")[-1][:32]
    unknown = "0" * 32
    cache = BinaryCache(signed_caches["xz"], [PublicKey.parse(cache_keys["good"])])
    for src in (local_store, DirectoryStore(copied_store), cache):
        assert src.path_for_hash(hash_part) == demo_app, src.name
        assert src.path_for_hash(unknown) is None, src.name
    untrusted = BinaryCache(signed_caches["xz"], [PublicKey.parse(cache_keys["other"])])
    # the narinfo names the path, but Sources only answers for paths it can provide
    with pytest.raises(SignatureError):
        Sources([untrusted]).path_for_hash(hash_part)
    assert Sources([DirectoryStore(copied_store), cache]).path_for_hash(hash_part) == demo_app
