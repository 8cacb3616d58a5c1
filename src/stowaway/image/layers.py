"""Build store-path layers through the cache, several at a time.

A layer's cache key names everything its bytes depend on: the store paths *with
their NarHashes* (a path rebuilt differently elsewhere must not hit), the tar
and compression settings, the codec library version and our format version.
Misses are built in a thread pool; each build streams tar → diff_id hash →
compressor → temp blob file with bounded buffers, so memory does not grow with
the closure. hashlib, zlib and zstd release the GIL on large buffers, which is
what lets threads use every core.

With ownership rules (``--chown``/``--chmod``), each layer's members are first read
for their names only (no file contents) to find the rules that touch it; only those
join its key, so a rule for one layer rebuilds that layer alone, and a layer no rule
touches keeps the key (and blob) it has without rules.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import zstandard

from stowaway.errors import PathNotFound, StowawayError
from stowaway.image.annotations import RULES_LABEL, encode_paths, encode_prefetch
from stowaway.image.compress import DEFAULT_LEVEL, open_compressor, zstd_worker_memory
from stowaway.image.layer_cache import LayerCache
from stowaway.image.model import Layer, MediaType, TarEntry
from stowaway.image.ownership import RuleSet
from stowaway.image.tar import store_path_entries, write_tar
from stowaway.layering.model import PlannedLayer
from stowaway.parallel import Stop, run_all
from stowaway.progress import NoProgress, Progress, paths_label
from stowaway.store.model import PathInfo, StoreSource

#: Bump when the tar layout or the gzip block scheme changes: old entries then miss.
LAYER_FORMAT = "stowaway-layer-1"
#: Tar pieces are coalesced to this size before hashing and compressing.
CHUNK = 1 << 20

_MEDIA_TYPES = {
    "gzip": MediaType.OCI_LAYER_GZIP,
    "zstd": MediaType.OCI_LAYER_ZSTD,
    "none": MediaType.OCI_LAYER,
}
#: zstd stops at 19: the "ultra" levels need windows of up to 128 MiB per worker.
_LEVELS = {"gzip": range(0, 10), "zstd": range(-7, 20), "none": range(0, 1)}
#: What the zstd workers of one build may use together (peak RSS budget is 256 MB).
ZSTD_MEMORY_BUDGET = 192 << 20


_NO_PROGRESS = NoProgress()


class InvalidLayerSettings(StowawayError):
    """A compression/level/mtime combination we cannot build."""


@dataclass(frozen=True)
class LayerSettings:
    compression: Literal["gzip", "zstd", "none"] = "gzip"
    level: int | None = None  # None = algorithm default (gzip 6, zstd 3)
    mtime: int = 1

    def __post_init__(self) -> None:
        if self.compression not in _MEDIA_TYPES:
            raise InvalidLayerSettings(
                f"unknown layer compression {self.compression!r}: use gzip, zstd or none"
            )
        if self.level is not None and self.level not in _LEVELS[self.compression]:
            levels = _LEVELS[self.compression]
            raise InvalidLayerSettings(
                f"{self.compression} level {self.level} is out of range"
                f" {levels.start}..{levels.stop - 1}"
            )
        if not 0 <= self.mtime < 8**11:
            raise InvalidLayerSettings(f"layer mtime {self.mtime} is out of range for tar")

    @property
    def media_type(self) -> MediaType:
        return _MEDIA_TYPES[self.compression]

    def _key_doc(self) -> dict[str, object]:
        codec = {
            "gzip": f"zlib-{zlib.ZLIB_RUNTIME_VERSION}",
            "zstd": "zstd-{}.{}.{}".format(*zstandard.ZSTD_VERSION),
            "none": "",
        }[self.compression]
        level = DEFAULT_LEVEL[self.compression] if self.level is None else self.level
        return {
            "format": LAYER_FORMAT,
            "compression": self.compression,
            "level": level,
            "codec": codec,
            "mtime": self.mtime,
        }


def _key(doc: dict[str, object]) -> str:
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def store_layer_key(
    paths: Sequence[str],
    closure: Mapping[str, PathInfo],
    settings: LayerSettings,
    rules: RuleSet | None = None,
    touched: frozenset[int] = frozenset(),
) -> str:
    """Cache key of a layer holding ``paths`` (each must be in ``closure``), with the
    ``rules`` at indexes ``touched`` applied (none: the key of the plain layer)."""
    pinned = []
    for path in sorted(set(paths)):
        info = closure.get(path)
        if info is None:
            raise PathNotFound(f"store path {path} of a planned layer is not in the closure")
        pinned.append([path, info.nar_hash])
    doc: dict[str, object] = {**settings._key_doc(), "paths": pinned}
    if rules is not None and touched:
        doc["rules"] = rules.key_doc(touched)
    return _key(doc)


def rules_touching(
    source: StoreSource, planned: Sequence[PlannedLayer], rules: RuleSet
) -> list[frozenset[int]]:
    """Per planned layer, the indexes of the ``rules`` that touch it (names read only)."""
    if not rules:
        return [frozenset() for _ in planned]
    return [rules.touching(store_path_entries(source, p.paths)) for p in planned]


def _build(
    entries: Iterable[TarEntry],
    key: str,
    settings: LayerSettings,
    cache: LayerCache,
    *,
    executor: Executor | None,
    threads: int,
    on_bytes: Callable[[int], None] = lambda n: None,
    cancel: Stop | None = None,
) -> Layer:
    """Tar, hash and compress ``entries`` into a new cache entry under ``key``."""
    diff_id = hashlib.sha256()
    with cache.blob_writer() as blob:
        comp = open_compressor(
            blob, settings.compression, settings.level, executor=executor, threads=threads
        )

        def emit(data: bytes | bytearray) -> None:
            if cancel is not None:
                cancel.check()  # another layer failed, or Ctrl-C
            diff_id.update(data)
            comp.write(data)
            on_bytes(len(data))

        buf = bytearray()
        for piece in write_tar(entries, mtime=settings.mtime):
            if not buf and len(piece) >= CHUNK:
                emit(piece)
                continue
            buf += piece
            if len(buf) >= CHUNK:
                emit(buf)
                buf = bytearray()
        if buf:
            emit(buf)
        comp.close()
        return cache.commit(key, blob, "sha256:" + diff_id.hexdigest(), settings.media_type)


def build_entries_layer(
    entries: Iterable[TarEntry], key: str, settings: LayerSettings, cache: LayerCache
) -> Layer:
    """A layer from arbitrary entries (e.g. the customisation layer). ``key`` is the
    caller's stable description of the contents; on a hit ``entries`` is not read."""
    cache_key = _key({**settings._key_doc(), "entries": key})
    hit = cache.lookup(cache_key)
    if hit is not None:
        return hit
    return _build(entries, cache_key, settings, cache, executor=None, threads=1)


