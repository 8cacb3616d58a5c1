"""NAR: Nix's archive format, read and written as a stream of NarEntry events.

The reader validates strictly (a NAR from a cache is untrusted input) and never
holds more than one chunk of file contents in memory; the writer reproduces
``nix-store --dump`` byte for byte, so hashes computed here match Nix's.
The format is simple enough that no library is needed (and none exists on PyPI
that streams); all bulk data moves in 1 MiB slices, never byte by byte.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from typing import Protocol

from stowaway.errors import NarError, StowawayError
from stowaway.store import nixbase32
from stowaway.store.model import NarEntry

__all__ = [
    "CHUNK_SIZE",
    "Readable",
    "dump_path",
    "nar_hash_and_size",
    "read_nar",
    "walk_path",
    "write_nar",
]

CHUNK_SIZE = 1 << 20
MAGIC = b"nix-archive-1"
MAX_NAME = 255
MAX_TARGET = 4095
MAX_DEPTH = 64
MAX_TOKEN = 4096
MAX_CONTENTS = 1 << 40
_U64 = struct.Struct("<Q")
_ZEROS = bytes(8)


class Readable(Protocol):
    """Anything with ``read(n)`` (files, HTTP responses, decompressors)."""

    def read(self, n: int = -1, /) -> bytes: ...


def _pad(n: int) -> int:
    return (-n) & 7


# --------------------------------------------------------------------------- reader


class _Reader:
    """Buffered reader that knows its absolute offset, so errors can name it."""

    def __init__(self, stream: Readable) -> None:
        self._stream = stream
        self._buf = b""
        self._pos = 0
        self._base = 0  # absolute offset of _buf[0]
        # File contents not yet consumed; skipped (and padding checked) before the next token.
        self.content_left = 0
        self.content_size = 0
        self.owner: object | None = None  # identifies the NarEntry.chunks allowed to read

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _fill(self, want: int) -> None:
        """Ensure ``want`` bytes are buffered; fewer only at end of stream."""
        avail = len(self._buf) - self._pos
        if avail >= want:
            return
        parts = [self._buf[self._pos :]]
        self._base += self._pos
        self._pos = 0
        while avail < want:
            data = self._stream.read(max(CHUNK_SIZE, want - avail))
            if not data:
                break
            parts.append(data)
            avail += len(data)
        self._buf = b"".join(parts)

    def read_exact(self, n: int, what: str) -> bytes:
        self._fill(n)
        if len(self._buf) - self._pos < n:
            raise NarError(f"truncated: end of data while reading {what}", self.offset)
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least one unless at end of stream)."""
        if self._pos >= len(self._buf):
            self._base += len(self._buf)
            self._buf = b""
            self._pos = 0
            data = self._stream.read(CHUNK_SIZE)
            if len(data) <= limit:
                self._base += len(data)
                return data
            self._buf = data
        data = self._buf[self._pos : self._pos + limit]
        self._pos += len(data)
        return data

    def check_padding(self, n: int) -> None:
        start = self.offset
        if self.read_exact(_pad(n), "padding").strip(b"\0"):
            raise NarError("non-zero padding", start)

    def read_u64(self, what: str) -> int:
        return int(_U64.unpack(self.read_exact(8, what))[0])

    def finish_contents(self) -> None:
        """Skip what is left of the current file's contents and check its padding."""
        if self.owner is None:
            return
        self.owner = None
        left = self.content_left
        while left:
            data = self.read_some(min(left, CHUNK_SIZE))
            if not data:
                raise NarError("truncated: end of data inside file contents", self.offset)
            left -= len(data)
        self.content_left = 0
        self.check_padding(self.content_size)

    def read_str(self, what: str, limit: int = MAX_TOKEN) -> bytes:
        self.finish_contents()
        # Fast path (a NAR is mostly short tokens): length, string and zero padding all
        # buffered and well-formed. Anything else takes the checked path below from the
        # same offset, which names what is wrong.
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= 8:
            n = _U64.unpack_from(buf, pos)[0]
            body = pos + 8 + n
            end = body + _pad(n)
            if n <= limit and end <= len(buf) and buf[body:end] == _ZEROS[: end - body]:
                self._pos = end
                return buf[pos + 8 : body]
        start = self.offset
        n = self.read_u64(f"length of {what}")
        if n > limit:
            raise NarError(f"{what} has length {n}, more than the limit {limit}", start)
        data = self.read_exact(n, what)
        self.check_padding(n)
        return data

    def expect(self, token: bytes, context: str) -> None:
        start = self.offset
        got = self.read_str(f"{token.decode()!r} token")
        if got != token:
            raise NarError(f"expected {token.decode()!r} {context}, found {got[:64]!r}", start)

    def at_eof(self) -> bool:
        self._fill(1)
        return self._pos >= len(self._buf)


