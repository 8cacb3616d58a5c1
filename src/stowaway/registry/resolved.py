"""What becomes of a resolver's output: checked, copied into storage, remembered.

``ResolvedManifests.resolve`` runs the ``ManifestResolver`` for a name the storage
does not answer, one run per (name, reference, Accept) at a time (``SingleFlight``).
Every blob file the resolver names (the layer cache, served in place) is hashed
before use, once per version of the file (``VerifiedFiles``); a damaged one is
dropped so the resolver composes it anew. The blobs are then copied and linked
into storage and the manifest (an index after its platforms' manifests) is stored by
digest (never tagged, see ``resolver``);
which (name, digest) pairs are in storage is remembered, so a cached manifest
pulled again by tag costs no storage writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stowaway.distribution.errors import ErrorCode, RegistryApiError
from stowaway.image.digest import sha256_digest
from stowaway.registry.metrics import Metrics
from stowaway.registry.resolver import MANIFEST_TYPES, ManifestResolver, ResolvedManifest
from stowaway.registry.singleflight import SingleFlight
from stowaway.registry.storage_api import Storage
from stowaway.registry.validate import check_digest
from stowaway.registry.verified import VerifiedFiles

log = logging.getLogger("stowaway.registry")

Stored = tuple[bytes, str, str]  # data, media type, digest


class ResolvedManifests:
    """The resolver's output in ``storage`` (see module docstring); builds and
    failures are counted in ``metrics``."""

    def __init__(
        self, storage: Storage, resolver: ManifestResolver | None, metrics: Metrics
    ) -> None:
        self.storage = storage
        self.resolver = resolver
        self.metrics = metrics
        self.flight: SingleFlight[Stored | None] = SingleFlight()
        #: (name, digest) of resolver output already in storage: a cached manifest
        #: pulled again by tag is answered without touching storage
        self._ingested: set[tuple[str, str]] = set()
        #: resolver blob files (served in place, unhashed) known to hold their digest
        self.verified = VerifiedFiles()

    async def resolve(self, name: str, ref: str, accept: frozenset[str]) -> Stored | None:
        """The resolver's manifest for ``name:ref``, stored; ``None`` when there is
        no resolver or it knows no such manifest."""
        resolver = self.resolver
        if resolver is None:
            return None

        async def work() -> Stored | None:
            try:
                result = await resolver.resolve(name, ref, accept)
                if result is not None and not await self._blobs_intact(result):
                    # the damaged cache files were dropped: the resolver composes anew
                    result = await resolver.resolve(name, ref, accept)
                    if result is not None and not await self._blobs_intact(result):
                        raise RegistryApiError.of(
                            ErrorCode.UNKNOWN,
                            f"{name}:{ref}: the composed blobs were damaged again",
                        )
                if result is None:
                    return None
                stored = await self._ingest(name, result)
            except RegistryApiError:
                raise
            except Exception:
                self.metrics.build_failures += 1
                raise
            self.metrics.builds += 1
            return stored

        return await self.flight.do((name, ref, accept), work)

    async def served_intact(self, digest: str, path: Path) -> bool:
        """Whether the local file ``path`` about to be served holds ``digest``.
        Resolver output is re-checked if the file changed since it was verified; a
        damaged file is dropped, and False means the blob is not to be served."""
        if not self.verified.tracks(digest) or await self._keep_if_intact(digest, path):
            return True
        # manifests naming the blob must be ingested anew (put_blob_file) on the
        # next pull; which ones is not recorded, and damage is rare: forget all
        self._ingested.clear()
        return False

    def forget(self, name: str, digest: str) -> None:
        """Manifest ``digest`` of ``name`` is being deleted: ingest it anew if resolved again."""
        self._ingested.discard((name, digest))

    async def _blobs_intact(self, result: ResolvedManifest) -> bool:
        """Check every blob file a resolver named (hashing each version of a file
        once); a damaged one is unlinked, so the layer cache misses and rebuilds it
        instead of it being served on every pull."""
        intact = True
        for digest, path in sorted(result.blobs.items()):
            intact &= await self._keep_if_intact(check_digest(digest), path)
        return intact

    async def _keep_if_intact(self, digest: str, path: Path) -> bool:
        """Whether ``path`` holds ``digest``; if not, it is dropped (to be composed again)."""
        if await self.verified.check(digest, path):
            return True
        log.warning("%s does not hold %s: dropped, to be composed again", path, digest)
        path.unlink(missing_ok=True)
        return False

    async def _ingest(self, name: str, result: ResolvedManifest) -> Stored:
        """Store what a resolver produced: blobs first, then the manifest by digest."""
        if result.media_type not in MANIFEST_TYPES:
            raise RegistryApiError.of(
                ErrorCode.UNKNOWN, f"resolver returned unsupported media type {result.media_type}"
            )
        digest = sha256_digest(result.data)
        if (name, digest) in self._ingested:
            return result.data, result.media_type, digest
        for blob, path in sorted(result.blobs.items()):
            await self.storage.put_blob_file(check_digest(blob), path)
            await self.storage.link_blob(name, blob)
        for data, media_type in result.manifests:  # an index's: before it refers to them
            await self.storage.put_manifest(name, sha256_digest(data), data, media_type)
        await self.storage.put_manifest(name, digest, result.data, result.media_type)
        if len(self._ingested) >= 100_000:
            self._ingested.clear()
        self._ingested.add((name, digest))
        return result.data, result.media_type, digest
