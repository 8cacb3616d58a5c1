"""Content-addressed layer cache: a layer is tarred and compressed once, ever.

Layout under the root (the registry shares ``blobs/``):

    blobs/sha256/<hex>     compressed layer bytes, named by their digest
    layers/<key>.json      {"key", "digest", "diff_id", "size", "media_type", "version"}
    diff-ids/<hex>         the diff_id of blob <hex>, as this cache computed it

Both are published with ``stowaway.fsutil`` (temp file in the same directory,
fsync, mode 0644 so ``serve`` running as another user can read them, rename), so
a crash leaves at most an unused ``.tmp-*`` file and two processes building the
same key race harmlessly (each rename is atomic; the bytes are the same).
An index entry is bound to its content: it names its own key (an entry copied under
another key's name is a miss), and its (digest, diff_id) pair must match what the cache
computed for that blob when it built it (``diff-ids/``); an entry pointing at another
existing blob, even of the right size, is a miss and the layer is built again. A blob
with no ``diff-ids`` record (another writer's) is decompressed and hashed once to make
one. ``lookup`` reads two small files and stats the blob; the blob's own digest is
verified whenever its bytes are read (``stowaway.image.digest``).

Pruning (``stowaway.image.cache_prune``) runs while builds and ``serve`` use the
cache. ``lookup`` and ``commit`` hold ``cache.lock`` (an ``fcntl`` lock file in the
root) shared, prune holds it exclusively, so no entry is looked up or written while
prune decides and deletes. A lookup hit records the entry's last use in its mtime
(touched at most once a ``TOUCH_INTERVAL``); prune never removes an entry used
within its grace period, which covers the time a build uses the blob after the
lookup (see that module). The lock is taken per call, not per build: a long-running
``serve`` never blocks prune for longer than one lookup.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from stowaway.errors import StowawayError
from stowaway.fsutil import AtomicFile, atomic_write
from stowaway.image.digest import parse_digest
from stowaway.image.model import Layer

INDEX_VERSION = 2
_KEY = re.compile(r"[0-9a-f]{16,128}")
#: Name of the lock file in the cache root (shared: lookup, commit; exclusive: prune).
LOCK_FILE = "cache.lock"
#: A hit touches its index entry's mtime when it is older than this (seconds).
TOUCH_INTERVAL = 60.0


@contextlib.contextmanager
def cache_lock(root: Path, *, exclusive: bool = False) -> Iterator[None]:
    """Hold ``root/cache.lock``: shared (lookups and commits) or exclusive (prune).
    A new file descriptor per call (flock belongs to the open file, so threads must
    not share one). Without a writable root (a read-only cache, another user's) a
    shared lock is taken on a read-only open, else none: reading needs no lock."""
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            if exclusive:
                raise
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stowaway``, else ``~/.cache/stowaway``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "stowaway"


@dataclass(frozen=True)
class CacheEntry:
    """What the index records about one built layer."""

    digest: str
    diff_id: str
    size: int
    media_type: str


class BlobWriter:
    """A temp file inside ``blobs/sha256`` that hashes and counts what is written."""

    def __init__(self, temp: AtomicFile) -> None:
        self.temp = temp
        self.file = temp.file
        self.size = 0
        self._sha = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._sha.update(data)
        self.size += len(data)
        return self.file.write(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()


class LayerCache:
    """The on-disk cache of built layers; safe to share between processes."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self._blobs = self.root / "blobs" / "sha256"
        self._index = self.root / "layers"
        self._diff_ids = self.root / "diff-ids"

    def check_writable(self, *, hint: str | None = None) -> None:
        """Create the cache's directories and check that this process can write there
        (a temp file made and removed), so a build fails at once, naming the directory,
        rather than after the work of its first layer."""
        try:
            self._blobs.mkdir(parents=True, exist_ok=True)
            with AtomicFile(self._blobs):
                pass
        except OSError as err:
            where = f" ({err.filename})" if err.filename and Path(err.filename) != self.root else ""
            raise StowawayError(
                f"cannot write to the layer cache {self.root}{where}: {err.strerror}", hint=hint
            ) from None

    def blob_path(self, digest: str) -> Path:
        algo, hexpart = parse_digest(digest)
        if algo != "sha256":
            raise StowawayError(f"layer cache {self.root} holds only sha256 blobs, not {digest}")
        return self._blobs / hexpart

    def _entry_path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise StowawayError(f"invalid layer cache key {key!r}: expected lower-case hex")
        return self._index / f"{key}.json"

    def lookup(self, key: str) -> Layer | None:
        """The cached layer for ``key``; None on a miss or when the entry is unusable
        (unreadable index, missing blob, blob of the wrong size)."""
        entry_path = self._entry_path(key)
        if not self._index.is_dir():
            return None
        with cache_lock(self.root):
            return self._lookup(key, entry_path)

    def _lookup(self, key: str, entry_path: Path) -> Layer | None:
        try:
            doc = json.loads(entry_path.read_bytes())
            if doc.get("version") != INDEX_VERSION or doc.get("key") != key:
                return None
            entry = CacheEntry(
                str(doc["digest"]), str(doc["diff_id"]), int(doc["size"]), str(doc["media_type"])
            )
            _touch(entry_path)  # last use, for prune: before the blob is trusted
            path = self.blob_path(entry.digest)
            if path.stat().st_size != entry.size:
                return None
            if self._diff_id_of(path, entry) != entry.diff_id:
                return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError):
            return None
        except (StowawayError, zlib.error, zstandard.ZstdError):
            return None
        return Layer(
            digest=entry.digest,
            size=entry.size,
            media_type=entry.media_type,
            path=path,
            diff_id=entry.diff_id,
            reused=True,
        )

    def _diff_id_of(self, path: Path, entry: CacheEntry) -> str:
        """The diff_id this cache recorded for the blob at ``path``; computed (and
        recorded) when there is none."""
        record = self._diff_ids / path.name
        try:
            return record.read_text().strip()
        except FileNotFoundError:
            pass
        diff_id = _uncompressed_digest(path, entry.media_type)
        if diff_id == entry.diff_id:  # derived data: lost in a crash, computed again
            atomic_write(record, diff_id.encode() + b"\n", sync=False)
        return diff_id

    @contextlib.contextmanager
    def blob_writer(self) -> Iterator[BlobWriter]:
        """A temp blob file; the caller writes it, then passes it to ``commit``.
        The temp file is removed if the block fails or the blob is not committed."""
        self._blobs.mkdir(parents=True, exist_ok=True)
        with AtomicFile(self._blobs) as temp:
            yield BlobWriter(temp)

    def commit(self, key: str, writer: BlobWriter, diff_id: str, media_type: str) -> Layer:
        """Move a finished blob into place (synced, mode 0644) and record it under ``key``."""
        entry = CacheEntry(writer.digest, diff_id, writer.size, media_type)
        final = self.blob_path(entry.digest)
        with cache_lock(self.root):  # blob and entry appear together for prune
            writer.temp.commit(final)
            atomic_write(self._diff_ids / final.name, diff_id.encode() + b"\n", sync=False)
            self._write_entry(key, entry)
        return Layer(
            digest=entry.digest,
            size=entry.size,
            media_type=media_type,
            path=final,
            diff_id=diff_id,
        )

    def _write_entry(self, key: str, entry: CacheEntry) -> None:
        path = self._entry_path(key)
        doc = {
            "version": INDEX_VERSION,
            "key": key,
            "digest": entry.digest,
            "diff_id": entry.diff_id,
            "size": entry.size,
            "media_type": entry.media_type,
        }
        atomic_write(path, json.dumps(doc, sort_keys=True).encode() + b"\n")


def _touch(path: Path) -> None:
    """Record a use of the index entry at ``path`` in its mtime, at most once a
    TOUCH_INTERVAL. Gone (pruned): FileNotFoundError, a miss. Not ours to touch
    (another user's cache): the entry is used anyway, unrecorded."""
    if time.time() - path.stat().st_mtime < TOUCH_INTERVAL:
        return
    with contextlib.suppress(PermissionError):
        os.utime(path)


def _uncompressed_digest(path: Path, media_type: str) -> str:
    """sha256 of the blob's uncompressed bytes (its diff_id), streamed."""
    sha = hashlib.sha256()
    with open(path, "rb") as raw:
        reader = uncompressed(raw, media_type)
        while chunk := reader.read(1 << 20):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


def uncompressed(raw: BinaryIO, media_type: str) -> BinaryIO:
    """The tar stream of a layer blob of ``media_type`` (gzip, zstd or plain)."""
    if media_type.endswith(("+gzip", ".gzip")):
        return cast(BinaryIO, gzip.GzipFile(fileobj=raw))
    if media_type.endswith("+zstd"):
        return cast(
            BinaryIO, zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        )
    return raw
