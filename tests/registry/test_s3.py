"""The S3 backend against a real S3-protocol server (moto's server mode) on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

from registry_harness import Server
from registry_helpers import (
    OCI,
    check_blobs_are_scoped,
    check_referrers,
    digest,
    image_manifest,
    layout_manifest,
    skopeo,
)

from s3_fixtures import CREDS
from stowaway.registry.config import RegistryConfig, S3Options, open_storage
from stowaway.registry.s3 import S3Storage


def s3_server(make_server: object, endpoint: str, bucket: str, **options: object) -> Server:
    config_s3 = S3Options(endpoint=endpoint, **CREDS)
    storage = open_storage(RegistryConfig(storage=f"s3://{bucket}/reg", s3=config_s3))
    assert isinstance(storage, S3Storage)
    return make_server(storage=storage, **options)  # type: ignore[operator,no-any-return]


def keys(storage: S3Storage) -> list[str]:
    out = storage._s3.list_objects_v2(Bucket=storage.bucket)
    return sorted(o["Key"] for o in out.get("Contents", []))


def test_skopeo_round_trip_through_s3(
    make_server: object, moto_endpoint: str, bucket: str, oci_layout: Path, tmp_path: Path
) -> None:
    server = s3_server(make_server, moto_endpoint, bucket)
    dest = f"docker://{server.host}/s3/busybox:1"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{oci_layout}:t", dest)
    storage = server.storage
    assert isinstance(storage, S3Storage)
    src = layout_manifest(oci_layout)
    assert "reg/repositories/s3/busybox/_tags/1" in keys(storage)
    out = tmp_path / "pulled"
    skopeo("copy", "--src-tls-verify=false", dest, f"oci:{out}:p")
    assert layout_manifest(out, "p")["digest"] == src["digest"]
    r = server.request("GET", "/v2/s3/busybox/manifests/1")
    layer = json.loads(r.body)["layers"][0]
    part = server.request(
        "GET", f"/v2/s3/busybox/blobs/{layer['digest']}", headers={"Range": "bytes=10-19"}
    )
    blob = (oci_layout / "blobs/sha256" / layer["digest"].removeprefix("sha256:")).read_bytes()
    assert part.status == 206 and part.body == blob[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(blob)}"
    assert json.loads(server.request("GET", "/v2/_catalog").body) == {
        "repositories": ["s3/busybox"]
    }
    assert not [k for k in keys(storage) if "/_uploads/" in k]


def test_s3_blobs_are_scoped_to_repositories(
    make_server: object, moto_endpoint: str, bucket: str
) -> None:
    server = s3_server(make_server, moto_endpoint, bucket)
    check_blobs_are_scoped(server, s3_server(make_server, moto_endpoint, bucket))


def test_s3_referrers_api(make_server: object, moto_endpoint: str, bucket: str) -> None:
    server = s3_server(make_server, moto_endpoint, bucket)
    check_referrers(server, s3_server(make_server, moto_endpoint, bucket))


def test_s3_chunked_multipart_and_rejections(
    make_server: object, moto_endpoint: str, bucket: str
) -> None:
    server = s3_server(make_server, moto_endpoint, bucket, max_upload_size=30 << 20)
    storage = server.storage
    assert isinstance(storage, S3Storage)
    data = os.urandom(1 << 20) * 11  # 11 MiB: more than one 8 MiB multipart part
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    loc = server.request("POST", "/v2/big/blobs/uploads/").headers["Location"]
    assert (
        server.request(
            "PATCH", loc, data[: 3 << 20], {"Content-Range": f"0-{(3 << 20) - 1}"}
        ).status
        == 202
    )
    r = server.request("PATCH", loc, data[: 1 << 20], {"Content-Range": "0-1048575"})
    assert r.status == 416 and r.code == "RANGE_INVALID"
    r = server.request("PUT", f"{loc}?digest={d}", data[5 << 20 :], {"Content-Range": f"{5 << 20}-"
                       f"{len(data) - 1}"})  # fmt: skip
    assert r.status == 416 and r.code == "RANGE_INVALID"  # the upload is kept
    assert server.request("PATCH", loc, data[3 << 20 : 10 << 20]).status == 202
    assert server.request("GET", loc).headers["Range"] == f"0-{(10 << 20) - 1}"
    r = server.request("PUT", f"{loc}?digest={d}", data[10 << 20 :])
    assert r.status == 201, r.body
    got = server.request("GET", f"/v2/big/blobs/{d}")
    assert got.body == data
    before = keys(storage)
    # mismatch and oversize leave nothing behind (multipart aborted)
    r = server.request("POST", f"/v2/big/blobs/uploads/?digest=sha256:{'0' * 64}", data)
    assert r.code == "DIGEST_INVALID"
    big = b"z" * ((30 << 20) + 1)
    r = server.request("POST", f"/v2/big/blobs/uploads/?digest={d}", big)
    assert r.status == 413 and r.code == "SIZE_INVALID"
    assert keys(storage) == before
    mpu = storage._s3.list_multipart_uploads(Bucket=storage.bucket)
    assert not mpu.get("Uploads")


def test_s3_patch_streams_into_parts(make_server: object, moto_endpoint: str, bucket: str) -> None:
    """A PATCH carrying a whole layer (docker's way) goes up in 8 MiB parts as it
    arrives instead of being held in memory."""
    server = s3_server(make_server, moto_endpoint, bucket, max_upload_size=12 << 20)
    storage = server.storage
    assert isinstance(storage, S3Storage)
    data = os.urandom(1 << 20) * 9  # 9 MiB: one full part and a remainder
    loc = server.request("POST", "/v2/docker/blobs/uploads/").headers["Location"]
    assert server.request("PATCH", loc, data).status == 202
    [chunk] = [k for k in keys(storage) if "/_uploads/" in k and "/data/" in k]
    head = storage._s3.head_object(Bucket=storage.bucket, Key=chunk)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-2"), "stored as a 2-part multipart upload"
    # over the limit: 413, no part is left behind
    r = server.request("PATCH", loc, data[: 4 << 20], {"Content-Range": f"{len(data)}-"
                       f"{len(data) + (4 << 20) - 1}"})  # fmt: skip
    assert r.status == 413 and r.code == "SIZE_INVALID"
    assert not storage._s3.list_multipart_uploads(Bucket=storage.bucket).get("Uploads")
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    assert server.request("PUT", f"{loc}?digest={d}").status == 201
    assert server.request("GET", f"/v2/docker/blobs/{d}").body == data


def test_s3_abandoned_uploads_and_parts_are_purged(
    make_server: object, moto_endpoint: str, bucket: str
) -> None:
    server = s3_server(make_server, moto_endpoint, bucket)
    storage = server.storage
    assert isinstance(storage, S3Storage)
    loc = server.request("POST", "/v2/a/blobs/uploads/").headers["Location"]
    assert server.request("PATCH", loc, b"abandoned").status == 202
    crashed = storage._s3.create_multipart_upload(Bucket=storage.bucket, Key="reg/blobs/x")
    assert asyncio.run(storage.purge_uploads(3600)) == 0
    assert [k for k in keys(storage) if "/_uploads/" in k]
    time.sleep(1.6)  # S3 times have whole seconds
    assert asyncio.run(storage.purge_uploads(0.5)) == 1
    assert not [k for k in keys(storage) if "/_uploads/" in k]
    assert server.request("GET", loc).code == "BLOB_UPLOAD_UNKNOWN"
    uploads = storage._s3.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", [])
    assert crashed["UploadId"] not in [u["UploadId"] for u in uploads]


def test_s3_delete_of_the_last_manifest_removes_its_tags(
    make_server: object, moto_endpoint: str, bucket: str
) -> None:
    """As on the filesystem: deleting a manifest removes the tags pointing at it,
    also when it was the repository's last manifest."""
    server = s3_server(make_server, moto_endpoint, bucket)
    storage = server.storage
    assert isinstance(storage, S3Storage)
    body = image_manifest(server, "solo")
    for tag in ("v1", "latest"):
        r = server.request("PUT", f"/v2/solo/manifests/{tag}", body, {"Content-Type": OCI})
        assert r.status == 201, r.body
    assert server.request("DELETE", f"/v2/solo/manifests/{digest(body)}").status == 202
    left = [k for k in keys(storage) if "/repositories/solo/" in k]
    assert left and all("/solo/_layers/" in k for k in left)  # blob links stay
    assert server.request("GET", "/v2/solo/manifests/v1").code == "MANIFEST_UNKNOWN"
