"""The distribution API over real HTTP against the real server and filesystem storage."""

from __future__ import annotations

import json
import logging
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest
from registry_harness import Server
from registry_helpers import (
    DOCKER,
    OCI,
    check_blobs_are_scoped,
    check_referrers,
    digest,
    image_manifest,
    push_blob,
    stored,
    stored_files,
)

from s3_fixtures import CREDS
from stowaway.registry.config import RegistryConfig, S3Options, open_storage
from stowaway.registry.storage import FilesystemStorage


@pytest.fixture(params=["filesystem", "s3"])
def server(make_server: object, request: pytest.FixtureRequest) -> Server:
    """The API tests run against both storage backends (S3 on a moto server)."""
    if request.param == "filesystem":
        return make_server()  # type: ignore[operator,no-any-return]
    endpoint, bucket = request.getfixturevalue("moto_endpoint"), request.getfixturevalue("bucket")
    s3 = S3Options(endpoint=endpoint, **CREDS)
    storage = open_storage(RegistryConfig(storage=f"s3://{bucket}/reg", s3=s3))
    return make_server(storage=storage)  # type: ignore[operator,no-any-return]


def test_base_health_and_metrics(server: Server) -> None:
    r = server.request("GET", "/v2/")
    assert r.status == 200 and r.body == b"{}"
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert server.request("GET", "/healthz").status == 200
    server.request("GET", "/v2/nope/manifests/latest")
    text = server.request("GET", "/metrics").body.decode()
    assert 'stowaway_registry_requests_total{method="GET",status="404"} 1' in text
    assert "stowaway_registry_builds_total 0" in text


def test_monolithic_upload_and_blob_reads(server: Server) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    d = push_blob(server, "lib/x", data)
    assert f"blobs/sha256/{d.removeprefix('sha256:')}" in stored(server)
    r = server.request("GET", f"/v2/lib/x/blobs/{d}")
    assert r.status == 200 and r.body == data
    assert r.headers["Docker-Content-Digest"] == d
    assert r.headers["Content-Length"] == str(len(data))
    assert r.headers["Content-Type"] == "application/octet-stream"
    head = server.request("HEAD", f"/v2/lib/x/blobs/{d}")
    assert (
        head.status == 200 and head.body == b"" and head.headers["Content-Length"] == str(len(data))
    )
    part = server.request("GET", f"/v2/lib/x/blobs/{d}", headers={"Range": "bytes=1000-1999"})
    assert part.status == 206 and part.body == data[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    bad = server.request("GET", f"/v2/lib/x/blobs/{d}", headers={"Range": f"bytes={len(data)}-"})
    assert bad.status == 416 and bad.code == "RANGE_INVALID"
    missing = server.request("GET", f"/v2/lib/x/blobs/{digest(b'nope')}")
    assert missing.status == 404 and missing.code == "BLOB_UNKNOWN"


def test_digest_mismatch_stores_nothing(server: Server) -> None:
    before = stored(server)
    r = server.request("POST", f"/v2/a/blobs/uploads/?digest={digest(b'other')}", b"data")
    assert r.status == 400 and r.code == "DIGEST_INVALID"
    assert stored(server) == before


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/a/..%2f..%2fescape/blobs/uploads/?digest=", "NAME_INVALID"),
        ("/v2/%2e%2e/blobs/uploads/", "NAME_INVALID"),
        ("/v2/a/../../x/blobs/uploads/", "NAME_INVALID"),
        ("/v2/Bad/blobs/uploads/", "NAME_INVALID"),
        ("/v2/a/blobs/uploads/?digest=sha256:short", "DIGEST_INVALID"),
        ("/v2/a/blobs/uploads/?digest=md5:abcd", "DIGEST_INVALID"),
        (f"/v2/a/blobs/uploads/?digest=sha512:{'0' * 128}", "DIGEST_INVALID"),
        (f"/v2/a/blobs/uploads/?mount=sha512:{'0' * 128}&from=b", "DIGEST_INVALID"),
        ("/v2/a/manifests/sha256:XYZ", "DIGEST_INVALID"),
        (f"/v2/a/manifests/sha512:{'0' * 128}", "DIGEST_INVALID"),
        ("/v2/a/manifests/a:b", "MANIFEST_INVALID"),  # a tag, of invalid grammar
        ("/v2/a/manifests/.hidden", "MANIFEST_INVALID"),
    ],
)
def test_bad_requests_store_nothing(server: Server, path: str, code: str) -> None:
    before = stored(server)
    method = "PUT" if "/manifests/" in path else "POST"
    r = server.request(method, path, b"{}", {"Content-Type": OCI})
    assert r.code == code and r.status == 400, r.body
    assert stored(server) == before
    assert not (Path(server.config.storage).parent / "escape").exists()


