"""The hook through which images are produced on demand (Nixery-style).

The API asks the resolver only for a ``name:reference`` that storage does not
hold (or holds in a format the client does not accept). Whatever the resolver
returns is checked, its blobs are copied into storage and the manifest is
stored by digest (never tagged: tags of resolved names stay the resolver's to
answer, so a changed package index yields a new image without a restart).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from stowaway.image.model import MediaType

MANIFEST_TYPES = frozenset(
    {
        MediaType.OCI_MANIFEST.value,
        MediaType.OCI_INDEX.value,
        MediaType.DOCKER_MANIFEST.value,
        MediaType.DOCKER_LIST.value,
    }
)


@dataclass(frozen=True)
class ResolvedManifest:
    data: bytes
    media_type: str
    #: digest -> local file holding that blob (config, layers); the layer cache
    blobs: Mapping[str, Path] = field(default_factory=dict)
    #: for an index: its platforms' manifests (data, media type), stored before it
    manifests: Sequence[tuple[bytes, str]] = ()


class ManifestResolver(Protocol):
    async def resolve(
        self, name: str, reference: str, accept: frozenset[str]
    ) -> ResolvedManifest | None:
        """Produce the manifest for ``name:reference`` in one of the ``accept``ed
        manifest media types (empty set = any; OCI preferred). ``None`` means
        MANIFEST_UNKNOWN; raise ``RegistryApiError`` to answer a specific error
        (e.g. MANIFEST_UNKNOWN naming unknown packages)."""
        ...
