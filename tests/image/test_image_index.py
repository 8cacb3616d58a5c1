"""Image indexes: one entry per platform, sorted, so the same images give one digest."""

from __future__ import annotations

import json

import pytest

from stowaway.image.digest import sha256_digest
from stowaway.image.index import ImageIndexError, build_index
from stowaway.image.model import Blob, Image, MediaType
from stowaway.image.platform import Platform

ARM = Platform("linux", "arm64")
AMD = Platform("linux", "amd64")
V7 = Platform("linux", "arm", "v7")


def _image(name: str, fmt: str = "oci") -> Image:
    def blob(data: bytes, media_type: str) -> Blob:
        return Blob(sha256_digest(data), len(data), media_type, data=data)

    config = blob(name.encode(), MediaType.OCI_CONFIG.value)
    manifest = blob(b"manifest " + name.encode(), MediaType.OCI_MANIFEST.value)
    return Image(layers=[], config=config, manifest=manifest, format=fmt)  # type: ignore[arg-type]


def test_index_lists_platforms_sorted() -> None:
    arm, amd, v7 = _image("arm"), _image("amd"), _image("v7")
    index = build_index([(ARM, arm), (V7, v7), (AMD, amd)])
    doc = json.loads(index.manifest.data or b"")
    assert doc["mediaType"] == MediaType.OCI_INDEX == index.manifest.media_type
    assert [m["platform"] for m in doc["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm", "os": "linux", "variant": "v7"},
        {"architecture": "arm64", "os": "linux"},
    ]
    assert [m["digest"] for m in doc["manifests"]] == [
        amd.manifest.digest, v7.manifest.digest, arm.manifest.digest
    ]  # fmt: skip
    assert index.manifest.digest == sha256_digest(index.manifest.data or b"")
    assert build_index([(AMD, amd), (V7, v7), (ARM, arm)]).manifest.digest == (
        index.manifest.digest
    )
    assert index.manifests()[-1] is index.manifest
    assert {b.digest for b in index.blobs()} == {i.config.digest for i in (arm, amd, v7)}


def test_docker_format_is_a_manifest_list() -> None:
    index = build_index([(AMD, _image("a", "docker"))])
    assert index.manifest.media_type == MediaType.DOCKER_LIST


def test_bad_indexes() -> None:
    with pytest.raises(ImageIndexError, match="two images for platform linux/arm64"):
        build_index([(ARM, _image("a")), (ARM, _image("b"))])
    with pytest.raises(ImageIndexError, match="one format"):
        build_index([(ARM, _image("a")), (AMD, _image("b", "docker"))])
    with pytest.raises(ImageIndexError, match="at least one"):
        build_index([])


def test_a_platform_with_a_variant_sorts_beside_the_same_one_without() -> None:
    """linux/arm and linux/arm/v7 in one index: no variant sorts first (comparing None
    with "v7" must not fail), in either order given."""
    plain, v7 = _image("arm"), _image("v7")
    arm = Platform("linux", "arm")
    for given in ([(V7, v7), (arm, plain)], [(arm, plain), (V7, v7)]):
        doc = json.loads(build_index(given).manifest.data or b"")
        assert [m["digest"] for m in doc["manifests"]] == [
            plain.manifest.digest,
            v7.manifest.digest,
        ]
