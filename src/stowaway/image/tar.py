"""Deterministic layer tarballs.

Headers are written here rather than with ``tarfile``: tarfile pulls in
uname/gname lookups and per-member objects we would have to neutralise, and it
pads archives to 10 KiB records. Our writer emits exactly: a ustar header per
member (uid/gid 0 unless an ownership rule set them, empty uname/gname, one fixed
mtime), a PAX ``x`` header
carrying only ``path``/``linkpath`` when a name does not fit in 100 bytes, the
file contents passed through in the source's own chunks, and two zero blocks.
Same entries and mtime → same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

from stowaway.errors import StowawayError
from stowaway.image.model import TarEntry
from stowaway.store.model import STORE_DIR, NarEntry, StoreSource

BLOCK = 512
_ZEROS = bytes(BLOCK)
_END = bytes(2 * BLOCK)
_TYPEFLAG = {"regular": b"0", "symlink": b"2", "directory": b"5"}
#: Largest size an 11-digit octal field holds; bigger sizes use base-256 (GNU/POSIX
#: readers, Go's archive/tar and Python's tarfile all accept it).
_MAX_OCTAL_SIZE = 8**11 - 1
_MAX_OCTAL_ID = 8**7 - 1
_PAX_NAME = b"././@PaxHeader"


class TarError(StowawayError):
    """A tar entry that cannot be written as given (bad name, wrong content size)."""


def default_mtime() -> int:
    """The timestamp of every member: ``SOURCE_DATE_EPOCH`` if set, else 1 (Nix's)."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw.strip() == "":
        return 1
    try:
        value = int(raw.strip())
    except ValueError:
        raise TarError(f"SOURCE_DATE_EPOCH={raw!r} is not an integer number of seconds") from None
    if not 0 <= value < 8**11:
        raise TarError(f"SOURCE_DATE_EPOCH={raw!r} is out of range for a tar timestamp")
    return value


def _octal(value: int, width: int) -> bytes:
    """``width``-byte numeric field: zero-padded octal digits and a NUL."""
    return b"%0*o\0" % (width - 1, value)


def _size_field(size: int) -> bytes:
    if size <= _MAX_OCTAL_SIZE:
        return _octal(size, 12)
    return b"\x80" + size.to_bytes(11, "big")


def _id_field(value: int) -> bytes:
    """A uid/gid: 7 octal digits, base-256 beyond (as GNU tar and Go's archive/tar)."""
    if not 0 <= value < 2**56:
        raise TarError(f"owner id {value} is out of range for a tar header")
    if value <= _MAX_OCTAL_ID:
        return _octal(value, 8)
    return b"\x80" + value.to_bytes(7, "big")


def _header(
    name: bytes,
    mode: int,
    size: int,
    mtime: int,
    flag: bytes,
    link: bytes,
    uid: int = 0,
    gid: int = 0,
) -> bytes:
    """One 512-byte ustar header; ``name`` and ``link`` must already fit (≤ 100 bytes)."""
    head = b"".join(
        (
            name.ljust(100, b"\0"),
            _octal(mode, 8),
            _id_field(uid),
            _id_field(gid),
            _size_field(size),
            _octal(mtime, 12),
            b" " * 8,  # checksum placeholder, counted as spaces
            flag,
            link.ljust(100, b"\0"),
            b"ustar\x0000",
            bytes(32 + 32),  # uname, gname
            _octal(0, 8),  # devmajor
            _octal(0, 8),  # devminor
            bytes(155 + 12),  # prefix, padding
        )
    )
    checksum = b"%06o\0 " % sum(head)
    return head[:148] + checksum + head[156:]


def _pax_record(key: bytes, value: bytes) -> bytes:
    """``"<len> key=value\\n"`` where ``len`` counts its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def _check_name(name: bytes, what: str) -> None:
    if not name or name.startswith(b"/") or b"\0" in name:
        raise TarError(f"invalid tar {what} {name!r}: must be relative, non-empty, without NUL")


def _member(entry: TarEntry, mtime: int) -> bytes:
    """Header bytes (PAX extension included) for one entry."""
    _check_name(entry.name, "member name")
    name = entry.name + b"/" if entry.kind == "directory" else entry.name
    link = entry.target if entry.kind == "symlink" else b""
    if entry.kind == "symlink" and (not link or b"\0" in link):
        raise TarError(f"invalid symlink target {link!r} for tar member {entry.name!r}")
    size = entry.size if entry.kind == "regular" else 0
    if entry.kind not in _TYPEFLAG:
        raise TarError(f"unsupported tar entry kind {entry.kind!r} for {entry.name!r}")
    pax = b""
    if len(name) > 100:
        pax += _pax_record(b"path", name)
        name = name[:100]
    if len(link) > 100:
        pax += _pax_record(b"linkpath", link)
        link = link[:100]
    out = b""
    if pax:
        out = _header(_PAX_NAME, 0o644, len(pax), mtime, b"x", b"") + _pad(pax)
    flag = _TYPEFLAG[entry.kind]
    return out + _header(name, entry.mode & 0o7777, size, mtime, flag, link, entry.uid, entry.gid)


def _pad(data: bytes) -> bytes:
    return data + _ZEROS[: -len(data) % BLOCK]


def write_tar(entries: Iterable[TarEntry], *, mtime: int) -> Iterator[bytes]:
    """Serialise ``entries`` as a tar stream, end-of-archive blocks included.

    Yields header blocks and the entries' own content chunks (never copied or
    split), so callers should coalesce pieces before compressing.
    """
    for entry in entries:
        yield _member(entry, mtime)
        if entry.kind != "regular":
            continue
        written = 0
        for chunk in entry.chunks:
            written += len(chunk)
            if written > entry.size:
                break
            yield chunk
        if written != entry.size:
            got = "more" if written > entry.size else f"only {written}"
            raise TarError(
                f"tar member {entry.name!r}: declared {entry.size} bytes of contents, got {got}"
            )
        if entry.size % BLOCK:
            yield _ZEROS[: BLOCK - entry.size % BLOCK]
    yield _END


def store_basename(path: str) -> str:
    """``/nix/store/<hash>-<name>`` → ``<hash>-<name>``; anything else is an error."""
    prefix = STORE_DIR + "/"
    base = path[len(prefix) :]
    if not path.startswith(prefix) or not base or "/" in base or base in (".", ".."):
        raise TarError(f"not a top-level store path: {path!r}")
    return base


def _to_tar(root: bytes, entry: NarEntry) -> TarEntry:
    name = root + b"/" + entry.path if entry.path else root
    if entry.kind == "directory":
        return TarEntry(name, "directory", 0o555)
    if entry.kind == "symlink":
        return TarEntry(name, "symlink", 0o777, target=entry.target)
    mode = 0o555 if entry.executable else 0o444
    return TarEntry(name, "regular", mode, size=entry.size, chunks=entry.chunks)


def store_path_entries(source: StoreSource, paths: Sequence[str]) -> Iterator[TarEntry]:
    """``nix`` and ``nix/store`` (0755), then each store path (sorted) in NAR order
    with the store's canonical modes: dirs 0555, files 0444/0555, symlinks 0777."""
    roots = sorted({(store_basename(p).encode(), p) for p in paths})
    yield TarEntry(b"nix", "directory", 0o755)
    yield TarEntry(b"nix/store", "directory", 0o755)
    store = STORE_DIR.lstrip("/").encode()
    for base, path in roots:
        root = store + b"/" + base
        for entry in source.entries(path):
            yield _to_tar(root, entry)
