"""OCI image manifests and Docker schema 2 manifests, as canonical JSON bytes.

Both formats share one shape; Docker's differs in media types only. Layer
annotations (the store paths a layer holds) are kept in both: the distribution
registry stores manifests byte for byte, and Docker and containerd ignore fields
they do not know while containerd hands annotations to snapshotters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from stowaway.errors import StowawayError
from stowaway.image.config import canonical_json
from stowaway.image.model import Blob, Layer, MediaType

#: Docker schema 2 has one compressed layer type; we only ever write gzip layers to it.
_DOCKER_LAYER = {
    MediaType.OCI_LAYER_GZIP: MediaType.DOCKER_LAYER_GZIP,
    MediaType.DOCKER_LAYER_GZIP: MediaType.DOCKER_LAYER_GZIP,
}


class ManifestError(StowawayError):
    """Layers or config that a manifest format cannot describe."""


def layer_media_type(media_type: str, format: Literal["oci", "docker"]) -> str:
    """The media type a layer is listed under in a ``format`` manifest."""
    if format == "oci":
        return media_type
    try:
        return _DOCKER_LAYER[MediaType(media_type)].value
    except (ValueError, KeyError):
        raise ManifestError(
            f"layer media type {media_type} cannot be used in a Docker schema 2 manifest",
            hint="use --compression gzip with --format docker, or --format oci",
        ) from None


def config_media_type(format: Literal["oci", "docker"]) -> str:
    return (MediaType.OCI_CONFIG if format == "oci" else MediaType.DOCKER_CONFIG).value


def manifest_media_type(format: Literal["oci", "docker"]) -> str:
    return (MediaType.OCI_MANIFEST if format == "oci" else MediaType.DOCKER_MANIFEST).value


def build_manifest(
    config: Blob, layers: Sequence[Layer], format: Literal["oci", "docker"] = "oci"
) -> bytes:
    """The manifest for ``config`` and ``layers`` (bottom first) as canonical JSON."""
    if format not in ("oci", "docker"):
        raise ManifestError(f"unknown image format {format!r} (expected oci or docker)")
    if config.media_type != config_media_type(format):
        raise ManifestError(
            f"config blob has media type {config.media_type}, "
            f"a {format} manifest needs {config_media_type(format)}"
        )
    doc = {
        "schemaVersion": 2,
        "mediaType": manifest_media_type(format),
        "config": config.descriptor().to_json(),
        "layers": [
            layer.descriptor(layer.annotations).to_json()
            | {"mediaType": layer_media_type(layer.media_type, format)}
            for layer in layers
        ],
    }
    return canonical_json(doc)