def test_oversize_upload_is_413_and_stores_nothing(make_server: object) -> None:
    server: Server = make_server(max_upload_size=1000)  # type: ignore[operator]
    root = Path(server.config.storage)
    before = stored_files(root)
    data = b"x" * 1001
    r = server.request("POST", f"/v2/a/blobs/uploads/?digest={digest(data)}", data)
    assert r.status == 413 and r.code == "SIZE_INVALID"
    # chunked: the chunk that crosses the limit is refused and rolled back
    start = server.request("POST", "/v2/a/blobs/uploads/")
    loc = start.headers["Location"]
    assert server.request("PATCH", loc, b"y" * 600).status == 202
    r = server.request("PATCH", loc, b"y" * 600)
    assert r.status == 413 and r.code == "SIZE_INVALID"
    assert server.request("GET", loc).headers["Range"] == "0-599"
    assert server.request("DELETE", loc).status == 204
    assert stored_files(root) == before


def test_chunked_upload_out_of_order_status_and_cancel(server: Server) -> None:
    data = b"0123456789" * 1000
    start = server.request("POST", "/v2/a/b/blobs/uploads/")
    assert start.status == 202
    loc, uuid = start.headers["Location"], start.headers["Docker-Upload-UUID"]
    assert loc.endswith(uuid) and start.headers["Range"] == "0-0"
    r = server.request("PATCH", loc, data[:4000], {"Content-Range": "0-3999"})
    assert r.status == 202 and r.headers["Range"] == "0-3999"
    # out of order: a chunk that does not start where the upload ends
    r = server.request("PATCH", loc, data[5000:6000], {"Content-Range": "5000-5999"})
    assert r.status == 416 and r.code == "RANGE_INVALID"
    r = server.request("PATCH", loc, data[4000:9000], {"Content-Range": "4000-8999"})
    assert r.status == 202 and r.headers["Range"] == "0-8999"
    st = server.request("GET", loc)
    assert st.status == 204 and st.headers["Range"] == "0-8999"
    # another repository cannot touch this upload
    assert server.request("GET", loc.replace("/a/b/", "/other/")).code == "BLOB_UPLOAD_UNKNOWN"
    r = server.request("PUT", f"{loc}?digest={digest(data)}", data[9000:])
    assert r.status == 201 and r.headers["Docker-Content-Digest"] == digest(data)
    assert server.request("GET", f"/v2/a/b/blobs/{digest(data)}").body == data
    assert server.request("GET", loc).code == "BLOB_UPLOAD_UNKNOWN"
    # cancel
    loc2 = server.request("POST", "/v2/a/b/blobs/uploads/").headers["Location"]
    server.request("PATCH", loc2, b"abc")
    assert server.request("DELETE", loc2).status == 204
    assert server.request("PATCH", loc2, b"abc").code == "BLOB_UPLOAD_UNKNOWN"
    assert stored(server, "_uploads") == []


def test_final_put_honours_content_range_and_digest_algorithm(server: Server) -> None:
    """The closing PUT's chunk must start where the upload ends (416 otherwise, the
    upload kept); a digest of another algorithm is refused before any data is read."""
    data = b"abcdefghij" * 100
    loc = server.request("POST", "/v2/a/blobs/uploads/").headers["Location"]
    assert server.request("PATCH", loc, data[:400], {"Content-Range": "0-399"}).status == 202
    r = server.request(
        "PUT", f"{loc}?digest={digest(data)}", data[500:], {"Content-Range": "500-999"}
    )
    assert r.status == 416 and r.code == "RANGE_INVALID"
    r = server.request("PUT", f"{loc}?digest=sha512:{'0' * 128}", data[400:])
    assert r.status == 400 and r.code == "DIGEST_INVALID" and "sha256 only" in r.body.decode()
    assert server.request("GET", loc).headers["Range"] == "0-399"  # still resumable
    assert server.request("PATCH", loc, data[400:600], {"Content-Range": "400-599"}).status == 202
    r = server.request(
        "PUT", f"{loc}?digest={digest(data)}", data[600:], {"Content-Range": "600-999"}
    )
    assert r.status == 201, r.body
    assert server.request("GET", f"/v2/a/blobs/{digest(data)}").body == data


