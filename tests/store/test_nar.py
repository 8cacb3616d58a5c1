from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

import pytest
from storetest_helpers import events

from stowaway.errors import NarError, StowawayError
from stowaway.store.local import LocalStore
from stowaway.store.model import NarEntry
from stowaway.store.nar import (
    CHUNK_SIZE,
    dump_path,
    nar_hash_and_size,
    read_nar,
    walk_path,
    write_nar,
)


def nix_dump(path: str | Path) -> bytes:
    return subprocess.run(
        ["nix-store", "--dump", str(path)], check=True, capture_output=True
    ).stdout


def s(data: bytes) -> bytes:
    """One NAR string token."""
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def test_dump_identical_to_nix_for_demo_closure(demo_closure: list[str]) -> None:
    for path in demo_closure:
        assert b"".join(dump_path(path)) == nix_dump(path), path


def test_dump_identical_for_odd_tree(odd_tree: Path, odd_store_path: str) -> None:
    assert b"".join(dump_path(odd_tree)) == nix_dump(odd_tree)
    assert b"".join(dump_path(odd_store_path)) == nix_dump(odd_store_path)


def test_dump_identical_for_system_dir(tmp_path: Path) -> None:
    src = Path("/usr/share/zoneinfo/Europe")  # files and symlinks from the tzdata package
    assert src.is_dir()
    subprocess.run(["cp", "-a", str(src), str(tmp_path / "tz")], check=True)
    assert b"".join(dump_path(tmp_path / "tz")) == nix_dump(tmp_path / "tz")


def test_single_file_and_symlink_roots(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "l").symlink_to("f")
    for name in ("f", "l"):
        assert b"".join(dump_path(tmp_path / name)) == nix_dump(tmp_path / name)


def test_hash_matches_db_and_nix(demo_closure: list[str], local_store: LocalStore) -> None:
    store = local_store
    for path in demo_closure:
        info = store.query(path)
        assert info is not None
        assert nar_hash_and_size(path) == (info.nar_hash, info.nar_size)
        q = subprocess.run(["nix-store", "-q", "--hash", path], capture_output=True, text=True)
        assert info.nar_hash == q.stdout.strip()


def test_read_round_trip_and_walk_equal(odd_tree: Path, demo_closure: list[str]) -> None:
    paths: list[str | Path] = [odd_tree, *demo_closure]
    for path in paths:
        data = nix_dump(path)
        assert events(read_nar(io.BytesIO(data))) == events(walk_path(path))
        assert b"".join(write_nar(read_nar(io.BytesIO(data)))) == data


def test_entry_order_and_flags(odd_tree: Path) -> None:
    evs = list(walk_path(odd_tree))
    paths = [e.path for e in evs]
    assert paths[0] == b""
    top = [p for p in paths if p and b"/" not in p]
    assert top == sorted(top)
    assert top.index(b"B") < top.index(b"a") < top.index(b"a b") < top.index(b"a-b")
    by = {e.path: e for e in evs}
    assert by[b"bin/tool"].executable and not by[b"empty-file"].executable
    assert not by[b"bin/group-exec-only"].executable  # nix looks at the owner x bit only
    assert by[b"bin/link"].kind == "symlink" and by[b"bin/link"].target == b"tool"
    assert by[b"empty-dir"].kind == "directory"


def test_contents_are_chunked_and_skippable(odd_tree: Path) -> None:
    data = nix_dump(odd_tree)
    sizes = []
    for e in read_nar(io.BytesIO(data)):
        if e.kind == "regular" and e.size > CHUNK_SIZE:
            sizes = [len(c) for c in e.chunks]
    assert sum(sizes) == 3 * 1024 * 1024 + 5 and max(sizes) <= CHUNK_SIZE
    # skipping every file's contents still walks the whole archive
    skipped = [(e.path, e.kind) for e in read_nar(io.BytesIO(data))]
    assert skipped == [(e.path, e.kind) for e in walk_path(odd_tree)]


def test_chunks_after_moving_on_raise(odd_tree: Path) -> None:
    it = read_nar(io.BytesIO(nix_dump(odd_tree)))
    first_file = next(e for e in it if e.kind == "regular" and e.size)
    next(it)
    with pytest.raises(StowawayError, match="after the stream moved on"):
        list(first_file.chunks)


def test_partially_read_contents_then_advance(odd_tree: Path) -> None:
    it = read_nar(io.BytesIO(nix_dump(odd_tree)))
    names = []
    for e in it:
        names.append(e.path)
        if e.kind == "regular" and e.size > CHUNK_SIZE:
            next(e.chunks)  # read one chunk, leave the rest
    assert names == [e.path for e in walk_path(odd_tree)]


# --------------------------------------------------------------------- malformed input

SMALL_TREE = [
    NarEntry(b"", "directory"),
    NarEntry(b"a", "regular", size=5, chunks=iter([b"hello"])),
    NarEntry(b"b", "symlink", target=b"a"),
    NarEntry(b"c", "directory"),
    NarEntry(b"c/x", "regular", executable=True, size=0),
]


