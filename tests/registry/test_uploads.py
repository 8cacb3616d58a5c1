"""Upload sessions on the filesystem backend: concurrent requests on one upload,
purging of abandoned uploads, and the mode of every stored file."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import stat
import time
from pathlib import Path

import pytest
from registry_harness import Server
from registry_helpers import OCI, digest, image_manifest, stored_files

from stowaway.registry.config import RegistryConfigError, config_from_dict
from stowaway.registry.storage import FilesystemStorage


def wait_for(condition: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_request_queued_behind_the_finishing_put_gets_upload_unknown(server: Server) -> None:
    """A PATCH that waited for the upload lock while a PUT completed the upload is
    told the upload is gone (404), not an internal error."""
    loc = server.request("POST", "/v2/a/blobs/uploads/").headers["Location"]
    data = os.urandom(3 << 20)
    put = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    patch = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        put.putrequest("PUT", f"{loc}?digest={digest(data)}")
        put.putheader("Content-Length", str(len(data)))
        put.endheaders()
        put.send(data[: 1 << 20])  # the PUT now holds the upload's lock, spooling
        time.sleep(0.3)
        patch.request("PATCH", loc, body=b"late", headers={"Content-Range": "0-3"})
        time.sleep(0.3)  # the PATCH is waiting for the lock
        put.send(data[1 << 20 :])
        assert put.getresponse().status == 201
        late = patch.getresponse()
        assert late.status == 404
        assert json.loads(late.read())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    finally:
        put.close()
        patch.close()
    assert server.request("GET", f"/v2/a/blobs/{digest(data)}").body == data


def test_stored_files_are_0644_whatever_the_umask(server: Server, strict_umask: None) -> None:
    """The storage root is the shared layer cache: other users must read it."""
    manifest = image_manifest(server, "m")  # monolithic blob uploads
    r = server.request("PUT", "/v2/m/manifests/v1", manifest, {"Content-Type": OCI})
    assert r.status == 201, r.body
    loc = server.request("POST", "/v2/m/blobs/uploads/").headers["Location"]
    server.request("PATCH", loc, b"chunk")
    assert server.request("PUT", f"{loc}?digest={digest(b'chunk!')}", b"!").status == 201
    root = Path(server.config.storage)
    files = [p for p in root.rglob("*") if p.is_file() and "_uploads" not in p.parts]
    # config, layer, chunked blob, manifest, its link, the tag, 3 blob links
    assert len(files) == 9
    assert {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in files} == {
        str(p.relative_to(root)): 0o644 for p in files
    }


def test_abandoned_uploads_are_purged_periodically(make_server: object) -> None:
    server: Server = make_server(upload_max_age=0.3)  # type: ignore[operator]
    storage = server.storage
    assert isinstance(storage, FilesystemStorage)
    idle = server.request("POST", "/v2/a/blobs/uploads/").headers["Location"]
    assert server.request("PATCH", idle, b"abc").status == 202
    busy = server.request("POST", "/v2/a/blobs/uploads/").headers["Location"]
    sent = 0
    deadline = time.monotonic() + 0.9
    while time.monotonic() < deadline:  # keep one upload alive by appending
        assert server.request("PATCH", busy, b"x").status == 202, "an active upload was purged"
        sent += 1
        time.sleep(0.05)
    assert server.request("GET", idle).code == "BLOB_UPLOAD_UNKNOWN"
    assert server.request("GET", busy).headers["Range"] == f"0-{sent - 1}"
    busy_id = busy.rsplit("/", 1)[1]
    assert set(storage._hashers) <= {busy_id} and set(storage._locks) <= {busy_id}
    assert stored_files(Path(server.config.storage) / "_uploads") == [busy_id, f"{busy_id}.name"]


def test_stale_uploads_are_purged_at_start_up(make_server: object, tmp_path: Path) -> None:
    root = tmp_path / "shared"
    storage = FilesystemStorage(root)
    uploads = root / "_uploads"
    for name in ("old", "old.name", "tmp-crashed", "fresh", "fresh.name"):
        (uploads / name).write_text("a")
    two_days_ago = time.time() - 2 * 86400
    for name in ("old", "old.name", "tmp-crashed"):
        os.utime(uploads / name, (two_days_ago, two_days_ago))
    make_server(storage=storage)  # type: ignore[operator]  # default max age: 24 h
    left = ["fresh", "fresh.name"]
    assert wait_for(lambda: sorted(os.listdir(uploads)) == left), os.listdir(uploads)


def test_upload_max_age_must_be_positive() -> None:
    assert config_from_dict({"upload_max_age": 90}).upload_max_age == 90
    with pytest.raises(RegistryConfigError, match="upload_max_age must be a positive"):
        config_from_dict({"upload_max_age": 0}, "reg.toml")
    with pytest.raises(RegistryConfigError, match="upload_max_age has the wrong type"):
        config_from_dict({"upload_max_age": "1d"}, "reg.toml")


def test_put_blob_file_flushes_before_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolver output copied into storage is synced before the rename publishes it:
    a blob smaller than Python's write buffer is all still buffered until flushed."""
    data = b"tail of a blob " * 60  # < 1 KiB
    src = tmp_path / "layer"
    src.write_bytes(data)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the real fsync, noting how much the file held
        if stat.S_ISREG(os.fstat(fd).st_mode):
            synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    storage = FilesystemStorage(tmp_path / "root")
    asyncio.run(storage.put_blob_file(digest(data), src))
    assert synced == [len(data)]
    assert (tmp_path / "root/blobs/sha256" / digest(data)[7:]).read_bytes() == data