def test_chunked_upload_digest_mismatch_drops_upload(server: Server) -> None:
    before = stored(server)
    loc = server.request("POST", "/v2/a/blobs/uploads/").headers["Location"]
    server.request("PATCH", loc, b"some data")
    r = server.request("PUT", f"{loc}?digest={digest(b'different')}")
    assert r.status == 400 and r.code == "DIGEST_INVALID"
    assert stored(server) == before


def test_cross_repo_mount(server: Server) -> None:
    d = push_blob(server, "src/repo", b"shared layer")
    r = server.request("POST", f"/v2/dst/repo/blobs/uploads/?mount={d}&from=src/repo")
    assert r.status == 201 and r.headers["Location"] == f"/v2/dst/repo/blobs/{d}"
    r = server.request("POST", f"/v2/dst/repo/blobs/uploads/?mount={digest(b'x')}&from=src/repo")
    assert r.status == 202 and "Docker-Upload-UUID" in r.headers
    r = server.request("POST", f"/v2/dst/blobs/uploads/?mount={d}&from=..%2fsrc")
    assert r.code == "NAME_INVALID"


def test_blobs_are_scoped_to_repositories(make_server: object) -> None:
    server: Server = make_server()  # type: ignore[operator]
    replica: Server = make_server(storage=FilesystemStorage(Path(server.config.storage)))  # type: ignore[operator]
    check_blobs_are_scoped(server, replica)
    blobs = Path(server.config.storage) / "blobs" / "sha256"
    assert len(list(blobs.iterdir())) == 4  # secret, config, layer, manifest: each once


def test_referrers_api(make_server: object) -> None:
    server: Server = make_server()  # type: ignore[operator]
    replica: Server = make_server(storage=FilesystemStorage(Path(server.config.storage)))  # type: ignore[operator]
    check_referrers(server, replica)


def test_manifest_put_get_tags_and_negotiation(server: Server) -> None:
    body = image_manifest(server, "app")
    md = digest(body)
    r = server.request("PUT", "/v2/app/manifests/v1", body, {"Content-Type": OCI})
    assert r.status == 201, r.body
    assert r.headers["Docker-Content-Digest"] == md
    assert r.headers["Location"] == f"/v2/app/manifests/{md}"
    for ref in ("v1", md):
        g = server.request("GET", f"/v2/app/manifests/{ref}")
        assert g.status == 200 and g.body == body
        assert g.headers["Content-Type"] == OCI and g.headers["Docker-Content-Digest"] == md
        h = server.request("HEAD", f"/v2/app/manifests/{ref}")
        assert h.body == b"" and h.headers["Content-Length"] == str(len(body))
    # a Docker-only client cannot get an OCI manifest by tag
    r = server.request("GET", "/v2/app/manifests/v1", headers={"Accept": DOCKER})
    assert r.status == 404 and r.code == "MANIFEST_UNKNOWN" and "does not accept" in r.body.decode()
    # a Docker manifest is served to Docker-only clients
    dbody = image_manifest(server, "app", DOCKER)
    assert (
        server.request("PUT", "/v2/app/manifests/v2", dbody, {"Content-Type": DOCKER}).status == 201
    )
    r = server.request("GET", "/v2/app/manifests/v2", headers={"Accept": f"{DOCKER}, {OCI};q=0.5"})
    assert r.status == 200 and r.headers["Content-Type"] == DOCKER
    # tags with pagination
    for t in ("a", "b", "c"):
        server.request("PUT", f"/v2/app/manifests/{t}", body, {"Content-Type": OCI})
    r = server.request("GET", "/v2/app/tags/list")
    assert json.loads(r.body) == {"name": "app", "tags": ["a", "b", "c", "v1", "v2"]}
    r = server.request("GET", "/v2/app/tags/list?n=2")
    assert json.loads(r.body)["tags"] == ["a", "b"]
    assert r.headers["Link"] == '</v2/app/tags/list?n=2&last=b>; rel="next"'
    r = server.request("GET", "/v2/app/tags/list?n=2&last=b")
    assert json.loads(r.body)["tags"] == ["c", "v1"]
    assert server.request("GET", "/v2/nothing/tags/list").code == "NAME_UNKNOWN"
    assert json.loads(server.request("GET", "/v2/_catalog").body) == {"repositories": ["app"]}
    # delete by digest removes the manifest and its tags
    assert server.request("DELETE", f"/v2/app/manifests/{md}").status == 202
    assert server.request("GET", "/v2/app/manifests/v1").code == "MANIFEST_UNKNOWN"
    assert json.loads(server.request("GET", "/v2/app/tags/list").body)["tags"] == ["v2"]


