"""The deterministic tar writer, checked against real readers (Python tarfile,
GNU tar, umoci) on real store paths."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stowaway.image.model import TarEntry
from stowaway.image.tar import TarError, default_mtime, store_path_entries, write_tar
from stowaway.store.local import LocalStore
from stowaway.store.model import NarEntry
from stowaway.store.nar import read_nar


def tar_bytes(entries: list[TarEntry] | Iterator[TarEntry], mtime: int = 1) -> bytes:
    return b"".join(write_tar(entries, mtime=mtime))


def expected_listing(paths: list[str]) -> list[tuple[str, int, str]]:
    """(name, mode, kind) for the store paths as found on disk, walked independently
    of the code under test: depth first, names sorted bytewise."""
    out = [("nix", 0o755, "dir"), ("nix/store", 0o755, "dir")]

    def walk(fs: bytes, name: bytes) -> None:
        st = os.lstat(fs)
        if stat.S_ISLNK(st.st_mode):
            out.append((name.decode(), 0o777, "sym"))
        elif stat.S_ISDIR(st.st_mode):
            out.append((name.decode(), 0o555, "dir"))
            for child in sorted(os.listdir(fs)):
                walk(fs + b"/" + child, name + b"/" + child)
        else:
            out.append((name.decode(), 0o555 if st.st_mode & 0o100 else 0o444, "reg"))

    for p in sorted(paths):
        walk(p.encode(), p.lstrip("/").encode())
    return out


def test_default_mtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert default_mtime() == 1
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert default_mtime() == 1700000000
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(TarError, match="SOURCE_DATE_EPOCH='yesterday'"):
        default_mtime()


def test_store_paths_listing_with_tarfile(local_store: LocalStore, demo_closure: list[str]) -> None:
    data = tar_bytes(store_path_entries(local_store, demo_closure), mtime=1234)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
        got = [
            (m.name, m.mode, "dir" if m.isdir() else "sym" if m.issym() else "reg") for m in members
        ]
        assert got == expected_listing(demo_closure)
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {
            (1234, 0, 0, "", "")
        }
        for m in members:
            fs = "/" + m.name
            if m.issym():
                assert m.linkname == os.readlink(fs)
            elif m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                assert f.read() == Path(fs).read_bytes()
    assert len(data) % 512 == 0 and data.endswith(bytes(1024))


def test_listing_with_gnu_tar(
    local_store: LocalStore, demo_closure: list[str], tmp_path: Path
) -> None:
    archive = tmp_path / "layer.tar"
    archive.write_bytes(tar_bytes(store_path_entries(local_store, demo_closure)))
    out = subprocess.run(
        ["tar", "--numeric-owner", "--full-time", "-tvf", str(archive)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "TZ": "UTC"},
    ).stdout.splitlines()
    assert out[0].split()[:2] == ["drwxr-xr-x", "0/0"]
    assert out[0].endswith(" 1970-01-01 00:00:01 nix/")
    busybox = next(line for line in out if line.endswith("-busybox/bin/busybox"))
    assert busybox.startswith("-r-xr-xr-x 0/0 ")
    assert any(
        line.startswith("lrwxrwxrwx 0/0") and line.endswith("bin/sh -> busybox") for line in out
    )
    # GNU tar extracts the long (PAX) names intact.
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)
    long = [p for p in demo_closure if p.endswith("-greeting-data")][0]
    deep = "share/greeting/a very long directory name that goes on and on and on for a while"
    rel = f"{long.lstrip('/')}/{deep}/and-more-than-one-hundred-characters-in-total-surely/file.txt"
    assert len(rel) > 100
    assert (dest / rel).read_bytes() == b"deep\n"


def test_umoci_unpacks_the_layer(
    local_store: LocalStore, demo_closure: list[str], tmp_path: Path
) -> None:
    layer = tar_bytes(store_path_entries(local_store, demo_closure))
    layout = tmp_path / "oci"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        hexd = hashlib.sha256(data).hexdigest()
        (blobs / hexd).write_bytes(data)
        return "sha256:" + hexd

    diff_id = put(layer)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": diff_id,
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "t"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    rootfs = tmp_path / "rootfs"
    subprocess.run(
        ["umoci", "raw", "unpack", "--image", f"{layout}:t", str(rootfs)],
        check=True,
        capture_output=True,
    )
    busybox = [p for p in demo_closure if p.endswith("-busybox")][0]
    unpacked = rootfs / busybox.lstrip("/") / "bin" / "busybox"
    assert unpacked.read_bytes() == Path(busybox, "bin", "busybox").read_bytes()
    assert stat.S_IMODE(unpacked.stat().st_mode) == 0o555
    assert os.readlink(rootfs / busybox.lstrip("/") / "bin" / "sh") == "busybox"
    assert stat.S_IMODE((rootfs / "nix" / "store").stat().st_mode) == 0o755


def test_long_names_and_targets_round_trip(tmp_path: Path) -> None:
    name150 = b"nix/store/" + b"d" * 140 + b"/file"
    name300 = b"nix/" + b"/".join([b"e" * 90] * 3) + b"/f\xc3\xa9"  # > 255 bytes, UTF-8
    target = b"../" * 40 + b"t" * 200
    entries = [
        TarEntry(b"nix", "directory", 0o755),
        TarEntry(name150, "regular", 0o444, size=3, chunks=iter([b"abc"])),
        TarEntry(name300, "regular", 0o555, size=0),
        TarEntry(b"nix/link", "symlink", 0o777, target=target),
    ]
    data = tar_bytes(entries)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
        assert [m.name.encode() for m in members] == [b"nix", name150, name300, b"nix/link"]
        assert members[3].linkname.encode() == target
        assert members[2].mode == 0o555
        # PAX records carry only path/linkpath: no times, no xattrs.
        assert {k for m in members for k in m.pax_headers} == {"path", "linkpath"}
    # GNU tar reads the same full names.
    (tmp_path / "t.tar").write_bytes(data)
    listing = subprocess.run(
        ["tar", "-tf", str(tmp_path / "t.tar")], check=True, capture_output=True
    ).stdout.splitlines()
    assert listing == [b"nix/", name150, name300, b"nix/link"]


def test_same_entries_same_bytes(local_store: LocalStore, demo_closure: list[str]) -> None:
    a = tar_bytes(store_path_entries(local_store, demo_closure))
    b = tar_bytes(store_path_entries(local_store, list(reversed(demo_closure))))
    assert a == b
    assert tar_bytes(store_path_entries(local_store, demo_closure), mtime=2) != a


def test_nar_source_gives_same_tar(local_store: LocalStore, demo_closure: list[str]) -> None:
    """Entries decoded from a NAR that nix itself wrote give the same tar bytes as
    the directory walk: the reason local store and binary cache layers match."""

    class NarDumpSource:
        name = "nix-store --dump"

        def query(self, path: str) -> None:
            return None

        def entries(self, path: str) -> Iterator[NarEntry]:
            nar = subprocess.run(["nix-store", "--dump", path], check=True, capture_output=True)
            return read_nar(io.BytesIO(nar.stdout))

    from_nar = tar_bytes(store_path_entries(NarDumpSource(), demo_closure))
    assert from_nar == tar_bytes(store_path_entries(local_store, demo_closure))


def test_content_size_mismatch_is_an_error() -> None:
    short = [TarEntry(b"f", "regular", 0o444, size=5, chunks=iter([b"abc"]))]
    with pytest.raises(TarError, match=r"'f'.*declared 5 bytes.*only 3"):
        tar_bytes(short)
    long = [TarEntry(b"g", "regular", 0o444, size=2, chunks=iter([b"abc"]))]
    with pytest.raises(TarError, match=r"'g'.*declared 2 bytes.*more"):
        tar_bytes(long)


@pytest.mark.parametrize("name", [b"", b"/abs", b"a\0b"])
def test_bad_member_names(name: bytes) -> None:
    with pytest.raises(TarError, match="invalid tar member name"):
        tar_bytes([TarEntry(name, "directory", 0o755)])


def test_store_path_entries_rejects_non_store_paths(local_store: LocalStore) -> None:
    with pytest.raises(TarError, match="not a top-level store path: '/etc/passwd'"):
        list(store_path_entries(local_store, ["/etc/passwd"]))


def test_huge_size_uses_base256() -> None:
    size = 9 * 1024**3  # does not fit 11 octal digits

    def chunks() -> Iterator[bytes]:
        yield from ()

    header = next(
        iter(write_tar([TarEntry(b"big", "regular", 0o444, size=size, chunks=chunks())], mtime=1))
    )
    info = tarfile.TarInfo.frombuf(header[:512], "utf-8", "surrogateescape")
    assert info.size == size
