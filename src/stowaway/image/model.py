"""The image vocabulary shared by the composer, the sinks and the registry.

Modelled on go-containerregistry: a blob knows its digest, size and media type
and can open its bytes; a layer adds its diff_id and the store paths it holds;
an image is layers + config + manifest. Bytes are read only when a sink needs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, Literal

EntryType = Literal["regular", "directory", "symlink"]


class MediaType(StrEnum):
    OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
    OCI_INDEX = "application/vnd.oci.image.index.v1+json"
    OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
    OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
    OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
    OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
    DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
    DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
    DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
    DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

    @property
    def is_manifest(self) -> bool:
        return self in (MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST)


@dataclass
class TarEntry:
    """One member of a layer tarball before it is serialised.

    ``name`` is relative to the layer root without a leading slash
    (``b"nix/store/<hash>-x/bin/sh"``); directories carry no trailing slash.
    For regular files ``chunks`` yields exactly ``size`` bytes. ``uid``/``gid`` are 0
    unless an ownership rule (``image.ownership``) says otherwise.
    """

    name: bytes
    kind: EntryType
    mode: int
    size: int = 0
    target: bytes = b""
    chunks: Iterator[bytes] = field(default_factory=lambda: iter(()))
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        return out


@dataclass
class Blob:
    """Content-addressed bytes. ``path`` is a file holding exactly these bytes (a
    cache entry); ``data`` holds small blobs (config, manifest) in memory."""

    digest: str
    size: int
    media_type: str
    path: Path | None = None
    data: bytes | None = None
    #: ``path`` is a layer-cache entry: dropped when its bytes turn out corrupt, and
    #: hard-linked into layouts. False for files that are only read (a base image's
    #: OCI layout): those are copied, and never removed.
    cached: bool = True

    def open(self) -> BinaryIO:
        """Open the bytes. Callers that copy them must verify the digest while
        copying (see ``stowaway.image.digest.VerifyingReader``) and treat a
        mismatch as a corrupt cache entry."""
        if self.data is not None:
            import io

            return io.BytesIO(self.data)
        if self.path is None:
            raise ValueError(f"blob {self.digest} has neither data nor path")
        return open(self.path, "rb")

    def descriptor(self, annotations: dict[str, str] | None = None) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size, annotations or {})


@dataclass
class Layer(Blob):
    """A compressed layer blob plus what the image needs to know about it."""

    diff_id: str = ""
    store_paths: tuple[str, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)
    #: True when the layer came from the cache (or, after a push, the registry had it).
    reused: bool = False
    #: ``(registry API host, repository)`` holding this blob (a base image's layer):
    #: a push to that host mounts it from there instead of uploading it.
    origin: tuple[str, str] | None = None


@dataclass
class Image:
    """A composed image: layers bottom to top, config and manifest blobs."""

    layers: list[Layer]
    config: Blob
    manifest: Blob
    format: Literal["oci", "docker"] = "oci"

    def blobs(self) -> list[Blob]:
        """Every blob the image references, config first, then layers."""
        return [self.config, *self.layers]
