"""Shared vocabulary of the store layer: what a store path *is* to the engine.

Every source (local store database, plain directory, binary cache) answers in
these terms, so layering and tarring never care where bytes come from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

STORE_DIR = "/nix/store"

EntryKind = Literal["regular", "directory", "symlink"]


@dataclass(frozen=True)
class PathInfo:
    """Metadata of one valid store path (what a narinfo or db.sqlite row holds).

    ``path`` and ``references`` are full paths (``/nix/store/<hash>-<name>``);
    ``references`` is sorted and may include ``path`` itself.
    ``nar_hash`` is ``sha256:<nix32>``.
    """

    path: str
    nar_hash: str
    nar_size: int
    references: tuple[str, ...] = ()
    deriver: str | None = None
    sigs: tuple[str, ...] = ()
    ca: str | None = None


@dataclass
class NarEntry:
    """One node of a store path's file tree, in NAR order (depth first, names sorted
    bytewise). ``path`` is relative to the store path root: ``b""`` for the root itself,
    ``b"bin/sh"`` below it.

    For regular files ``chunks`` yields the contents; it must be consumed (or is
    skipped automatically) before the iterator producing entries advances.
    """

    path: bytes
    kind: EntryKind
    executable: bool = False
    size: int = 0
    target: bytes = b""
    chunks: Iterator[bytes] = field(default_factory=lambda: iter(()))


@runtime_checkable
class StoreSource(Protocol):
    """Something that can describe and hand out store paths."""

    #: Human readable origin for messages, e.g. ``local store /nix/store``.
    name: str

    def query(self, path: str) -> PathInfo | None:
        """Metadata for ``path`` or None when this source does not have it."""

    def entries(self, path: str) -> Iterator[NarEntry]:
        """The file tree of ``path`` as NarEntry events (streaming, no temp files)."""


def sub_closure(closure: Mapping[str, PathInfo], roots: Iterable[str]) -> dict[str, PathInfo]:
    """The part of a computed ``closure`` that ``roots`` (paths in it) reach; references
    outside it are not followed."""
    out: dict[str, PathInfo] = {}
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path not in out:
            out[path] = closure[path]
            todo += [r for r in closure[path].references if r not in out and r in closure]
    return out
