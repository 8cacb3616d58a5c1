"""Which store paths a layer holds: the contract between the composer, the snapshotter,
``stowaway inspect`` and the unpacker.

Store-path layers carry ``containerd.io/snapshot/stowaway.paths.<i>`` annotations whose
values are the layer's store path basenames, space separated. containerd passes every
``containerd.io/snapshot/`` annotation to the snapshotter as a Prepare label, next to
``containerd.io/snapshot.ref`` (the layer's chain ID), and refuses labels whose key +
value reach 4096 bytes: hence the split over numbered keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from stowaway.errors import InvalidStorePath, StowawayError
from stowaway.image.tar import store_basename
from stowaway.store.paths import parse_basename

__all__ = [
    "LABEL_LIMIT",
    "PATHS_PREFIX",
    "REF_LABEL",
    "SNAPSHOT_LABEL_PREFIX",
    "PathsAnnotationError",
    "decode_paths",
    "encode_paths",
]

#: Annotations containerd forwards to the snapshotter as labels.
SNAPSHOT_LABEL_PREFIX = "containerd.io/snapshot/"
PATHS_PREFIX = f"{SNAPSHOT_LABEL_PREFIX}stowaway.paths."
#: The label naming the chain ID a Prepare is for (set by the unpacker).
REF_LABEL = "containerd.io/snapshot.ref"
#: containerd's bound on a label's key + value, in bytes.
LABEL_LIMIT = 4096

_INDEX = re.compile(r"[0-9]+")


class PathsAnnotationError(StowawayError):
    """A ``stowaway.paths.<i>`` annotation with a bad index or a bad store path name."""


def encode_paths(paths: Sequence[str]) -> dict[str, str]:
    """``PATHS_PREFIX<i>`` → space-separated basenames of ``paths``, packed greedily in
    order so every key + value stays below LABEL_LIMIT."""
    out: dict[str, str] = {}
    value = ""
    for base in (store_basename(p) for p in paths):
        key = f"{PATHS_PREFIX}{len(out)}"
        candidate = f"{value} {base}" if value else base
        if len(key) + len(candidate.encode()) < LABEL_LIMIT:
            value = candidate
            continue
        if not value:
            raise PathsAnnotationError(
                f"store path basename too long for an annotation: {base[:80]}…"
            )
        out[key] = value
        value = base
    if value:
        out[f"{PATHS_PREFIX}{len(out)}"] = value
    return out


def decode_paths(annotations: Mapping[str, str]) -> list[str] | None:
    """The basenames ``encode_paths`` wrote, in index order, each checked to be a store
    path name; None when there is no ``PATHS_PREFIX`` key (not a store-path layer)."""
    indexed: list[tuple[int, str]] = []
    for key in annotations:
        if not key.startswith(PATHS_PREFIX):
            continue
        suffix = key[len(PATHS_PREFIX) :]
        if not _INDEX.fullmatch(suffix):
            raise PathsAnnotationError(f"{key!r}: expected {PATHS_PREFIX}<number>")
        indexed.append((int(suffix), key))
    if not indexed:
        return None
    out: list[str] = []
    for _, key in sorted(indexed):
        for base in annotations[key].split():
            try:
                parse_basename(base)
            except InvalidStorePath as e:
                raise PathsAnnotationError(f"{key!r}: {e.message}") from None
            out.append(base)
    return out
