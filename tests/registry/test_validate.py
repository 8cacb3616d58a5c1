from __future__ import annotations

import hashlib
import json

import pytest

from stowaway.distribution.errors import RegistryApiError
from stowaway.image.model import MediaType
from stowaway.registry.validate import (
    Route,
    check_digest,
    check_manifest,
    check_name,
    parse_content_range,
    parse_range,
    parse_route,
)

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("name", ["a", "shell/git/htop", "a.b_c__d---e/f0", "x" * 255])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "A", "a/", "/a", "a//b", "a/../b", "a..b", "_a", "a_", "a___b", "x" * 256, "a:b"]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(RegistryApiError) as err:
        check_name(name)
    assert err.value.code == "NAME_INVALID"


def test_digests() -> None:
    assert check_digest(D) == D
    for bad in ("sha256:" + "AB" * 32, "sha256:abc", "sha256", "", "sha256:" + "g" * 64):
        with pytest.raises(RegistryApiError) as err:
            check_digest(bad)
        assert err.value.code == "DIGEST_INVALID", bad
    with pytest.raises(RegistryApiError) as err:
        check_digest("sha512:" + "ab" * 64)
    assert (err.value.status, err.value.code) == (400, "DIGEST_INVALID")
    assert "sha256 only" in err.value.message


def test_routes() -> None:
    assert parse_route("/v2/") is None
    assert parse_route("/v2/a/b/manifests/latest") == Route("manifest", "a/b", "latest")
    assert parse_route(f"/v2/a/manifests/{D}?x=1") == Route("manifest", "a", D)
    assert parse_route(f"/v2/a/blobs/{D}") == Route("blob", "a", D)
    assert parse_route("/v2/a/blobs/uploads/") == Route("upload_start", "a")
    assert parse_route("/v2/a/blobs/uploads/" + "0" * 32) == Route("upload", "a", "0" * 32)
    assert parse_route("/v2/a/tags/list") == Route("tags", "a")
    # a name may contain endpoint words as components
    assert parse_route("/v2/blobs/manifests/manifests/x") == Route(
        "manifest", "blobs/manifests", "x"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v2/a/..%2f..%2fetc/manifests/latest",
        "/v2/%2e%2e/manifests/latest",
        "/v2/a%2fb/manifests/latest",
        "/v2/a/../b/manifests/latest",
        "/v2/a/./b/manifests/latest",
        "/v2/a//b/manifests/latest",
        "/v2/a\x00b/manifests/latest",
        "/v2/a\\b/manifests/latest",
        "/v2/a/nothing-here",
        "/v2/UPPER/manifests/latest",
    ],
)
def test_traversal_and_junk_are_name_invalid(path: str) -> None:
    with pytest.raises(RegistryApiError) as err:
        parse_route(path)
    assert err.value.code == "NAME_INVALID" and err.value.status == 400


def test_bad_tag_and_bad_digest_in_path() -> None:
    with pytest.raises(RegistryApiError) as err:
        parse_route("/v2/a/manifests/.hidden")
    assert err.value.code == "MANIFEST_INVALID"
    with pytest.raises(RegistryApiError) as err:
        parse_route("/v2/a/blobs/sha256:nothex")
    assert err.value.code == "DIGEST_INVALID"


def test_ranges() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=95-200", 100) == (95, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    for bad in ("bytes=100-", "bytes=5-1", "bytes=0-1,3-4", "items=0-1", "bytes=-"):
        with pytest.raises(RegistryApiError) as err:
            parse_range(bad, 100)
        assert err.value.status == 416, bad
    assert parse_content_range("0-99") == (0, 99)
    assert parse_content_range("bytes 100-199/*") == (100, 199)
    with pytest.raises(RegistryApiError):
        parse_content_range("9-1")


def test_check_manifest_returns_what_a_manifest_references() -> None:
    oci = "application/vnd.oci.image.manifest.v1+json"
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D, "size": 2}
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": D, "size": 5}
    doc = {"schemaVersion": 2, "config": config, "layers": [layer], "subject": layer}
    body = json.dumps(doc).encode()
    checked = check_manifest(body, oci)
    assert (checked.media_type, checked.blobs, checked.manifests) == (oci, ((D, 2), (D, 5)), ())
    assert checked.subject == D and checked.digest == "sha256:" + hashlib.sha256(body).hexdigest()
    index = {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX.value, "manifests": [layer]}
    assert check_manifest(json.dumps(index).encode(), "").manifests == (D,)
    for bad in ({**doc, "layers": [{"digest": "sha256:x", "size": 1}]}, {**doc, "annotations": []}):
        with pytest.raises(RegistryApiError) as err:
            check_manifest(json.dumps(bad).encode(), oci)
        assert err.value.code == "MANIFEST_INVALID"