def _default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def build_layers(
    source: StoreSource,
    planned: Sequence[PlannedLayer],
    closure: Mapping[str, PathInfo],
    settings: LayerSettings,
    cache: LayerCache,
    *,
    progress: Progress = _NO_PROGRESS,
    jobs: int | None = None,
    rules: RuleSet | None = None,
    touched: Sequence[frozenset[int]] | None = None,
) -> list[Layer]:
    """One Layer per PlannedLayer, in order: cached ones as they are (``reused``),
    the rest built ``jobs`` at a time. Progress keys are the layer indexes, descriptions
    the names of their store paths; totals are NAR size sums. ``progress`` must
    tolerate calls from worker threads. ``touched`` (from ``rules_touching``, computed
    here when not given) says which ``rules`` apply to each layer."""
    jobs = max(1, jobs if jobs is not None else _default_jobs())
    rules = rules or RuleSet()
    if touched is None:
        touched = rules_touching(source, planned, rules)
    if len(touched) != len(planned):
        raise ValueError("one set of touching rules per planned layer is required")
    keys = [
        store_layer_key(p.paths, closure, settings, rules, t)
        for p, t in zip(planned, touched, strict=True)
    ]
    totals = [sum(closure[path].nar_size for path in set(p.paths)) for p in planned]
    layers: dict[int, Layer] = {}
    for index, key in enumerate(keys):
        hit = cache.lookup(key)
        if hit is not None:
            layers[index] = hit
            progress.start(str(index), f"cached {paths_label(planned[index].paths)}", totals[index])
            progress.advance(str(index), totals[index])
            progress.finish(str(index))
    missing = [i for i in range(len(planned)) if i not in layers]
    if missing:
        layers.update(
            _build_missing(
                source, planned, missing, keys, totals, settings, cache, progress, jobs,
                _Rules(rules, touched),
            )
        )  # fmt: skip
    annotations = [
        _annotations(plan.paths, settings.mtime, rules, touched[i])
        for i, plan in enumerate(planned)
    ]
    _add_prefetch(annotations, planned, touched)
    return [
        replace(layers[i], store_paths=tuple(plan.paths), annotations=annotations[i])
        for i, plan in enumerate(planned)
    ]


