"""Digest-checked reads of content-addressed blobs.

Cache entries are trusted only as far as their bytes hash to their name: every
reader that copies a blob out (sinks, the registry) hashes while it reads, so a
flipped or missing byte is caught at the moment it would be emitted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, BinaryIO

from stowaway.errors import StowawayError
from stowaway.image.model import Blob

if TYPE_CHECKING:  # the BuildKit frontend ships this module without stowaway.parallel
    from stowaway.parallel import Stop

#: Read size for bulk copies: large enough that hashlib releases the GIL and
#: per-call overhead vanishes.
CHUNK = 1 << 20


class CorruptBlob(StowawayError):
    """Blob bytes that do not match their digest or size (a damaged cache entry)."""

    def __init__(self, message: str, *, digest: str, where: str) -> None:
        super().__init__(
            f"corrupt blob {digest} ({where}): {message}",
            hint="the damaged cache entry is dropped; build again to recreate it",
        )
        self.digest = digest
        self.where = where


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``: the content address of a blob held in memory."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_id(parent_chain: str, diff_id: str) -> str:
    """OCI's ChainID of a layer on ``parent_chain``: its diff_id for a base layer
    (``parent_chain`` ""), else sha256 of "<parent chain> <diff_id>"."""
    return sha256_digest(f"{parent_chain} {diff_id}".encode()) if parent_chain else diff_id


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain IDs of a stack of layers, bottom first."""
    out: list[str] = []
    for d in diff_ids:
        out.append(chain_id(out[-1] if out else "", d))
    return out


def parse_digest(digest: str) -> tuple[str, str]:
    """Split ``sha256:<hex>`` into (algorithm, hex), rejecting anything else."""
    algo, sep, hexpart = digest.partition(":")
    width = {"sha256": 64, "sha512": 128}.get(algo)
    if not sep or width is None or len(hexpart) != width:
        raise StowawayError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    try:
        int(hexpart, 16)
    except ValueError:
        raise StowawayError(f"invalid digest {digest!r}: not hexadecimal") from None
    if hexpart != hexpart.lower():
        raise StowawayError(f"invalid digest {digest!r}: hex digits must be lower case")
    return algo, hexpart


class VerifyingReader:
    """Wraps a binary file; hashes what passes through and raises CorruptBlob as
    soon as the bytes cannot match (too many, too few at EOF, wrong digest once
    ``size`` bytes were read)."""

    def __init__(self, f: BinaryIO, digest: str, size: int) -> None:
        algo, self._expected = parse_digest(digest)
        self._f = f
        self._digest = digest
        self._size = size
        self._hash = hashlib.new(algo)
        self._count = 0
        self._checked = False
        self._where = str(getattr(f, "name", "<stream>"))

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data:
            self._count += len(data)
            if self._count > self._size:
                self._fail(f"longer than its recorded size {self._size}")
            self._hash.update(data)
            if self._count == self._size:
                self._check_digest()
        elif n != 0:
            if self._count < self._size:
                self._fail(f"truncated: {self._count} of {self._size} bytes")
            self._check_digest()
        return data

    def _check_digest(self) -> None:
        if not self._checked:
            self._checked = True
            if self._hash.hexdigest() != self._expected:
                self._fail(f"content hashes to {self._hash.name}:{self._hash.hexdigest()}")

    def _fail(self, message: str) -> None:
        raise CorruptBlob(message, digest=self._digest, where=self._where)


@contextlib.contextmanager
def dropping_corrupt(blob: Blob) -> Iterator[None]:
    """Run a verified read of ``blob``; if it raises CorruptBlob, unlink the blob's
    cache file (``blob.cached``; other files are left alone) before re-raising, so the
    next cache lookup misses and the layer is rebuilt instead of emitted again."""
    try:
        yield
    except CorruptBlob as err:
        if blob.path is not None and blob.cached:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(blob.path)
        elif blob.path is not None:  # not ours to drop: someone's image (a base layout)
            err.hint = f"{blob.path} is damaged; restore or re-fetch the image it belongs to"
        raise


def copy_verified(blob: Blob, dst: BinaryIO, stop: Stop | None = None) -> None:
    """Copy ``blob`` into ``dst`` in large chunks, verifying size and digest; a
    damaged cache file is dropped (``dropping_corrupt``). ``dst`` may have received
    a prefix of the bytes; callers write to temp files. ``stop`` is checked between
    chunks (``Stopped``)."""
    with dropping_corrupt(blob), blob.open() as f:
        reader = VerifyingReader(f, blob.digest, blob.size)
        while data := reader.read(CHUNK):
            if stop is not None:
                stop.check()
            dst.write(data)