def valid_nar() -> bytes:
    tree = [NarEntry(e.path, e.kind, e.executable, e.size, e.target) for e in SMALL_TREE]
    tree[1].chunks = iter([b"hello"])
    return b"".join(write_nar(tree))


def mutate(old: bytes, new: bytes) -> tuple[bytes, int]:
    nar = valid_nar()
    assert nar.count(old) == 1, old
    return nar.replace(old, new), nar.index(old)


def expect_error(data: bytes, pattern: str, offset: int | None = None) -> NarError:
    with pytest.raises(NarError, match=pattern) as exc:
        for e in read_nar(io.BytesIO(data)):
            b"".join(e.chunks)
    assert f"at byte {exc.value.offset}" in str(exc.value)
    if offset is not None:
        assert exc.value.offset == offset
    return exc.value


def test_valid_small_nar_reads() -> None:
    assert [e.path for e in read_nar(io.BytesIO(valid_nar()))] == [e.path for e in SMALL_TREE]


def test_bad_magic() -> None:
    expect_error(mutate(b"nix-archive-1", b"nix-archive-2")[0], "bad magic", 0)


def test_unknown_node_type() -> None:
    data, at = mutate(s(b"symlink"), s(b"symlonk"))
    expect_error(data, "unknown node type", at)


def test_unknown_token_in_directory() -> None:
    data, at = mutate(
        s(b"entry") + s(b"(") + s(b"name") + s(b"c"), s(b"entri") + s(b"(") + s(b"name") + s(b"c")
    )
    expect_error(data, "expected 'entry' or '\\)'", at)


@pytest.mark.parametrize(
    "new,pattern",
    [
        (b"/", "invalid entry name"),
        (b"\0", "invalid entry name"),
        (b".", "invalid entry name"),
        (b"", "invalid entry name"),
        (b"..", "invalid entry name"),
    ],
)
def test_bad_entry_names(new: bytes, pattern: str) -> None:
    data, at = mutate(s(b"name") + s(b"a"), s(b"name") + s(new))
    expect_error(data, pattern, at + len(s(b"name")))


@pytest.mark.parametrize("new,pattern", [(b"z", "unsorted"), (b"b", "duplicate")])
def test_unsorted_or_duplicate_names(new: bytes, pattern: str) -> None:
    data, _ = mutate(s(b"name") + s(b"a"), s(b"name") + s(new))
    # reported at the following entry's name ("b"), the first one out of order
    at = data.index(s(b"name") + s(b"b"), data.index(s(b"name") + s(new)) + 1)
    expect_error(data, f"{pattern} entry name b'b'", at + len(s(b"name")))


def test_name_too_long() -> None:
    data, at = mutate(s(b"name") + s(b"a"), s(b"name") + s(b"a" * 256))
    expect_error(data, "entry name has length 256", at + len(s(b"name")))


def test_symlink_target_too_long() -> None:
    data, at = mutate(s(b"target") + s(b"a"), s(b"target") + s(b"a" * 4096))
    expect_error(data, "symlink target has length 4096", at + len(s(b"target")))


def test_token_length_absurd() -> None:
    data, at = mutate(s(b"type") + s(b"symlink"), s(b"type") + struct.pack("<Q", 2**50))
    expect_error(data, "more than the limit", at + len(s(b"type")))


def test_contents_length_absurd() -> None:
    data, at = mutate(
        s(b"contents") + struct.pack("<Q", 5), s(b"contents") + struct.pack("<Q", 2**41)
    )
    expect_error(data, "absurd size", at + len(s(b"contents")))


def test_nonzero_padding() -> None:
    data, at = mutate(b"hello\0\0\0", b"hello\0\x01\0")
    expect_error(data, "non-zero padding", at + 5)


def test_executable_marker_must_be_empty() -> None:
    data, at = mutate(s(b"executable") + s(b""), s(b"executable") + s(b"x"))
    expect_error(data, "expected '' after 'executable'", at + len(s(b"executable")))


def test_trailing_garbage() -> None:
    data = valid_nar()
    expect_error(data + s(b"x"), "trailing data", len(data))


def test_every_truncation_is_reported() -> None:
    data = valid_nar()
    for cut in range(len(data)):
        err = expect_error(data[:cut], "truncated|bad magic")
        assert err.offset <= cut


def test_depth_limit() -> None:
    tree = [NarEntry(b"", "directory")]
    path = b""
    for _ in range(66):
        path = path + b"/d" if path else b"d"
        tree.append(NarEntry(path, "directory"))
    expect_error(b"".join(write_nar(tree)), "deeper than 64")


def test_writer_rejects_wrong_size_and_order() -> None:
    with pytest.raises(StowawayError, match="announced 3 bytes"):
        b"".join(write_nar([NarEntry(b"", "regular", size=3, chunks=iter([b"ab"]))]))
    with pytest.raises(StowawayError, match="no open parent"):
        b"".join(write_nar([NarEntry(b"", "directory"), NarEntry(b"x/y", "regular")]))
