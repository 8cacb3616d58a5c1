"""What the layer cache holds (``cache_info``) and removing its least recently used
layers (``prune``), safely while builds and ``serve`` use it.

How it stays safe:

* **The lock.** ``LayerCache.lookup`` and ``commit`` hold ``cache.lock`` (fcntl,
  in the cache root) shared; ``prune`` holds it exclusively from listing the index
  to its last unlink. So no lookup sees an entry half removed, and no commit can
  put a blob in place between prune deciding the blob is unreferenced and deleting
  it. The lock is per call, not per build, so a long-running ``serve`` (or many
  builds) never starves prune.
* **The grace period.** A build keeps using a blob after its lookup (the sink
  reads or hard-links it later), and holding a lock for a whole build would block
  prune behind every build and forever behind ``serve``. Instead a lookup hit
  records the use in the index entry's mtime (at most once a minute, so a hit is
  still one ``stat``), and prune never removes an entry used within the grace
  period (``DEFAULT_GRACE``, one hour; ``--grace``), whatever ``--older-than`` or
  ``--max-size`` say. A build that looked up its layers longer ago than that and
  is still writing them is the one case not covered; the period is the bound.
* **References.** A blob goes only with the last index entry that names it, and
  never while the registry's filesystem storage (which may share ``blobs/``) links
  it from ``repositories/*/_layers/``. Only index entries (``layers/<key>.json``),
  their blobs and their ``diff-ids/`` records are removed; everything else in the
  directory (other blobs, ``pushed/``, the registry's files, temp files, unknown
  files, unreadable entries) is left as it is.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stowaway.errors import StowawayError
from stowaway.image.layer_cache import _KEY, cache_lock

__all__ = ["DEFAULT_GRACE", "PruneResult", "cache_info", "parse_duration", "parse_size", "prune"]

#: Entries used more recently than this (seconds) are never pruned.
DEFAULT_GRACE = 3600.0
_HEX = re.compile(r"[0-9a-f]{64}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: str, what: str = "--older-than") -> float:
    """Seconds of ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` (a bare number: seconds)."""
    m = _DURATION.fullmatch(value.strip())
    if not m:
        raise StowawayError(f"{what}: {value!r} is not a duration", hint="e.g. 90s, 30m, 12h, 7d")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def parse_size(value: str, what: str = "--max-size") -> int:
    """Bytes of ``500M``, ``2G``, ``1.5GiB``, ``100k`` (binary units; bare: bytes)."""
    m = _SIZE.fullmatch(value.strip())
    if not m:
        raise StowawayError(f"{what}: {value!r} is not a size", hint="e.g. 500M, 2G, 1.5GiB")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * 1024**power)


@dataclass
class _Entry:
    key: str
    path: Path
    last_used: float
    digest_hex: str
    size: int


def _entries(root: Path) -> list[_Entry]:
    """The readable index entries, least recently used first (others are left alone)."""
    out = []
    index = root / "layers"
    try:
        names = os.listdir(index)
    except FileNotFoundError:
        return []
    for name in names:
        key = name.removesuffix(".json")
        if not name.endswith(".json") or not _KEY.fullmatch(key):
            continue
        path = index / name
        try:
            st = path.stat()
            doc = json.loads(path.read_bytes())
            algo, _, hexpart = str(doc["digest"]).partition(":")
            size = int(doc["size"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if doc.get("key") != key or algo != "sha256" or not _HEX.fullmatch(hexpart):
            continue
        out.append(_Entry(key, path, st.st_mtime, hexpart, size))
    return sorted(out, key=lambda e: (e.last_used, e.key))


def _registry_links(root: Path) -> set[str]:
    """Blob hexes the registry's filesystem storage links from a repository."""
    repos = root / "repositories"
    if not repos.is_dir():
        return set()
    return {p.name for layers in repos.rglob("_layers") for p in layers.iterdir()}


def _blob_size(root: Path, hexpart: str) -> int | None:
    try:
        return (root / "blobs" / "sha256" / hexpart).stat().st_size
    except FileNotFoundError:
        return None


def cache_info(root: Path) -> dict[str, Any]:
    """The directory, number of layers (index entries) and blobs, total blob bytes, and
    the oldest and newest last use (epoch seconds, None when empty)."""
    entries = _entries(root)
    blobs = root / "blobs" / "sha256"
    count = size = 0
    if blobs.is_dir():
        for name in os.listdir(blobs):
            if _HEX.fullmatch(name):
                try:
                    size += (blobs / name).stat().st_size
                except FileNotFoundError:
                    continue
                count += 1
    ours = {e.digest_hex for e in entries}
    layer_bytes = sum(_blob_size(root, h) or 0 for h in ours)
    return {
        "directory": str(root),
        "layers": len(entries),
        "blobs": count,
        "size": size,
        "layer_size": layer_bytes,
        "oldest_use": entries[0].last_used if entries else None,
        "newest_use": entries[-1].last_used if entries else None,
    }


@dataclass
class PruneResult:
    directory: str
    dry_run: bool
    removed_layers: list[str] = field(default_factory=list)
    removed_blobs: list[str] = field(default_factory=list)
    freed: int = 0
    kept_layers: int = 0
    kept_size: int = 0
    #: entries prune would have removed but were used within the grace period
    in_grace: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "dry_run": self.dry_run,
            "removed_layers": self.removed_layers,
            "removed_blobs": self.removed_blobs,
            "freed": self.freed,
            "kept_layers": self.kept_layers,
            "kept_size": self.kept_size,
            "in_grace": self.in_grace,
        }


def prune(
    root: Path,
    *,
    older_than: float | None = None,
    max_size: int | None = None,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    now: float | None = None,
) -> PruneResult:
    """Remove least recently used layers: every one unused for ``older_than`` seconds,
    then more until the layers' blobs take at most ``max_size`` bytes; never one used
    within ``grace`` seconds. ``dry_run``: say what would go, remove nothing."""
    result = PruneResult(str(root), dry_run)
    if not (root / "layers").is_dir():
        return result
    with cache_lock(root, exclusive=True):
        now = time.time() if now is None else now
        entries = _entries(root)
        refs: dict[str, int] = {}
        for e in entries:
            refs[e.digest_hex] = refs.get(e.digest_hex, 0) + 1
        sizes = {h: _blob_size(root, h) for h in refs}
        total = sum(s for s in sizes.values() if s is not None)
        keep_links = _registry_links(root)
        doomed: list[_Entry] = []
        for e in entries:  # least recently used first
            idle = now - e.last_used
            wanted = (older_than is not None and idle >= older_than) or (
                max_size is not None and total > max_size
            )
            if not wanted:
                continue
            if idle < grace:
                result.in_grace += 1
                continue
            doomed.append(e)
            refs[e.digest_hex] -= 1
            if refs[e.digest_hex] == 0 and e.digest_hex not in keep_links:
                total -= sizes[e.digest_hex] or 0
        gone = {e.digest_hex for e in doomed if refs[e.digest_hex] == 0} - keep_links
        for e in doomed:
            result.removed_layers.append(e.key)
            if not dry_run:
                e.path.unlink(missing_ok=True)
        for hexpart in sorted(gone):
            size = sizes[hexpart]
            if size is None:
                continue
            result.removed_blobs.append("sha256:" + hexpart)
            result.freed += size
            if not dry_run:
                (root / "blobs" / "sha256" / hexpart).unlink(missing_ok=True)
                (root / "diff-ids" / hexpart).unlink(missing_ok=True)
        result.kept_layers = len(entries) - len(doomed)
        result.kept_size = sum(s or 0 for h, s in sizes.items() if refs[h] > 0 or h in keep_links)
    return result