def read_nar(stream: Readable) -> Iterator[NarEntry]:
    """Decode a NAR stream into NarEntry events, validating as it goes.

    File contents are handed out lazily through ``entry.chunks`` and skipped if the
    consumer moves on without reading them. Raises NarError with the byte offset.
    """
    r = _Reader(stream)
    start = r.offset
    if r.read_str("magic", 64) != MAGIC:
        raise NarError("not a NAR: bad magic (expected 'nix-archive-1')", start)
    yield from _read_node(r, b"", 0)
    r.finish_contents()
    if not r.at_eof():
        raise NarError("trailing data after the root node", r.offset)


def _read_node(r: _Reader, path: bytes, depth: int) -> Iterator[NarEntry]:
    if depth > MAX_DEPTH:
        raise NarError(f"directory nesting deeper than {MAX_DEPTH} at {path!r}", r.offset)
    r.expect(b"(", "to open a node")
    r.expect(b"type", "after '('")
    start = r.offset
    kind = r.read_str("node type")
    if kind == b"regular":
        yield _read_regular(r, path)
    elif kind == b"symlink":
        r.expect(b"target", "in a symlink node")
        start = r.offset
        target = r.read_str("symlink target", MAX_TARGET)
        if not target or b"\0" in target:
            raise NarError(f"symlink {path!r} has an empty target or one containing NUL", start)
        yield NarEntry(path=path, kind="symlink", target=target)
    elif kind == b"directory":
        yield NarEntry(path=path, kind="directory")
        yield from _read_directory(r, path, depth)
        return
    else:
        raise NarError(f"unknown node type {kind[:64]!r}", start)
    r.expect(b")", f"to close the node {path!r}")


def _read_regular(r: _Reader, path: bytes) -> NarEntry:
    executable = False
    start = r.offset
    tok = r.read_str("regular file field")
    if tok == b"executable":
        start = r.offset
        if r.read_str("executable marker") != b"":
            raise NarError("expected '' after 'executable'", start)
        executable = True
        start = r.offset
        tok = r.read_str("regular file field")
    if tok != b"contents":
        raise NarError(f"expected 'contents' in regular file {path!r}, found {tok[:64]!r}", start)
    start = r.offset
    size = r.read_u64("length of file contents")
    if size > MAX_CONTENTS:
        raise NarError(f"file {path!r} claims an absurd size of {size} bytes", start)
    owner = object()
    r.owner, r.content_left, r.content_size = owner, size, size
    return NarEntry(
        path=path,
        kind="regular",
        executable=executable,
        size=size,
        chunks=_contents(r, owner, size, path),
    )


def _contents(r: _Reader, owner: object, size: int, path: bytes) -> Iterator[bytes]:
    left = size
    while left:
        if r.owner is not owner:
            raise StowawayError(f"NAR contents of {path!r} read after the stream moved on")
        data = r.read_some(min(left, CHUNK_SIZE))
        if not data:
            raise NarError(f"truncated: end of data inside contents of {path!r}", r.offset)
        left -= len(data)
        r.content_left = left
        yield data
    if r.owner is owner:
        r.finish_contents()


def _read_directory(r: _Reader, path: bytes, depth: int) -> Iterator[NarEntry]:
    prev: bytes | None = None
    while True:
        start = r.offset
        tok = r.read_str("directory field")
        if tok == b")":
            return
        if tok != b"entry":
            raise NarError(
                f"expected 'entry' or ')' in directory {path!r}, found {tok[:64]!r}", start
            )
        r.expect(b"(", "to open an entry")
        r.expect(b"name", "in an entry")
        start = r.offset
        name = r.read_str("entry name", MAX_NAME)
        if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
            raise NarError(f"invalid entry name {name!r} in directory {path!r}", start)
        if prev is not None and name <= prev:
            what = "duplicate" if name == prev else "unsorted"
            raise NarError(f"{what} entry name {name!r} after {prev!r} in {path!r}", start)
        prev = name
        r.expect(b"node", "in an entry")
        yield from _read_node(r, path + b"/" + name if path else name, depth + 1)
        r.expect(b")", "to close an entry")


# --------------------------------------------------------------------------- filesystem


def _file_chunks(fs_path: bytes, size: int) -> Iterator[bytes]:
    left = size
    with open(fs_path, "rb", buffering=0) as f:
        while left:
            data = f.read(min(left, CHUNK_SIZE))
            if not data:
                break
            left -= len(data)
            yield data
        if left or f.read(1):
            raise StowawayError(f"file {os.fsdecode(fs_path)} changed size while being read")


