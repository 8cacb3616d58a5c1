"""``NixResolver``: the registry's on-demand images (a ``ManifestResolver``).

name + tag → store paths (package index, ``store/<hash>`` lookup, optionally
``nix-build``) → closure over the sources (local/SAN store first, then binary
caches, as the composer) → ``stowaway.image.compose`` through the layer cache.
The registry's filesystem storage root is the layer cache root by default, so
the blobs a composition produces are already in storage (the API's copy of a
resolved blob finds it present and skips it).

With ``systems`` configured, a name resolves in each system's package set and the
answer is an image index (OCI index, or Docker manifest list for clients that accept
only Docker types) of one image per system, each labelled with its system's platform;
a client accepting no index type gets the first system's image. Images are labelled
from their derivations otherwise (``image.platform``).

Manifests are cached per (sorted store paths, format, platform) for as long as their blob
files exist (the API drops a damaged one, see ``registry.verified``); the image
options are fixed per resolver, so names resolving to the same paths share one
manifest, and a changed index simply resolves to other paths. Compositions run in a
thread pool under single-flight per key: a hundred first pulls compose once.

``nix-build`` runs for names clients choose, so it is fenced: only attribute paths
``nix_build_allow`` permits (top-level by default); one flight per name; its own
executor of ``nix_build_jobs`` threads with at most ``nix_build_queue`` builds
waiting (beyond that: 429 TOOMANYREQUESTS at once), so index and ``store/`` names
never wait behind builds; results and failures are remembered in bounded caches
(failures for ``nix_build_failure_ttl`` seconds).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from stowaway.distribution.errors import ErrorCode, RegistryApiError
from stowaway.errors import StowawayError
from stowaway.fsutil import atomic_write
from stowaway.image.compose import compose
from stowaway.image.config import ImageOptions
from stowaway.image.digest import sha256_digest
from stowaway.image.index import index_blob
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings
from stowaway.image.model import Blob, MediaType
from stowaway.image.platform import (
    Platform,
    closure_platform,
    parse_platform,
    platform_of_system,
    with_platform,
)
from stowaway.registry.config import NixOptions
from stowaway.registry.lru import BoundedCache
from stowaway.registry.names import (
    DEFAULT_TAG,
    ImageName,
    expand_packages,
    parse_image_name,
    resolve_packages,
    select_package_set,
)
from stowaway.registry.nix_build import NAME_CACHE_SIZE, Miss, NixBuild
from stowaway.registry.package_index import IndexFile, PackageIndex
from stowaway.registry.resolver import ResolvedManifest
from stowaway.registry.singleflight import SingleFlight
from stowaway.registry.validate import is_digest
from stowaway.store.binary_cache import CacheError
from stowaway.store.model import StoreSource
from stowaway.store.sources import Sources, closure, open_sources

log = logging.getLogger("stowaway.registry")
Format = Literal["oci", "docker"]
#: (sorted roots, format, platform wanted ("" = the one the roots' derivations are
#: for), layer base roots)
Key = tuple[tuple[str, ...], Format, str, tuple[str, ...]]
MANIFEST_CACHE_SIZE = 4096
_EMPTY = PackageIndex({})


class _NeedsThread(Exception):
    """Raised by the non-blocking fast path when a step would block the loop."""


def choose_format(accept: frozenset[str]) -> Format | None:
    """OCI unless the client accepts only Docker schema 2; None if neither."""
    if not accept or MediaType.OCI_MANIFEST.value in accept:
        return "oci"
    if MediaType.DOCKER_MANIFEST.value in accept:
        return "docker"
    return None


def choose_index_format(accept: frozenset[str]) -> Format | None:
    """An OCI index unless the client accepts only Docker manifest lists; None if neither."""
    if not accept or MediaType.OCI_INDEX.value in accept:
        return "oci"
    if MediaType.DOCKER_LIST.value in accept:
        return "docker"
    return None


class NixResolver:
    def __init__(
        self,
        options: NixOptions,
        cache: LayerCache,
        *,
        source: StoreSource | None = None,
        workers: int = 4,
    ) -> None:
        self.options = options
        self.cache = cache
        self._source = source
        self._opened: Sources | None = None  # a source opened here (closed by close())
        self._source_lock = threading.Lock()
        #: per system (``""`` without ``systems``): tag → package index
        self.system_sets = {
            system: _package_sets(options, system) for system in options.systems or ("",)
        }
        self.sets = next(iter(self.system_sets.values()))
        self.nix_build = (
            NixBuild(
                options.nix_expr,
                cache.root / "nix-roots",
                options.nix_build_args,
                failure_ttl=options.nix_build_failure_ttl,
                allow=options.nix_build_allow,
            )
            if options.nix_build
            else None
        )
        #: names the operator wrote (meta members, always): buildable whatever the allow list
        self._config_names = frozenset(
            {*options.always, *(m for members in options.meta.values() for m in members)}
        )
        #: nix-build has its own small executor: a storm of unknown names occupies it,
        #: never the pool that serves index names, store/ names and compositions
        self._build_pool = ThreadPoolExecutor(
            options.nix_build_jobs, thread_name_prefix="stowaway-nix-build"
        )
        self._build_flight: SingleFlight[tuple[str, ...] | None] = SingleFlight()
        self._builds_admitted = 0  # running or waiting for a job (touched on the loop only)
        #: pulls answered 429 because jobs + queue builds were admitted (tests and metrics)
        self.builds_refused = 0
        self.settings = LayerSettings(compression=options.compression)  # type: ignore[arg-type]
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="stowaway-resolve")
        self._flight: SingleFlight[ResolvedManifest] = SingleFlight()
        self._manifests: OrderedDict[Key, ResolvedManifest] = OrderedDict()
        self._hashes: BoundedCache[str, str] = BoundedCache(NAME_CACHE_SIZE)
        #: compositions actually run (tests and metrics)
        self.composes = 0

    def check_indexes(self) -> None:
        """Read every package index now: a missing or malformed file stops start-up
        (``PackageIndexError`` naming it) instead of failing the first pull."""
        for sets in self.system_sets.values():
            for index in sets.values():
                if index is not None:
                    index.get()

    @property
    def builds_admitted(self) -> int:
        """nix-builds running or waiting for a job (at most jobs + queue)."""
        return self._builds_admitted

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._build_pool.shutdown(wait=True)
        if self._opened is not None:
            self._opened.close()

    # -- the ManifestResolver hook --------------------------------------------------
    async def resolve(
        self, name: str, reference: str, accept: frozenset[str]
    ) -> ResolvedManifest | None:
        if is_digest(reference):
            return None  # a digest names bytes; only storage can have them
        request = parse_image_name(name)
        systems = self.options.systems if not request.is_store else ()
        index_fmt = choose_index_format(accept) if systems else None
        fmt = choose_format(accept)
        if fmt is None and index_fmt is None:
            return None
        try:
            if index_fmt is not None:
                return await self._index_of(request, name, reference, index_fmt)
            assert fmt is not None
            # a client that takes no index gets the first system's image (self.sets)
            plat = str(platform_of_system(systems[0])) if systems else ""
            roots, base = await self._roots(request, name, reference, self.sets)
            return await self._image((roots, fmt, plat, base))
        except RegistryApiError:
            raise
        except CacheError as err:
            log.warning("composing %s:%s: %s", name, reference, err)
            message = f"{name}:{reference}: {err.message}"
            raise RegistryApiError(502, [(ErrorCode.UNKNOWN.value, message)]) from err
        except StowawayError as err:
            log.warning("composing %s:%s: %s", name, reference, err)
            raise RegistryApiError.of(
                ErrorCode.MANIFEST_UNKNOWN, f"cannot compose {name}:{reference}: {err.message}"
            ) from err

    async def _image(self, key: Key) -> ResolvedManifest:
        hit = self._manifests.get(key)
        # a blob file gone (dropped as damaged, or cleaned away) means compose again
        if hit is not None and all(p.exists() for p in hit.blobs.values()):
            self._manifests.move_to_end(key)
            return hit
        return await self._flight.do(key, lambda: self._compose(key))

    async def _index_of(
        self, request: ImageName, name: str, tag: str, fmt: Format
    ) -> ResolvedManifest:
        """The index of one image per configured system (each cached as an image is;
        the index is a pure function of them, so it is the same bytes every time)."""
        children: list[tuple[Platform, ResolvedManifest]] = []
        for system in self.options.systems:
            platform = platform_of_system(system)
            assert platform is not None  # checked with the config
            roots, base = await self._roots(request, name, tag, self.system_sets[system])
            children.append((platform, await self._image((roots, fmt, str(platform), base))))
        index = index_blob(
            [
                (p, Blob(sha256_digest(m.data), len(m.data), m.media_type, data=m.data))
                for p, m in children
            ],
            fmt,
        )
        assert index.data is not None
        blobs = {d: path for _, m in children for d, path in m.blobs.items()}
        manifests = [(m.data, m.media_type) for _, m in children]
        return ResolvedManifest(index.data, index.media_type, blobs, manifests)

    # -- names → store paths ---------------------------------------------------------
    async def _roots(
        self, request: ImageName, name: str, tag: str, sets: Mapping[str, IndexFile | None]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The store paths ``name:tag`` asks for, and those of its layer base (the
        ``layer_base`` entries all of whose packages it holds). Index and store lookups
        run on the loop when nothing blocks, else in the resolver pool; names only
        nix-build can resolve wait for the build executor, never in front of them."""
        loop = asyncio.get_running_loop()
        if request.is_store:
            try:
                return self._store_roots(request, name, tag, False), ()
            except _NeedsThread:
                roots = await loop.run_in_executor(
                    self._pool, self._store_roots, request, name, tag, True
                )
                return roots, ()
        try:
            index = self._index(sets, tag, name, False)
        except _NeedsThread:
            index = await loop.run_in_executor(self._pool, self._index, sets, tag, name, True)
        wanted = expand_packages(request.packages, self.options.meta, self.options.always)
        found: dict[str, tuple[str, ...]] = {}
        to_build: list[str] = []
        for pkg in wanted:
            path = index.lookup(pkg)
            if path is not None:
                found[pkg] = (path,)
            elif self.nix_build is not None and tag == DEFAULT_TAG:
                to_build.append(pkg)
        where = f"{name}:{tag}"
        for pkg in to_build:  # refuse before anything runs
            self._check_buildable(pkg, where)
        for pkg in to_build:  # one at a time: a request holds one build slot at most
            paths = await self._build(pkg, where)
            if paths is not None:
                found[pkg] = paths
        resolved = resolve_packages(wanted, found.get, where)
        base: set[str] = set()
        for entry in self.options.layer_base:
            members = expand_packages([entry], self.options.meta, ())
            if all(m in resolved for m in members):
                base.update(p for m in members for p in resolved[m])
        roots = tuple(sorted({p for paths in resolved.values() for p in paths}))
        return roots, tuple(sorted(base))

    def _index(
        self, sets: Mapping[str, IndexFile | None], tag: str, name: str, blocking: bool
    ) -> PackageIndex:
        index_file = select_package_set(tag, sets, name)
        if index_file is None:
            return _EMPTY
        if blocking:
            return index_file.get()
        current = index_file.current()
        if current is None:
            raise _NeedsThread
        return current

    def _store_roots(
        self, request: ImageName, name: str, tag: str, blocking: bool
    ) -> tuple[str, ...]:
        if tag != DEFAULT_TAG:
            raise RegistryApiError.of(
                ErrorCode.MANIFEST_UNKNOWN,
                f"{name}:{tag}: store/ names have the single tag {DEFAULT_TAG}",
            )
        paths = {self._path_of_hash(h, name, blocking) for h in request.store_hashes}
        return tuple(sorted(paths))

    # -- nix-build, bounded --------------------------------------------------------
    def _check_buildable(self, pkg: str, where: str) -> None:
        """Names missing from the index are built only where ``nix_build_allow`` (or
        the config's own meta/always names) permits: ``a.b.c`` reaches no nested
        attribute the operator did not open."""
        assert self.nix_build is not None
        if pkg in self._config_names or self.nix_build.permits(pkg):
            return
        rule = ", ".join(f'"{p}"' for p in self.nix_build.allow)
        raise RegistryApiError.of(
            ErrorCode.MANIFEST_UNKNOWN,
            f"{where}: {pkg} is not in the package index, and nix_build_allow = [{rule}] "
            "does not let it be built (* matches within one attribute-path segment, "
            "** any number of segments)",
        )

    async def _build(self, pkg: str, where: str) -> tuple[str, ...] | None:
        """``nix-build`` of one name: answered from memory when it can be (failures
        too, for ``nix_build_failure_ttl``), joined when already running, else run on
        the build executor if fewer than jobs + queue builds are admitted — 429 if not."""
        nix_build = self.nix_build
        assert nix_build is not None
        hit = nix_build.cached(pkg)  # raises a remembered failure
        if not isinstance(hit, Miss):
            return hit
        if pkg not in self._build_flight:
            limit = self.options.nix_build_jobs + self.options.nix_build_queue
            if self._builds_admitted >= limit:
                self.builds_refused += 1
                raise RegistryApiError.of(
                    ErrorCode.TOOMANYREQUESTS,
                    f"{where}: {self._builds_admitted} nix builds are running or waiting "
                    f"(nix_build_jobs + nix_build_queue = {limit}); {pkg} was not started, "
                    "try again later",
                )
            self._builds_admitted += 1  # before any await: the flight below is ours

        async def work() -> tuple[str, ...] | None:
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self._build_pool, nix_build.build, pkg
                )
            finally:
                self._builds_admitted -= 1

        return await self._build_flight.do(pkg, work)

    def source(self) -> StoreSource:
        with self._source_lock:
            if self._source is None:
                o = self.options
                self._source = self._opened = open_sources(
                    o.store, o.substituters, o.trusted_public_keys, require_sigs=o.require_sigs
                )
            return self._source

    def _path_of_hash(self, hash_part: str, name: str, blocking: bool) -> str:
        """The full store path with ``hash_part``; cached (a hash names one path forever)."""
        hit = self._hashes.get(hash_part)
        if hit is not None:
            return hit
        if not blocking:
            raise _NeedsThread
        source = self.source()
        sources = source if isinstance(source, Sources) else Sources([source])
        path = sources.path_for_hash(hash_part)
        if path is not None:
            self._hashes.put(hash_part, path)
            return path
        raise RegistryApiError.of(
            ErrorCode.MANIFEST_UNKNOWN,
            f"{name}: no store path with hash {hash_part} in {source.name}",
        )

    # -- composition ----------------------------------------------------------------
    async def _compose(self, key: Key) -> ResolvedManifest:
        result = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._compose_blocking, key
        )
        self._manifests[key] = result
        while len(self._manifests) > MANIFEST_CACHE_SIZE:
            self._manifests.popitem(last=False)
        return result

    def _compose_blocking(self, key: Key) -> ResolvedManifest:
        roots, fmt, want, base = key
        started = time.perf_counter()
        source = self.source()
        clo = closure(source, roots)
        explicit = parse_platform(want) if want else None
        platform = closure_platform(source, roots, clo, explicit=explicit, check_explicit=True)
        options = ImageOptions(env=list(self.options.env), contents=list(roots))
        options = with_platform(options, platform.platform)
        # Docker schema 2 has no zstd or uncompressed layer types
        settings = self.settings if fmt == "oci" else LayerSettings(compression="gzip")
        image = compose(
            source,
            list(roots),
            options,
            closure=clo,
            strategy=self.options.layering,
            max_layers=self.options.max_layers,
            settings=settings,
            cache=self.cache,
            format=fmt,
            layer_base=base,
        ).image
        self.composes += 1
        log.info(
            "composed %s (%s, %s, %d paths, %d layers) in %.2fs",
            " ".join(p.rsplit("/", 1)[1] for p in roots)[:200],
            fmt,
            platform.platform,
            len(clo),
            len(image.layers),
            time.perf_counter() - started,
        )
        blobs: dict[str, Path] = {image.config.digest: self._store_small_blob(image.config)}
        for layer in image.layers:
            assert layer.path is not None, "composed layers live in the layer cache"
            blobs[layer.digest] = layer.path
        assert image.manifest.data is not None
        return ResolvedManifest(image.manifest.data, image.manifest.media_type, blobs)

    def _store_small_blob(self, blob: Blob) -> Path:
        """Put an in-memory blob (the config) into the cache's blob directory."""
        assert blob.data is not None
        path = self.cache.blob_path(blob.digest)
        if path.is_file() and path.stat().st_size == blob.size:
            return path
        atomic_write(path, blob.data)
        return path

    # -- for the landing page -------------------------------------------------------
    def package_sets(self) -> Mapping[str, Sequence[str]]:
        """Tag → package names it offers (meta-packages first)."""
        out: dict[str, list[str]] = {}
        for tag, index_file in sorted(self.sets.items()):
            try:
                index = index_file.get() if index_file is not None else _EMPTY
            except StowawayError:
                index = _EMPTY
            out[tag] = [*sorted(self.options.meta), *index.names()]
        return out


def _package_sets(options: NixOptions, system: str) -> dict[str, IndexFile | None]:
    """Tag → package index of ``system`` (its name replaces ``{system}`` in the paths)."""
    sets: dict[str, IndexFile | None] = {DEFAULT_TAG: None}
    paths = {DEFAULT_TAG: options.index} if options.index is not None else {}
    for tag, path in {**paths, **options.indexes}.items():
        sets[tag] = IndexFile(Path(str(path).replace("{system}", system)) if system else path)
    return sets
