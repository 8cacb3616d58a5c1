"""S3-compatible storage backend, so several stateless replicas share one store.

Same key layout as ``FilesystemStorage`` under ``<prefix>/``; the boto3 plumbing
(executor calls, listings, multipart streaming writes) is ``s3_bucket.S3Bucket``.
A blob becomes visible only when a multipart upload is *completed* (or a single
``PutObject`` made), which happens after the digest was verified: S3 gives us the
atomic commit, and a rejected upload is aborted.

Chunked uploads keep each PATCH as its own object ``_uploads/<id>/<offset>``
(S3 cannot append, and client chunks may be smaller than S3's 5 MiB part
minimum); the final PUT streams them back, hashing, into the blob's multipart
upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

from stowaway.distribution.errors import ErrorCode, RegistryApiError
from stowaway.image.digest import sha256_digest
from stowaway.registry.s3_bucket import S3Bucket, StreamedObject
from stowaway.registry.storage_api import (
    CHUNK,
    check_offset,
    digest_mismatch,
    rechunk,
    too_large,
    upload_unknown,
)


class S3Storage(S3Bucket):
    """The ``Storage`` backend on S3 (see module docstring)."""

    def _blob(self, digest: str) -> str:
        return self._key("blobs", "sha256", digest.removeprefix("sha256:"))

    # -- blobs -----------------------------------------------------------------
    async def blob_size(self, digest: str) -> int | None:
        head = await self._head(self._blob(digest))
        return int(head["ContentLength"]) if head is not None else None

    def blob_path(self, digest: str) -> Path | None:
        return None

    def read_blob(self, digest: str, start: int, end: int) -> AsyncIterator[bytes]:
        return self._stream(self._blob(digest), Range=f"bytes={start}-{end}")

    async def _write_verified(
        self, key: str, digest: str, chunks: AsyncIterable[bytes], limit: int, where: str
    ) -> int:
        """Stream into ``key``; complete only if the sha256 matches ``digest`` and the
        size stays within ``limit``, else abort."""
        h = hashlib.sha256()
        loop = asyncio.get_running_loop()
        writer = StreamedObject(self, key)
        try:
            async for chunk in rechunk(chunks):
                if writer.size + len(chunk) > limit:
                    raise too_large(limit, where)
                await loop.run_in_executor(None, h.update, chunk)
                await writer.write(chunk)
            actual = "sha256:" + h.hexdigest()
            if actual != digest:
                raise digest_mismatch(digest, actual)
            await writer.complete()
            return writer.size
        finally:
            await writer.abort()

    async def put_blob(self, digest: str, chunks: AsyncIterable[bytes], limit: int) -> int:
        return await self._write_verified(
            self._blob(digest), digest, chunks, limit, f"blob {digest}"
        )

    async def put_blob_file(self, digest: str, path: Path) -> None:
        if await self.blob_size(digest) is not None:
            return

        async def read() -> AsyncIterator[bytes]:
            with open(path, "rb") as f:
                while chunk := await asyncio.get_running_loop().run_in_executor(
                    None, f.read, CHUNK
                ):
                    yield chunk

        try:
            await self._write_verified(self._blob(digest), digest, read(), 1 << 62, str(path))
        except RegistryApiError as err:
            raise RegistryApiError.of(
                ErrorCode.BLOB_UNKNOWN, f"{path} does not hold {digest}: {err.message}"
            ) from err

    # -- manifests and tags ----------------------------------------------------
    def _repo(self, name: str, *parts: str) -> str:
        return self._key("repositories", name, *parts)

    def _link(self, name: str, digest: str) -> str:
        return self._repo(name, "_layers", digest.removeprefix("sha256:"))

    async def link_blob(self, name: str, digest: str) -> None:
        await self._put(self._link(name, digest), b"")

    async def blob_linked(self, name: str, digest: str) -> bool:
        return await self._head(self._link(name, digest)) is not None

    def _referrer(self, name: str, subject: str, digest: str = "") -> str:
        return self._repo(
            name, "_referrers", subject.removeprefix("sha256:"), digest.removeprefix("sha256:")
        )

    async def add_referrer(self, name: str, subject: str, digest: str, descriptor: bytes) -> None:
        await self._put(self._referrer(name, subject, digest), descriptor)

    async def remove_referrer(self, name: str, subject: str, digest: str) -> None:
        await self._call(
            self._s3.delete_object, Bucket=self.bucket, Key=self._referrer(name, subject, digest)
        )

    async def list_referrers(self, name: str, subject: str) -> list[bytes]:
        keys = sorted(k for k, _ in await self._list(self._referrer(name, subject) + "/"))
        found = [await self._get(k) for k in keys]
        return [d for d in found if d is not None]  # deleted since the listing: skipped

    async def get_manifest(self, name: str, digest: str) -> tuple[bytes, str] | None:
        media_type = await self._get(self._repo(name, "_manifests", digest.removeprefix("sha256:")))
        if media_type is None:
            return None
        data = await self._get(self._blob(digest))
        if data is None or sha256_digest(data) != digest:
            return None
        return data, media_type.decode()

    async def put_manifest(self, name: str, digest: str, data: bytes, media_type: str) -> None:
        await self._put(self._blob(digest), data)
        await self._put(
            self._repo(name, "_manifests", digest.removeprefix("sha256:")), media_type.encode()
        )

    async def delete_manifest(self, name: str, digest: str) -> bool:
        link = self._repo(name, "_manifests", digest.removeprefix("sha256:"))
        if await self._get(link) is None:
            return False
        await self._call(self._s3.delete_object, Bucket=self.bucket, Key=link)
        # the _tags/ keys, not list_tags: that is None once the last manifest is gone
        for key, _ in await self._list(self._repo(name, "_tags") + "/"):
            data = await self._get(key)
            if data is not None and data.decode().strip() == digest:
                await self._call(self._s3.delete_object, Bucket=self.bucket, Key=key)
        return True

    async def get_tag(self, name: str, tag: str) -> str | None:
        data = await self._get(self._repo(name, "_tags", tag))
        return data.decode().strip() if data is not None else None

    async def put_tag(self, name: str, tag: str, digest: str) -> None:
        await self._put(self._repo(name, "_tags", tag), digest.encode())

    async def list_tags(self, name: str) -> list[str] | None:
        if not await self._list(self._repo(name, "_manifests") + "/"):
            return None
        prefix = self._repo(name, "_tags") + "/"
        return sorted(k[len(prefix) :] for k, _ in await self._list(prefix))

    async def list_repositories(self) -> list[str]:
        prefix = self._key("repositories") + "/"
        marker = "/_manifests/"
        keys = [k for k, _ in await self._list(prefix)]
        return sorted({k[len(prefix) : k.index(marker)] for k in keys if marker in k})

    # -- uploads ---------------------------------------------------------------
    def _up(self, upload_id: str, *parts: str) -> str:
        return self._key("_uploads", upload_id, *parts)

    async def _chunks(self, name: str, upload_id: str) -> list[tuple[int, int, str]]:
        """(offset, size, key) of the upload's chunk objects, in order."""
        owner = await self._get(self._up(upload_id, "name"))
        if owner is None or owner.decode() != name:
            raise upload_unknown(upload_id)
        prefix = self._up(upload_id, "data") + "/"
        return sorted((int(k[len(prefix) :]), n, k) for k, n in await self._list(prefix))

    @staticmethod
    def _size(chunks: list[tuple[int, int, str]]) -> int:
        return chunks[-1][0] + chunks[-1][1] if chunks else 0

    async def upload_start(self, name: str) -> str:
        upload_id = secrets.token_hex(16)
        await self._put(self._up(upload_id, "name"), name.encode())
        return upload_id

    async def upload_size(self, name: str, upload_id: str) -> int:
        return self._size(await self._chunks(name, upload_id))

    async def upload_append(
        self, name: str, upload_id: str, offset: int, chunks: AsyncIterable[bytes], limit: int
    ) -> int:
        size = self._size(await self._chunks(name, upload_id))
        check_offset(upload_id, offset, size)
        # streamed: a PATCH may carry a whole layer (docker sends one per layer)
        writer = StreamedObject(self, self._up(upload_id, "data", f"{size:020d}"))
        try:
            async for chunk in rechunk(chunks):
                if size + writer.size + len(chunk) > limit:
                    raise too_large(limit, f"upload {upload_id}")
                await writer.write(chunk)
            if writer.size:
                await writer.complete()
            return size + writer.size
        finally:
            await writer.abort()

    async def upload_finish(
        self,
        name: str,
        upload_id: str,
        digest: str,
        chunks: AsyncIterable[bytes],
        limit: int,
        offset: int,
    ) -> int:
        stored = await self._chunks(name, upload_id)
        check_offset(upload_id, offset, self._size(stored))

        async def everything() -> AsyncIterator[bytes]:
            for _, _n, key in stored:
                async for piece in self._stream(key):
                    yield piece
            async for chunk in chunks:
                yield chunk

        try:
            return await self._write_verified(
                self._blob(digest), digest, everything(), limit, f"upload {upload_id}"
            )
        finally:
            await self._drop_upload(upload_id, stored)

    async def upload_cancel(self, name: str, upload_id: str) -> None:
        await self._drop_upload(upload_id, await self._chunks(name, upload_id))

    async def purge_uploads(self, max_age: float) -> int:
        cutoff = time.time() - max_age
        prefix = self._key("_uploads") + "/"
        last: dict[str, float] = {}
        for obj in await self._objects(prefix):
            upload_id = obj["Key"][len(prefix) :].split("/", 1)[0]
            changed = obj["LastModified"].timestamp()
            last[upload_id] = max(changed, last.get(upload_id, 0.0))
        stale = sorted(u for u, changed in last.items() if changed < cutoff)
        for upload_id in stale:
            await self._delete([k for k, _ in await self._list(self._up(upload_id) + "/")])
        await self._abort_stale_multipart(cutoff)
        return len(stale)

    async def _drop_upload(self, upload_id: str, stored: list[tuple[int, int, str]]) -> None:
        await self._delete([k for _, _, k in stored] + [self._up(upload_id, "name")])
