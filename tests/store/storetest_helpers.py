"""Helpers shared by the store tests (imported by module name; pytest puts this dir on
sys.path)."""

from __future__ import annotations

from collections.abc import Iterator

from stowaway.store.model import NarEntry


def events(entries: Iterator[NarEntry]) -> list[tuple[bytes, str, bool, int, bytes, bytes]]:
    """A NarEntry stream flattened to comparable tuples (contents included)."""
    return [(e.path, e.kind, e.executable, e.size, e.target, b"".join(e.chunks)) for e in entries]
