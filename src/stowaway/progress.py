"""A tiny progress protocol so library code can report long work without
depending on a terminal library; the CLI binds it to rich progress bars."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Progress(Protocol):
    def start(self, key: str, description: str, total: int | None) -> None: ...
    def advance(self, key: str, amount: int) -> None: ...
    def finish(self, key: str) -> None: ...


class NoProgress:
    """The default: report nothing."""

    def start(self, key: str, description: str, total: int | None) -> None:
        pass

    def advance(self, key: str, amount: int) -> None:
        pass

    def finish(self, key: str) -> None:
        pass


def paths_label(paths: Sequence[str], limit: int = 2) -> str:
    """Store paths as people read them, by name without the hash part:
    ``hello-2.12 glibc-2.40 +3 more``."""
    names = [p.rstrip("/").rsplit("/", 1)[-1].split("-", 1)[-1] for p in paths]
    if len(names) <= limit:
        return " ".join(names)
    return " ".join(names[:limit]) + f" +{len(names) - limit} more"


class _Blob(Protocol):
    @property
    def digest(self) -> str: ...


def blob_label(verb: str, blob: _Blob) -> str:
    """What a progress description says about a blob: the names of the store paths in
    it (a layer's ``store_paths``), else the start of its digest (config, manifest)."""
    paths: Sequence[str] = getattr(blob, "store_paths", ())
    return f"{verb} {paths_label(paths) if paths else blob.digest[7:19]}"