def _annotations(
    paths: Sequence[str], mtime: int, rules: RuleSet, touched: frozenset[int]
) -> dict[str, str]:
    out = encode_paths(paths, mtime)
    if touched:
        out[RULES_LABEL] = rules.digest(touched)
    return out


def _add_prefetch(
    annotations: Sequence[dict[str, str]],
    planned: Sequence[PlannedLayer],
    touched: Sequence[frozenset[int]],
) -> None:
    """The first layer a node may take from its store names the later ones' paths, so
    a node substituting them can fetch the whole image at once (see ``annotations``)."""
    from_store = [i for i, t in enumerate(touched) if not t]
    if len(from_store) > 1:
        later = [p for i in from_store[1:] for p in planned[i].paths]
        annotations[from_store[0]].update(encode_prefetch(later))


@dataclass(frozen=True)
class _Rules:
    """The image's rules and, per layer, the indexes of those that touch it."""

    rules: RuleSet
    touched: Sequence[frozenset[int]]

    def entries(self, source: StoreSource, index: int, paths: Sequence[str]) -> Iterable[TarEntry]:
        entries = store_path_entries(source, paths)
        return self.rules.apply(entries, set()) if self.touched[index] else entries


def _build_missing(
    source: StoreSource,
    planned: Sequence[PlannedLayer],
    missing: list[int],
    keys: list[str],
    totals: list[int],
    settings: LayerSettings,
    cache: LayerCache,
    progress: Progress,
    jobs: int,
    rules: _Rules,
) -> dict[int, Layer]:
    """Build the missing layers ``jobs`` at a time; the first failure stops the rest, and
    so does an exception in the waiting thread (Ctrl-C): each build stops at its next
    chunk and removes its temp blob, so the caller's exception follows within moments."""
    # Layers share the cores: gzip blocks of all layers go through one shared pool;
    # zstd workers are capped by the memory budget and split between layers.
    workers = jobs
    if settings.compression == "zstd":
        level = DEFAULT_LEVEL["zstd"] if settings.level is None else settings.level
        workers = max(1, min(jobs, ZSTD_MEMORY_BUDGET // zstd_worker_memory(level)))
    concurrent = min(workers, len(missing))
    threads = max(1, workers // concurrent)
    blocks = ThreadPoolExecutor(jobs, "stowaway-deflate") if jobs > 1 else None
    try:
        tasks = [
            partial(
                _build_store_layer, source, planned[i], i, keys[i], totals[i], settings,
                cache, progress, blocks, threads, rules,
            )
            for i in missing
        ]  # fmt: skip
        return dict(zip(missing, run_all(tasks, concurrent, "stowaway-layer"), strict=True))
    finally:
        if blocks is not None:
            blocks.shutdown(wait=True, cancel_futures=True)


def _build_store_layer(
    source: StoreSource,
    plan: PlannedLayer,
    index: int,
    key: str,
    total: int,
    settings: LayerSettings,
    cache: LayerCache,
    progress: Progress,
    blocks: Executor | None,
    threads: int,
    rules: _Rules,
    cancel: Stop,
) -> Layer:
    name = str(index)
    progress.start(name, paths_label(plan.paths), total)
    done = 0

    def on_bytes(n: int) -> None:
        # Tar bytes slightly exceed NAR bytes (512-byte headers); never overshoot.
        nonlocal done
        step = min(n, total - done)
        if step > 0:
            done += step
            progress.advance(name, step)

    layer = _build(
        rules.entries(source, index, plan.paths),
        key,
        settings,
        cache,
        executor=blocks,
        threads=threads,
        on_bytes=on_bytes,
        cancel=cancel,
    )
    progress.finish(name)
    return layer