def walk_path(fs_path: str | bytes | os.PathLike[str]) -> Iterator[NarEntry]:
    """The file tree at ``fs_path`` as NarEntry events, in NAR order.

    ``executable`` follows ``nix-store --dump``: the owner's x bit.
    """
    root = os.fsencode(fs_path)
    yield from _walk(root, b"", 0)


def _walk(fs: bytes, rel: bytes, depth: int) -> Iterator[NarEntry]:
    st = os.lstat(fs)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        yield NarEntry(
            path=rel,
            kind="regular",
            executable=bool(mode & stat.S_IXUSR),
            size=st.st_size,
            chunks=_file_chunks(fs, st.st_size),
        )
    elif stat.S_ISLNK(mode):
        yield NarEntry(path=rel, kind="symlink", target=os.readlink(fs))
    elif stat.S_ISDIR(mode):
        if depth > MAX_DEPTH:
            raise StowawayError(f"{os.fsdecode(fs)}: nested deeper than {MAX_DEPTH} directories")
        yield NarEntry(path=rel, kind="directory")
        with os.scandir(fs) as it:
            names = sorted(e.name for e in it)
        for name in names:
            yield from _walk(fs + b"/" + name, rel + b"/" + name if rel else name, depth + 1)
    else:
        raise StowawayError(
            f"{os.fsdecode(fs)}: unsupported file type (not a file, directory or symlink)"
        )


# --------------------------------------------------------------------------- writer


def _str(data: bytes) -> bytes:
    return _U64.pack(len(data)) + data + b"\0" * _pad(len(data))


_OPEN = _str(b"(") + _str(b"type")
_CLOSE = _str(b")")
_DIR = _OPEN + _str(b"directory")
_REG = _OPEN + _str(b"regular")
_EXEC = _str(b"executable") + _str(b"")
_CONTENTS = _str(b"contents")
_LINK = _OPEN + _str(b"symlink") + _str(b"target")
_ENTRY = _str(b"entry") + _str(b"(") + _str(b"name")
_NODE = _str(b"node")
_SMALL = 64 * 1024


def write_nar(entries: Iterable[NarEntry]) -> Iterator[bytes]:
    """Serialise NarEntry events (in NAR order) to NAR bytes, in large pieces."""
    out = bytearray(_str(MAGIC))
    open_dirs: list[bytes] = []  # paths of directories whose node is still open
    seen_root = False
    for e in entries:
        parent, _, name = e.path.rpartition(b"/")
        while open_dirs and open_dirs[-1] != parent:
            open_dirs.pop()
            out += _CLOSE + (_CLOSE if open_dirs else b"")
        if e.path:
            if not open_dirs:
                raise StowawayError(f"NAR entries out of order: {e.path!r} has no open parent")
            out += _ENTRY + _str(name) + _NODE
        elif seen_root:
            raise StowawayError("NAR entries contain two root nodes")
        seen_root = True
        if e.kind == "directory":
            out += _DIR
            open_dirs.append(e.path)
            continue
        if e.kind == "symlink":
            out += _LINK + _str(e.target) + _CLOSE
        else:
            out += _REG + (_EXEC if e.executable else b"") + _CONTENTS + _U64.pack(e.size)
            written = 0
            for chunk in e.chunks:
                written += len(chunk)
                if len(chunk) < _SMALL:
                    out += chunk
                else:
                    if out:
                        yield bytes(out)
                        out.clear()
                    yield chunk
            if written != e.size:
                raise StowawayError(
                    f"file {e.path!r}: announced {e.size} bytes but contents had {written}"
                )
            out += b"\0" * _pad(e.size) + _CLOSE
        if e.path:
            out += _CLOSE
        if len(out) >= CHUNK_SIZE:
            yield bytes(out)
            out.clear()
    if not seen_root:
        raise StowawayError("no NAR entries to write")
    while open_dirs:
        open_dirs.pop()
        out += _CLOSE + (_CLOSE if open_dirs else b"")
    yield bytes(out)


def dump_path(fs_path: str | bytes | os.PathLike[str]) -> Iterator[bytes]:
    """NAR bytes of ``fs_path``, identical to ``nix-store --dump``."""
    return write_nar(walk_path(fs_path))


def nar_hash_and_size(fs_path: str | bytes | os.PathLike[str]) -> tuple[str, int]:
    """``("sha256:<nix32>", size)`` of the NAR of ``fs_path`` (as ``nix-store -q --hash``)."""
    h = hashlib.sha256()
    size = 0
    for chunk in dump_path(fs_path):
        h.update(chunk)
        size += len(chunk)
    return "sha256:" + nixbase32.encode(h.digest()), size
