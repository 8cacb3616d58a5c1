"""``nix:0/nix/store/<hash>-<name>`` image references: realise, load or compose, import.

A store path becomes an image in two ways (the convention, also in docs/runtime.md):

* the path *is* an image: it holds an OCI image layout (``oci-layout`` + ``index.json``
  with exactly one manifest), as ``stowaway build -o oci:$out`` writes inside a Nix
  derivation — used as is;
* any other path is a closure root: the image is composed from its closure with the
  normal composer (cached layers, store-path annotations for the snapshotter). Its
  entrypoint is ``<path>/bin/<x>`` when ``<path>/bin`` holds exactly one executable;
  otherwise the image has none and the pod spec must give ``command``.

The image goes into containerd's content store (with the GC labels containerd's own
pull sets), is unpacked with the configured snapshotter exactly as containerd's
unpacker does it (Prepare with the layer's ``containerd.io/snapshot/*`` annotations and
the ``containerd.io/snapshot.ref`` chain ID, ALREADY_EXISTS means "skip"), and gets
three image records, the reference, the reference with ``:latest`` (the name CRI's
reference normaliser looks up, e.g. for ``sandbox_image``) and ``sha256:<config digest>``
(CRI's image ID), all labelled ``io.cri-containerd.image=managed``. containerd's CRI
plugin picks them up from the image events. The store path is rooted while its record
exists.

Port 0 makes ``nix:0`` an invalid registry host, so these names can never collide with
a pullable reference. kubelet appends ``:latest`` to references without a tag; a
trailing ``:latest`` is therefore accepted and ignored.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stowaway.errors import InvalidStorePath, PathNotFound, StowawayError
from stowaway.image.compose import compose
from stowaway.image.config import ImageOptions
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings
from stowaway.image.model import Descriptor, Image
from stowaway.runtime.containerd_client import ContainerdClient, ImageRecord
from stowaway.runtime.gcroots import GcRoots
from stowaway.runtime.substitute import Substituter
from stowaway.runtime.unpack import unpack_layers
from stowaway.sinks.oci_layout import read_layout_image
from stowaway.store.binary_cache import BinaryCache
from stowaway.store.local import LocalStore
from stowaway.store.model import STORE_DIR, PathInfo
from stowaway.store.paths import parse_store_path
from stowaway.store.sources import Sources, closure

__all__ = [
    "IMAGE_ID_LABEL",
    "NIX_PREFIX",
    "InvalidNixReference",
    "NixImages",
    "parse_nix_ref",
]

log = logging.getLogger(__name__)

NIX_PREFIX = "nix:0"
#: CRI's marker for images it manages (containerd 1.6 pkg/cri: imageLabelKey/Value).
IMAGE_ID_LABEL = {"io.cri-containerd.image": "managed"}
_DEFAULT_TAG = ":latest"


class InvalidNixReference(StowawayError):
    """A ``nix:0/…`` reference that does not name a store path."""


def parse_nix_ref(ref: str) -> str | None:
    """The store path a ``nix:0/nix/store/…`` reference names; None for other references.

    Raises InvalidNixReference for a nix reference that is not exactly one store path
    (other directories, ``..`` segments, bad hashes or names, paths below a store path).
    """
    if not ref.startswith(NIX_PREFIX + "/"):
        return None
    path = ref[len(NIX_PREFIX) :]
    if path.endswith(_DEFAULT_TAG):
        path = path[: -len(_DEFAULT_TAG)]
    if any(seg in (".", "..") for seg in path.split("/")) or posixpath.normpath(path) != path:
        raise InvalidNixReference(
            f"image reference {ref!r}: path {path!r} is not normalised ('.', '..' or '//' "
            "segments are refused)"
        )
    try:
        return parse_store_path(path, STORE_DIR).path
    except InvalidStorePath as e:
        raise InvalidNixReference(f"image reference {ref!r}: {e.message}") from None


def image_name(store_path: str) -> str:
    """The canonical reference (and containerd image name) of a store path."""
    return NIX_PREFIX + store_path


@dataclass
class StoreConfig:
    """Where store paths come from: the physical store dir and binary caches."""

    store_dir: Path
    caches: list[BinaryCache]
    cache_dir: Path


class NixImages:
    """Pull, describe and remove ``nix:0`` images in containerd (one namespace)."""

    def __init__(
        self,
        client: ContainerdClient,
        store: StoreConfig,
        gcroots: GcRoots,
        snapshotter: str,
    ) -> None:
        self.client = client
        self.store = store
        self.gcroots = gcroots
        self.snapshotter = snapshotter
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # basenames being pulled: rooted, no record yet; reconcile_roots keeps them
        self._pulling: set[str] = set()
        self._roots_lock = threading.Lock()

    # ------------------------------------------------------------------ pull

    def pull(self, store_path: str) -> str:
        """Make the image of ``store_path`` available; returns its image ID."""
        base = store_path.rsplit("/", 1)[-1]
        with self._lock(store_path):
            with self._roots_lock:
                self._pulling.add(base)
            try:
                self._realise(store_path)
                # Root before the record exists: a nix-collect-garbage racing with the
                # import must not take the path away (nor reconcile_roots: in flight).
                self.gcroots.add(Path(store_path))
                try:
                    image = self._image_of(store_path)
                    self._import(image, image_name(store_path))
                except BaseException:
                    if self.record(store_path) is None:  # no image keeps the path: unroot
                        self.gcroots.remove(base)
                    raise
                return image.config.digest
            finally:
                with self._roots_lock:
                    self._pulling.discard(base)

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    def _sources(self) -> Sources:
        from stowaway.store.local import DirectoryStore, db_path_for

        d = self.store.store_dir
        local = (
            LocalStore(d)
            if db_path_for(d).is_file()
            else DirectoryStore(d, reference_sources=self.store.caches)
        )
        return Sources([local, *self.store.caches])

    def _on_disk(self, path: str) -> Path:
        return self.store.store_dir / path.rsplit("/", 1)[-1]

    def _realise(self, store_path: str) -> dict[str, PathInfo]:
        """Make the closure of ``store_path`` present in the store dir (substituting)."""
        with self._sources() as sources:
            infos = closure(sources, [store_path])
            has_db = isinstance(sources.sources[0], LocalStore)
        missing = sorted(p for p in infos if not os.path.lexists(self._on_disk(p)))
        if not missing:
            return infos
        if has_db:
            raise PathNotFound(
                f"{missing[0]} (in the closure of {store_path}) is not in the Nix store "
                f"{self.store.store_dir}, which has a Nix database: stowaway does not write "
                "paths behind Nix's back",
                hint=f"run `nix-store --realise {store_path}` first, or serve a store "
                "directory without a database (--store DIR) that stowaway may fill",
            )
        sub = Substituter(self.store.caches, self.store.store_dir)
        with ThreadPoolExecutor(max(2, os.cpu_count() or 2), "stowaway-substitute") as pool:
            got = sub.fetch_all([p.rsplit("/", 1)[-1] for p in missing], pool)
        for p, where in zip(missing, got, strict=True):
            if where is None:
                tried = ", ".join(c.url for c in self.store.caches) or "no substituters"
                raise PathNotFound(
                    f"{p} (in the closure of {store_path}) is neither in {self.store.store_dir} "
                    f"nor substitutable (tried: {tried})"
                )
        return infos

    def _image_of(self, store_path: str) -> Image:
        disk = self._on_disk(store_path)
        if (disk / "oci-layout").is_file() and (disk / "index.json").is_file():
            return read_layout_image(disk)
        options = ImageOptions(entrypoint=default_entrypoint(store_path, disk))
        with self._sources() as sources:
            result = compose(
                sources,
                [store_path],
                options,
                closure=closure(sources, [store_path]),
                settings=LayerSettings(),
                cache=LayerCache(self.store.cache_dir),
            )
        return result.image

    def _import(self, image: Image, name: str) -> None:
        c = self.client
        manifest = Descriptor(image.manifest.media_type, image.manifest.digest, image.manifest.size)
        gc = {"containerd.io/gc.ref.content.config": image.config.digest}
        for i, layer in enumerate(image.layers):
            gc[f"containerd.io/gc.ref.content.l.{i}"] = layer.digest
        with c.lease():
            c.put_blob(image.config)
            c.put_blob(image.manifest, gc)
            # Like CRI's pull: a layer's blob goes into the content store only when it
            # must be applied, not when the snapshotter committed it from the store.
            top, _ = unpack_layers(
                c,
                self.snapshotter,
                image.layers,
                lambda layer: c.put_blob(layer, {"containerd.io/uncompressed": layer.diff_id}),
            )
            c.set_content_labels(
                image.config.digest, {f"containerd.io/gc.ref.snapshot.{self.snapshotter}": top}
            )
            # Records last: CRI reads the image when it sees the create event.
            for n in (name, name + _DEFAULT_TAG, image.config.digest):
                c.put_image(n, manifest, IMAGE_ID_LABEL)

    # ------------------------------------------------------------------ status, remove

    def record(self, store_path: str) -> ImageRecord | None:
        return self.client.get_image(image_name(store_path))

    def nix_records(self) -> list[ImageRecord]:
        return [
            r
            for r in self.client.list_images([f'name~="^{NIX_PREFIX}/"'])
            if r.name.startswith(NIX_PREFIX + "/") and not r.name.endswith(_DEFAULT_TAG)
        ]

    def config_of(self, record: ImageRecord) -> tuple[str, dict[str, Any], int]:
        """(config digest, config JSON, image size) of an image record."""
        manifest = json.loads(self.client.read_content(record.target.digest))
        cdesc = manifest["config"]
        config = json.loads(self.client.read_content(cdesc["digest"]))
        size = (
            record.target.size
            + int(cdesc["size"])
            + sum(int(lyr["size"]) for lyr in manifest["layers"])
        )
        return str(cdesc["digest"]), config, size

    def remove(self, store_path: str) -> None:
        """Drop the image's records (its ID record only if no other image uses it) and
        the GC root. Idempotent."""
        with self._lock(store_path):
            rec = self.record(store_path)
            if rec is not None:
                image_id, _, _ = self.config_of(rec)
                ours = {rec.name, rec.name + _DEFAULT_TAG}
                for name in ours:
                    self.client.delete_image(name)
                others = [
                    r
                    for r in self.client.list_images()
                    if r.target.digest == rec.target.digest and r.name not in (*ours, image_id)
                ]
                if not others:
                    self.client.delete_image(image_id)
            self.gcroots.remove(store_path.rsplit("/", 1)[-1])

    def reconcile_roots(self) -> None:
        """Keep exactly the roots whose ``nix:0`` record still exists (an image removed
        through containerd's CRI by ID, or a crash between record and root changes),
        plus those of pulls in flight (rooted, record not written yet)."""
        with self._roots_lock:  # a pull registers before rooting, unregisters after its record
            keep = {r.name[len(NIX_PREFIX) :].rsplit("/", 1)[-1] for r in self.nix_records()}
            for base in self.gcroots.rooted() - keep - self._pulling:
                self.gcroots.remove(base)


def default_entrypoint(store_path: str, disk: Path) -> list[str] | None:
    """``[<path>/bin/<x>]`` when ``bin/`` holds exactly one executable, else None."""
    try:
        names = sorted(os.listdir(disk / "bin"))
    except OSError:
        return None
    exes = []
    for n in names:
        try:
            st = os.stat(disk / "bin" / n)  # follows links: bin/sh -> busybox counts
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            exes.append(n)
    return [f"{store_path}/bin/{exes[0]}"] if len(exes) == 1 else None
