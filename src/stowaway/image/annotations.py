"""Which store paths a layer holds: the contract between the composer, the snapshotter,
``stowaway inspect`` and the unpacker.

Store-path layers carry ``containerd.io/snapshot/stowaway.paths.<i>`` annotations whose
values are the layer's store path basenames, space separated. containerd passes every
``containerd.io/snapshot/`` annotation to the snapshotter as a Prepare label, next to
``containerd.io/snapshot.ref`` (the layer's chain ID), and refuses labels whose key +
value reach 4096 bytes: hence the split over numbered keys. A layer whose tar members
carry another mtime than 1 (``SOURCE_DATE_EPOCH``) says so in
``containerd.io/snapshot/stowaway.mtime``, so a node can rebuild the same tar to prove the
claim (see ``runtime/snapshotter/verify.py``); like every annotation it is only a hint.
A layer whose owners or modes were changed by ``--chown``/``--chmod`` rules
(``image.ownership``) is not what the node's store holds: it says so in
``containerd.io/snapshot/stowaway.rules`` (the digest of the rules that touched it), and
the snapshotter unpacks it without trying the proof (which would fail anyway).

containerd prepares an image's layers one after another, and each layer's labels name
only its own paths; a node substituting them from a binary cache would fetch one layer
at a time. So the image's first store-path layer also carries
``containerd.io/snapshot/stowaway.prefetch.<i>``: the basenames of the other store-path
layers, in layer order, split like the paths. A node may start fetching them at that
first Prepare; it is a hint like the rest (a node only substitutes from caches it trusts,
and each layer is still proven when its own Prepare comes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from stowaway.errors import InvalidStorePath, StowawayError
from stowaway.image.tar import store_basename
from stowaway.store.paths import parse_basename

__all__ = [
    "DEFAULT_MTIME",
    "LABEL_LIMIT",
    "MTIME_LABEL",
    "PATHS_PREFIX",
    "PREFETCH_LIMIT",
    "PREFETCH_PREFIX",
    "REF_LABEL",
    "RULES_LABEL",
    "SNAPSHOT_LABEL_PREFIX",
    "PathsAnnotationError",
    "decode_mtime",
    "decode_paths",
    "decode_prefetch",
    "encode_paths",
    "encode_prefetch",
]

#: Annotations containerd forwards to the snapshotter as labels.
SNAPSHOT_LABEL_PREFIX = "containerd.io/snapshot/"
PATHS_PREFIX = f"{SNAPSHOT_LABEL_PREFIX}stowaway.paths."
#: On the first store-path layer: the other store-path layers' basenames, in order.
PREFETCH_PREFIX = f"{SNAPSHOT_LABEL_PREFIX}stowaway.prefetch."
#: Most bytes of basenames a prefetch list holds: it doubles the manifest's path names,
#: and registries refuse manifests over 4 MiB; the paths past it are fetched per layer.
PREFETCH_LIMIT = 512 << 10
#: The label naming the chain ID a Prepare is for (set by the unpacker).
REF_LABEL = "containerd.io/snapshot.ref"
#: The tar members' mtime when it is not DEFAULT_MTIME (absent: the default).
MTIME_LABEL = f"{SNAPSHOT_LABEL_PREFIX}stowaway.mtime"
DEFAULT_MTIME = 1
#: Present on a store-path layer changed by ownership/mode rules: ``sha256:<hex>`` of them.
RULES_LABEL = f"{SNAPSHOT_LABEL_PREFIX}stowaway.rules"
#: containerd's bound on a label's key + value, in bytes.
LABEL_LIMIT = 4096
#: Largest mtime a tar header's 11 octal digits hold.
_MAX_MTIME = 8**11 - 1

_INDEX = re.compile(r"[0-9]+")


class PathsAnnotationError(StowawayError):
    """A ``stowaway.paths.<i>`` annotation with a bad index or a bad store path name."""


def encode_paths(paths: Sequence[str], mtime: int = DEFAULT_MTIME) -> dict[str, str]:
    """``PATHS_PREFIX<i>`` → space-separated basenames of ``paths``, packed greedily in
    order so every key + value stays below LABEL_LIMIT; plus MTIME_LABEL unless the
    members' mtime is the default (so default images keep their manifests)."""
    out = _encode_names(PATHS_PREFIX, paths)
    if mtime != DEFAULT_MTIME:
        out[MTIME_LABEL] = str(mtime)
    return out


def encode_prefetch(paths: Sequence[str]) -> dict[str, str]:
    """``PREFETCH_PREFIX<i>`` → the basenames of ``paths``, split like ``encode_paths``,
    as many of the first ones as PREFETCH_LIMIT bytes of names hold."""
    kept: list[str] = []
    size = 0
    for path in paths:
        size += len(store_basename(path).encode()) + 1
        if size > PREFETCH_LIMIT:
            break
        kept.append(path)
    return _encode_names(PREFETCH_PREFIX, kept)


def _encode_names(prefix: str, paths: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    value = ""
    for base in (store_basename(p) for p in paths):
        key = f"{prefix}{len(out)}"
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
        out[f"{prefix}{len(out)}"] = value
    return out


def decode_mtime(annotations: Mapping[str, str]) -> int:
    """The members' mtime ``encode_paths`` recorded (DEFAULT_MTIME when absent)."""
    raw = annotations.get(MTIME_LABEL)
    if raw is None:
        return DEFAULT_MTIME
    if not (raw.isascii() and raw.isdigit() and int(raw) <= _MAX_MTIME):
        raise PathsAnnotationError(f"{MTIME_LABEL!r}: {raw[:40]!r} is not a tar mtime")
    return int(raw)


def decode_paths(annotations: Mapping[str, str]) -> list[str] | None:
    """The basenames ``encode_paths`` wrote, in index order, each checked to be a store
    path name; None when there is no ``PATHS_PREFIX`` key (not a store-path layer)."""
    return _decode_names(PATHS_PREFIX, annotations)


def decode_prefetch(annotations: Mapping[str, str]) -> list[str]:
    """The basenames ``encode_prefetch`` wrote, checked like ``decode_paths``; [] if none."""
    return _decode_names(PREFETCH_PREFIX, annotations) or []


def _decode_names(prefix: str, annotations: Mapping[str, str]) -> list[str] | None:
    indexed: list[tuple[int, str]] = []
    for key in annotations:
        if not key.startswith(prefix):
            continue
        suffix = key[len(prefix) :]
        if not _INDEX.fullmatch(suffix):
            raise PathsAnnotationError(f"{key!r}: expected {prefix}<number>")
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
