"""Image indexes (OCI ``image.index.v1``, Docker manifest lists): one name, one image per
platform, each client pulling its own.

The index lists its images sorted by platform, so the same images give the same index
digest whatever order they were named in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stowaway.errors import StowawayError
from stowaway.image.config import canonical_json
from stowaway.image.digest import sha256_digest
from stowaway.image.model import Blob, Image, MediaType
from stowaway.image.platform import Platform

__all__ = ["ImageIndex", "ImageIndexError", "build_index", "index_blob", "index_media_type"]


class ImageIndexError(StowawayError):
    """Images that cannot share an index."""


@dataclass
class ImageIndex:
    """An index blob (``manifest``) and the images it lists, by platform."""

    images: list[tuple[Platform, Image]]
    manifest: Blob
    format: str = "oci"

    def blobs(self) -> list[Blob]:
        """Every image's config and layers, once each (images share layers); like
        ``Image.blobs`` no manifest: a registry takes those as manifests."""
        seen: dict[str, Blob] = {}
        for _, image in self.images:
            for blob in image.blobs():
                seen.setdefault(blob.digest, blob)
        return list(seen.values())

    def manifests(self) -> list[Blob]:
        """The platforms' manifests, then the index itself."""
        return [*(image.manifest for _, image in self.images), self.manifest]


def index_media_type(format: str) -> str:
    return (MediaType.OCI_INDEX if format == "oci" else MediaType.DOCKER_LIST).value


def build_index(images: Sequence[tuple[Platform, Image]]) -> ImageIndex:
    """The index of ``images`` (one per platform, all of one format)."""
    formats = {image.format for _, image in images}
    if len(formats) > 1:
        raise ImageIndexError(f"images of an index must share one format, got {sorted(formats)}")
    fmt = formats.pop() if formats else "oci"
    blob = index_blob([(p, image.manifest) for p, image in images], fmt)
    return ImageIndex(images=sorted(images, key=lambda pi: pi[0]), manifest=blob, format=fmt)


def index_blob(manifests: Sequence[tuple[Platform, Blob]], format: str) -> Blob:
    """The ``format`` (oci or docker) index listing each platform's manifest."""
    if not manifests:
        raise ImageIndexError("an image index needs at least one image")
    ordered = sorted(manifests, key=lambda pm: pm[0])
    platforms = [p for p, _ in ordered]
    dup = next((p for i, p in enumerate(platforms) if p in platforms[:i]), None)
    if dup is not None:
        raise ImageIndexError(
            f"two images for platform {dup}", hint="name each platform once with --platform"
        )
    doc = {
        "schemaVersion": 2,
        "mediaType": index_media_type(format),
        "manifests": [m.descriptor().to_json() | {"platform": p.to_json()} for p, m in ordered],
    }
    data = canonical_json(doc)
    return Blob(sha256_digest(data), len(data), index_media_type(format), data=data)
