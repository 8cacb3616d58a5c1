"""The filesystem storage backend (``FilesystemStorage``, the default; the
``Storage`` protocol it implements is in ``storage_api``). Its blob layout,
``<root>/blobs/sha256/<hex>``, is the composer's layer cache layout
(``stowaway.image.layer_cache``), so ``serve`` can share one directory with
``build``. Every write goes to a temp file in the same filesystem and is
``os.replace``d into place after its digest was verified, so a crash or a bad
upload never leaves a file that is later served.

Repository metadata lives under ``<root>/repositories/<name>/`` in ``_manifests``,
``_tags`` and ``_layers``; the ``_`` prefix cannot collide with a name component
(the name grammar starts components with ``[a-z0-9]``). A blob stored once is
served under a name only when ``_layers/<hex>`` links it there (see ``storage_api``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import IO, TypeVar

from stowaway.distribution.errors import ErrorCode, RegistryApiError
from stowaway.fsutil import atomic_write, publish
from stowaway.image.digest import sha256_digest
from stowaway.registry.storage_api import (
    CHUNK,
    check_offset,
    digest_mismatch,
    hash_file,
    rechunk,
    too_large,
    upload_unknown,
)

T = TypeVar("T")


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


async def _io(fn: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _write_hashed(f: IO[bytes], h: hashlib._Hash, data: bytes) -> None:
    f.write(data)
    h.update(data)


class FilesystemStorage:
    """The default backend: plain files under ``root`` (see module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs" / "sha256"
        self._repos = self.root / "repositories"
        self._uploads = self.root / "_uploads"
        for d in (self._blobs, self._repos, self._uploads):
            d.mkdir(parents=True, exist_ok=True)
        # running sha256 per upload: saves re-reading the data at PUT time;
        # dropped (and recomputed from the file) when out of sync with the file
        self._hashers: dict[str, tuple[hashlib._Hash, int]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- blobs -----------------------------------------------------------------
    def _blob(self, digest: str) -> Path:
        return self._blobs / digest.removeprefix("sha256:")

    async def blob_size(self, digest: str) -> int | None:
        try:
            return self._blob(digest).stat().st_size
        except FileNotFoundError:
            return None

    def blob_path(self, digest: str) -> Path | None:
        path = self._blob(digest)
        return path if path.is_file() else None

    async def read_blob(self, digest: str, start: int, end: int) -> AsyncIterator[bytes]:
        with open(self._blob(digest), "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = await _io(f.read, min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

    async def _spool(
        self,
        path: Path,
        mode: str,
        chunks: AsyncIterable[bytes],
        h: hashlib._Hash,
        start: int,
        limit: int,
        where: str,
    ) -> int:
        """Append ``chunks`` to ``path`` while hashing; returns the new size.
        Over the limit: truncate back to ``start`` and raise 413."""
        size = start
        with open(path, mode) as f:
            try:
                async for chunk in rechunk(chunks):
                    size += len(chunk)
                    if size > limit:
                        raise too_large(limit, where)
                    await _io(_write_hashed, f, h, chunk)
                await _io(f.flush)
                await _io(os.fsync, f.fileno())
            except BaseException:
                f.truncate(start)
                raise
        return size

    async def put_blob(self, digest: str, chunks: AsyncIterable[bytes], limit: int) -> int:
        tmp = self._uploads / f"tmp-{secrets.token_hex(16)}"
        h = hashlib.sha256()
        try:
            size = await self._spool(tmp, "wb", chunks, h, 0, limit, f"blob {digest}")
            actual = "sha256:" + h.hexdigest()
            if actual != digest:
                raise digest_mismatch(digest, actual)
            publish(tmp, self._blob(digest))
            return size
        finally:
            tmp.unlink(missing_ok=True)

    async def put_blob_file(self, digest: str, path: Path) -> None:
        target = self._blob(digest)
        if target.exists():
            return
        tmp = self._uploads / f"tmp-{secrets.token_hex(16)}"
        try:
            with open(path, "rb") as src:
                h = hashlib.sha256()
                with open(tmp, "wb") as dst:
                    while chunk := await _io(src.read, CHUNK):
                        await _io(_write_hashed, dst, h, chunk)
                    await _io(dst.flush)  # the buffered tail must reach the fd before fsync
                    await _io(os.fsync, dst.fileno())
            actual = "sha256:" + h.hexdigest()
            if actual != digest:
                raise RegistryApiError.of(
                    ErrorCode.BLOB_UNKNOWN, f"{path} holds {actual}, not the expected {digest}"
                )
            publish(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    # -- manifests and tags ----------------------------------------------------
    def _repo(self, name: str) -> Path:
        return self._repos / name

    def _link(self, name: str, digest: str) -> Path:
        return self._repo(name) / "_layers" / digest.removeprefix("sha256:")

    async def link_blob(self, name: str, digest: str) -> None:
        if not self._link(name, digest).exists():
            await _io(atomic_write, self._link(name, digest), b"")

    async def blob_linked(self, name: str, digest: str) -> bool:
        return self._link(name, digest).exists()

    def _referrer(self, name: str, subject: str, digest: str = "") -> Path:
        return self._repo(name) / "_referrers" / _hex(subject) / _hex(digest)

    async def add_referrer(self, name: str, subject: str, digest: str, descriptor: bytes) -> None:
        await _io(atomic_write, self._referrer(name, subject, digest), descriptor)

    async def remove_referrer(self, name: str, subject: str, digest: str) -> None:
        self._referrer(name, subject, digest).unlink(missing_ok=True)

    async def list_referrers(self, name: str, subject: str) -> list[bytes]:
        folder = self._referrer(name, subject)
        if not folder.is_dir():
            return []
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".tmp-"))
        return [p.read_bytes() for p in entries]

    async def get_manifest(self, name: str, digest: str) -> tuple[bytes, str] | None:
        link = self._repo(name) / "_manifests" / digest.removeprefix("sha256:")
        try:
            media_type = link.read_text().strip()
            data = self._blob(digest).read_bytes()
        except FileNotFoundError:
            return None
        if sha256_digest(data) != digest:
            return None  # a corrupt blob is never served
        return data, media_type

    async def put_manifest(self, name: str, digest: str, data: bytes, media_type: str) -> None:
        if not self._blob(digest).exists():
            await _io(atomic_write, self._blob(digest), data)
        link = self._repo(name) / "_manifests" / digest.removeprefix("sha256:")
        await _io(atomic_write, link, media_type.encode())

    async def delete_manifest(self, name: str, digest: str) -> bool:
        repo = self._repo(name)
        link = repo / "_manifests" / digest.removeprefix("sha256:")
        if not link.exists():
            return False
        link.unlink()
        tags = repo / "_tags"
        if tags.is_dir():
            for tag in tags.iterdir():
                if not tag.name.startswith(".tmp-") and tag.read_text().strip() == digest:
                    tag.unlink(missing_ok=True)
        return True

    async def get_tag(self, name: str, tag: str) -> str | None:
        try:
            return (self._repo(name) / "_tags" / tag).read_text().strip()
        except FileNotFoundError:
            return None

    async def put_tag(self, name: str, tag: str, digest: str) -> None:
        await _io(atomic_write, self._repo(name) / "_tags" / tag, digest.encode())

    async def list_tags(self, name: str) -> list[str] | None:
        repo = self._repo(name)
        if not (repo / "_manifests").is_dir():
            return None
        tags = repo / "_tags"
        names = [p.name for p in tags.iterdir()] if tags.is_dir() else []
        return sorted(n for n in names if not n.startswith(".tmp-"))

    async def list_repositories(self) -> list[str]:
        out = []
        for dirpath, dirnames, _ in os.walk(self._repos):
            if "_manifests" in dirnames:
                out.append(os.path.relpath(dirpath, self._repos))
            dirnames[:] = [d for d in dirnames if not d.startswith("_")]
        return sorted(out)

    # -- uploads ---------------------------------------------------------------
    def _upload(self, upload_id: str) -> Path:
        return self._uploads / upload_id

    def _check_upload(self, name: str, upload_id: str) -> Path:
        try:
            owner = (self._uploads / f"{upload_id}.name").read_text()
        except FileNotFoundError:
            raise upload_unknown(upload_id) from None
        if owner != name:
            raise upload_unknown(upload_id)
        return self._upload(upload_id)

    def _lock(self, upload_id: str) -> asyncio.Lock:
        return self._locks.setdefault(upload_id, asyncio.Lock())

    async def upload_start(self, name: str) -> str:
        upload_id = secrets.token_hex(16)
        self._upload(upload_id).touch()
        await _io(atomic_write, self._uploads / f"{upload_id}.name", name.encode())
        self._hashers[upload_id] = (hashlib.sha256(), 0)
        return upload_id

    async def upload_size(self, name: str, upload_id: str) -> int:
        try:
            return self._check_upload(name, upload_id).stat().st_size
        except FileNotFoundError:  # finished, cancelled or purged meanwhile
            raise upload_unknown(upload_id) from None

    async def _hasher(self, upload_id: str, path: Path, size: int) -> hashlib._Hash:
        state = self._hashers.pop(upload_id, None)
        if state is not None and state[1] == size:
            return state[0]
        h, hashed = await _io(hash_file, path)
        if hashed != size:
            raise upload_unknown(upload_id)
        return h

    async def upload_append(
        self, name: str, upload_id: str, offset: int, chunks: AsyncIterable[bytes], limit: int
    ) -> int:
        self._check_upload(name, upload_id)
        async with self._lock(upload_id):
            # again under the lock: a request we waited for may have finished the upload
            path = self._check_upload(name, upload_id)
            size = await self.upload_size(name, upload_id)
            check_offset(upload_id, offset, size)
            h = await self._hasher(upload_id, path, size)
            new_size = await self._spool(path, "ab", chunks, h, size, limit, f"upload {upload_id}")
            self._hashers[upload_id] = (h, new_size)
            return new_size

    async def upload_finish(
        self,
        name: str,
        upload_id: str,
        digest: str,
        chunks: AsyncIterable[bytes],
        limit: int,
        offset: int,
    ) -> int:
        self._check_upload(name, upload_id)
        async with self._lock(upload_id):
            path = self._check_upload(name, upload_id)  # again: see upload_append
            size = await self.upload_size(name, upload_id)
            check_offset(upload_id, offset, size)
            h = await self._hasher(upload_id, path, size)
            try:
                size = await self._spool(path, "ab", chunks, h, size, limit, f"upload {upload_id}")
                actual = "sha256:" + h.hexdigest()
                if actual != digest:
                    raise digest_mismatch(digest, actual)
                publish(path, self._blob(digest))
            finally:
                self._forget(upload_id)
            return size

    async def upload_cancel(self, name: str, upload_id: str) -> None:
        self._check_upload(name, upload_id)
        self._forget(upload_id)

    def _forget(self, upload_id: str) -> None:
        self._upload(upload_id).unlink(missing_ok=True)
        (self._uploads / f"{upload_id}.name").unlink(missing_ok=True)
        self._hashers.pop(upload_id, None)
        self._locks.pop(upload_id, None)

    async def purge_uploads(self, max_age: float) -> int:
        cutoff = time.time() - max_age
        purged = 0
        for upload_id in await _io(self._scan_uploads, cutoff):
            # decided here on the loop, where the locks live: a locked upload is in
            # use, and one appended to since the scan is not stale
            lock = self._locks.get(upload_id)
            if (lock is not None and lock.locked()) or self._changed_since(upload_id, cutoff):
                continue
            self._forget(upload_id)
            purged += 1
        # state left behind by uploads whose files vanished some other way
        for upload_id in [*self._hashers, *self._locks]:
            if not self._upload(upload_id).exists():
                self._hashers.pop(upload_id, None)
                self._locks.pop(upload_id, None)
        return purged

    def _scan_uploads(self, cutoff: float) -> list[str]:
        """Ids of uploads last changed before ``cutoff``; on the way, removes temp
        files older than that (left by a crash)."""
        last: dict[str, float] = {}
        for entry in os.scandir(self._uploads):
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if entry.name.startswith(("tmp-", ".tmp-")):  # put_blob's, atomic_write's
                if mtime < cutoff:
                    Path(entry.path).unlink(missing_ok=True)
                continue
            upload_id = entry.name.removesuffix(".name")
            last[upload_id] = max(mtime, last.get(upload_id, 0.0))
        return sorted(u for u, mtime in last.items() if mtime < cutoff)

    def _changed_since(self, upload_id: str, cutoff: float) -> bool:
        try:
            return self._upload(upload_id).stat().st_mtime >= cutoff
        except FileNotFoundError:
            return False