@pytest.mark.parametrize("n", ["x", "-1", "\u00b2", "\u0661\u0662\u0663"])  # ², Arabic-Indic 123
def test_pagination_count_must_be_ascii_digits(server: Server, n: str) -> None:
    body = image_manifest(server, "app")
    assert server.request("PUT", "/v2/app/manifests/v1", body, {"Content-Type": OCI}).status == 201
    for path in ("/v2/_catalog", "/v2/app/tags/list"):
        r = server.request("GET", f"{path}?n={urllib.parse.quote(n)}")
        assert r.status == 400 and "is not a count" in r.body.decode(), (path, r.body)


def test_manifest_put_rejections(server: Server) -> None:
    body = image_manifest(server, "app")
    before = stored(server)
    missing = json.loads(body)
    missing["layers"][0]["digest"] = digest(b"never pushed")
    r = server.request(
        "PUT", "/v2/app/manifests/x", json.dumps(missing).encode(), {"Content-Type": OCI}
    )
    assert (
        r.status == 400
        and r.code == "MANIFEST_BLOB_UNKNOWN"
        and digest(b"never pushed") in r.body.decode()
    )
    for bad, ctype in (
        (b"not json", OCI),
        (b"[]", OCI),
        (b"[" * 100_000, OCI),  # nested past the recursion limit
        (body, "text/plain"),
        (body, DOCKER),  # Content-Type disagrees with the mediaType field
        (json.dumps({**json.loads(body), "schemaVersion": 1}).encode(), OCI),
    ):
        r = server.request("PUT", "/v2/app/manifests/x", bad, {"Content-Type": ctype})
        assert r.status == 400 and r.code == "MANIFEST_INVALID", (bad, ctype)
    r = server.request("PUT", f"/v2/app/manifests/{digest(b'other')}", body, {"Content-Type": OCI})
    assert r.code == "DIGEST_INVALID"
    assert stored(server) == before


def test_access_log_is_one_json_line_per_request(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="stowaway.registry.access"):
        server.request("GET", "/v2/")
        server.request("GET", "/v2/a/manifests/missing")
        for _ in range(100):  # the line is written just after the response is sent
            lines = [
                json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("access")
            ]
            if len(lines) == 2:
                break
            time.sleep(0.01)
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [
        ("GET", "/v2/", 200),
        ("GET", "/v2/a/manifests/missing", 404),
    ]
    assert lines[0]["bytes"] == 2 and lines[0]["remote"] == "127.0.0.1"
    assert isinstance(lines[0]["duration_ms"], float)


def test_streamed_oversize_body_without_length_is_cut_off(make_server: object) -> None:
    import http.client

    server: Server = make_server(max_upload_size=3 << 20)  # type: ignore[operator]
    root = Path(server.config.storage)
    before = stored_files(root)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunks = (b"q" * (1 << 20) for _ in range(5))
    conn.request(
        "POST", f"/v2/a/blobs/uploads/?digest={digest(b'x')}", body=chunks, encode_chunked=True
    )
    r = conn.getresponse()
    body = r.read()
    conn.close()
    assert r.status == 413 and b"SIZE_INVALID" in body
    assert stored_files(root) == before


def test_stores_without_repository_links_are_linked_at_start(make_server: object) -> None:
    """A store written before blobs were scoped has no links: at start-up each blob a
    tagged manifest of a repository uses is linked there (still pullable there, and
    only there); a blob no manifest uses stays unlinked."""
    server: Server = make_server()  # type: ignore[operator]
    body = image_manifest(server, "app")
    assert server.request("PUT", "/v2/app/manifests/v1", body, {"Content-Type": OCI}).status == 201
    stray = push_blob(server, "app", b"uploaded, never used by a manifest")
    root = Path(server.config.storage)
    for links in root.glob("repositories/**/_layers"):
        shutil.rmtree(links)  # what an older stowaway wrote
    restarted: Server = make_server(storage=FilesystemStorage(root))  # type: ignore[operator]
    for d in (json.loads(body)["config"]["digest"], json.loads(body)["layers"][0]["digest"]):
        assert restarted.request("HEAD", f"/v2/app/blobs/{d}").status == 200
        assert restarted.request("HEAD", f"/v2/other/blobs/{d}").status == 404
    assert restarted.request("HEAD", f"/v2/app/blobs/{stray}").status == 404
