"""What every storage backend is and shares: the ``Storage`` protocol the API layer
talks to, and the pieces both backends (``storage.FilesystemStorage``,
``s3.S3Storage``) use: the chunk size, the errors a write answers with, the upload
offset check and the stream regrouping and file hashing.

Blob *bytes* are one content-addressed namespace shared by all repositories (stored
once), but a blob is served under a name only when it is linked there (``link_blob``):
it was pushed or mounted there, or a manifest of that name (also one composed on
demand) references it. Knowing a digest is no key to another repository's content.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Protocol

from stowaway.distribution.errors import ErrorCode, RegistryApiError

CHUNK = 1 << 20  # 1 MiB: large enough that hashing/writing releases the GIL usefully


class Storage(Protocol):
    """Blob, manifest, tag and upload persistence. Names, tags and digests are
    validated by the caller (``stowaway.registry.validate``) before they get here."""

    async def blob_size(self, digest: str) -> int | None: ...
    def blob_path(self, digest: str) -> Path | None:
        """A local file holding the blob, for zero-copy sendfile; ``None`` when the
        backend has no local file (the caller then streams ``read_blob``)."""
        ...

    def read_blob(self, digest: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Stream bytes ``start..end`` (inclusive) of a blob."""
        ...

    async def put_blob(self, digest: str, chunks: AsyncIterable[bytes], limit: int) -> int:
        """Store a blob from a stream, verifying ``digest`` and ``limit`` while
        streaming; on failure nothing is stored. Returns the size."""
        ...

    async def put_blob_file(self, digest: str, path: Path) -> None:
        """Store a blob from a local file (resolver output) unless present."""
        ...

    async def link_blob(self, name: str, digest: str) -> None:
        """Make a stored blob visible under repository ``name``."""
        ...

    async def blob_linked(self, name: str, digest: str) -> bool:
        """Whether the blob is visible under ``name`` (see ``link_blob``)."""
        ...

    async def add_referrer(self, name: str, subject: str, digest: str, descriptor: bytes) -> None:
        """Record manifest ``digest`` of ``name`` as a referrer of ``subject``; the
        descriptor (JSON) is what the referrers API lists."""
        ...

    async def remove_referrer(self, name: str, subject: str, digest: str) -> None: ...
    async def list_referrers(self, name: str, subject: str) -> list[bytes]:
        """The descriptors recorded for ``subject`` in ``name``, in digest order."""
        ...

    async def get_manifest(self, name: str, digest: str) -> tuple[bytes, str] | None: ...
    async def put_manifest(self, name: str, digest: str, data: bytes, media_type: str) -> None: ...
    async def delete_manifest(self, name: str, digest: str) -> bool: ...
    async def get_tag(self, name: str, tag: str) -> str | None: ...
    async def put_tag(self, name: str, tag: str, digest: str) -> None: ...
    async def list_tags(self, name: str) -> list[str] | None:
        """Sorted tags, or ``None`` when the repository does not exist."""
        ...

    async def list_repositories(self) -> list[str]: ...
    async def upload_start(self, name: str) -> str: ...
    async def upload_size(self, name: str, upload_id: str) -> int: ...
    async def upload_append(
        self, name: str, upload_id: str, offset: int, chunks: AsyncIterable[bytes], limit: int
    ) -> int: ...
    async def upload_finish(
        self,
        name: str,
        upload_id: str,
        digest: str,
        chunks: AsyncIterable[bytes],
        limit: int,
        offset: int,
    ) -> int:
        """Append the last chunk (at ``offset``, which must be the upload's end, else
        RANGE_INVALID with the upload kept), verify ``digest`` and publish the blob;
        on any other failure the upload is dropped."""
        ...

    async def upload_cancel(self, name: str, upload_id: str) -> None: ...
    async def purge_uploads(self, max_age: float) -> int:
        """Drop uploads whose data has not changed for ``max_age`` seconds (clients
        that went away); returns how many were dropped."""
        ...


def too_large(limit: int, where: str) -> RegistryApiError:
    return RegistryApiError(
        413, [(ErrorCode.SIZE_INVALID.value, f"{where} exceeds the upload limit of {limit} bytes")]
    )


def digest_mismatch(expected: str, actual: str) -> RegistryApiError:
    return RegistryApiError.of(
        ErrorCode.DIGEST_INVALID, f"content digest is {actual}, but {expected} was given"
    )


def upload_unknown(upload_id: str) -> RegistryApiError:
    return RegistryApiError.of(ErrorCode.BLOB_UPLOAD_UNKNOWN, f"unknown upload {upload_id}")


def check_offset(upload_id: str, offset: int, size: int) -> None:
    """A chunk must start where the upload ends (416 otherwise; the upload is kept)."""
    if offset != size:
        raise RegistryApiError.of(
            ErrorCode.RANGE_INVALID,
            f"chunk starts at byte {offset}, but upload {upload_id} holds {size} bytes",
        )


async def rechunk(chunks: AsyncIterable[bytes], size: int = CHUNK) -> AsyncIterator[bytes]:
    """Regroup a network stream (often 64 KiB pieces) into ``size``-byte buffers."""
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) >= size:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


def hash_file(path: Path) -> tuple[hashlib._Hash, int]:
    """sha256 and size of a file, read in CHUNK pieces."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h, size
