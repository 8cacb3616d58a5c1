"""The S3 plumbing under ``s3.S3Storage``: one bucket and key prefix, reached with
boto3. boto3 is synchronous, so every call runs in the default thread executor;
listings are read page by page; bulk data moves in 8 MiB multipart-upload parts
(``StreamedObject``), so memory stays bounded whatever an object's size.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from stowaway.errors import StowawayError
from stowaway.registry.storage_api import CHUNK

PART = 8 << 20  # > S3's 5 MiB minimum part size
T = TypeVar("T")


def _missing(err: ClientError) -> bool:
    code = str(err.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchUpload")


class S3Bucket:
    """Objects under ``s3://bucket/prefix``: get, put, head, stream, list, delete."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StowawayError(f"storage URL {url!r} is not s3://bucket[/prefix]")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self._s3: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(max_pool_connections=32, retries={"max_attempts": 3}),
        )

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking boto3 call in the thread executor."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: fn(*args, **kwargs))

    async def _get(self, key: str) -> bytes | None:
        try:
            obj = await self._call(self._s3.get_object, Bucket=self.bucket, Key=key)
        except ClientError as err:
            if _missing(err):
                return None
            raise
        data: bytes = await self._call(obj["Body"].read)
        return data

    async def _put(self, key: str, data: bytes) -> None:
        await self._call(self._s3.put_object, Bucket=self.bucket, Key=key, Body=data)

    async def _head(self, key: str) -> dict[str, Any] | None:
        """HeadObject's answer, ``None`` when there is no such object."""
        try:
            head: dict[str, Any] = await self._call(
                self._s3.head_object, Bucket=self.bucket, Key=key
            )
        except ClientError as err:
            if _missing(err):
                return None
            raise
        return head

    async def _stream(self, key: str, **kwargs: Any) -> AsyncIterator[bytes]:
        """An object's bytes (a part of them with ``Range=``), CHUNK at a time."""
        obj = await self._call(self._s3.get_object, Bucket=self.bucket, Key=key, **kwargs)
        body = obj["Body"]
        try:
            while chunk := await self._call(body.read, CHUNK):
                yield chunk
        finally:
            body.close()

    async def _objects(self, prefix: str) -> list[dict[str, Any]]:
        """ListObjectsV2 entries (Key, Size, LastModified, ...) under ``prefix``, all pages."""
        out: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call(self._s3.list_objects_v2, **kwargs)
            out += page.get("Contents", [])
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    async def _list(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under ``prefix``."""
        return [(o["Key"], int(o["Size"])) for o in await self._objects(prefix)]

    async def _abort_stale_multipart(self, cutoff: float) -> None:
        """Abort multipart uploads a crashed replica left open (their parts cost
        storage but are invisible to object listings)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key()}
        while True:
            page = await self._call(self._s3.list_multipart_uploads, **kwargs)
            for up in page.get("Uploads", []):
                if up["Initiated"].timestamp() < cutoff:
                    await self._call(
                        self._s3.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=up["Key"],
                        UploadId=up["UploadId"],
                    )
            if not page.get("IsTruncated"):
                return
            kwargs["KeyMarker"] = page["NextKeyMarker"]
            kwargs["UploadIdMarker"] = page["NextUploadIdMarker"]

    async def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            await self._call(
                self._s3.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
            )


class StreamedObject:
    """One object written as it streams in: bytes are buffered up to ``PART`` and
    sent as multipart-upload parts, so memory stays bounded whatever the size; an
    object smaller than one part is a single PutObject. Nothing is visible until
    ``complete``; ``abort`` (a no-op after ``complete``) discards the parts."""

    def __init__(self, bucket: S3Bucket, key: str) -> None:
        self._bucket = bucket
        self._key = key
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._done = False
        self.size = 0

    async def write(self, chunk: bytes) -> None:
        self._buf += chunk
        self.size += len(chunk)
        if len(self._buf) >= PART:
            await self._flush()

    async def _flush(self) -> None:
        st = self._bucket
        if self._upload_id is None:
            mpu = await st._call(st._s3.create_multipart_upload, Bucket=st.bucket, Key=self._key)
            self._upload_id = mpu["UploadId"]
        n = len(self._parts) + 1
        res = await st._call(
            st._s3.upload_part,
            Bucket=st.bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=n,
            Body=bytes(self._buf),
        )
        self._parts.append({"PartNumber": n, "ETag": res["ETag"]})
        self._buf.clear()

    async def complete(self) -> None:
        st = self._bucket
        if self._upload_id is None:
            await st._put(self._key, bytes(self._buf))
        else:
            if self._buf:
                await self._flush()
            await st._call(
                st._s3.complete_multipart_upload,
                Bucket=st.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        self._done = True

    async def abort(self) -> None:
        if self._upload_id is not None and not self._done:
            st = self._bucket
            self._done = True
            await st._call(
                st._s3.abort_multipart_upload,
                Bucket=st.bucket,
                Key=self._key,
                UploadId=self._upload_id,
            )
