"""A base image under the Nix layers (``stowaway build --from``): its checked manifest
and config, and its layers as they are.

A base is someone else's image, so its manifest and config are hostile input: every
field used is checked for shape, digest form, size and media type before anything is
built on it (``parse_base``). Its layers are never re-tarred or recompressed: the
image lists the very blobs the base lists (digests unchanged). Where their bytes come
from is the reader's business (``sinks.base``): a layout's file (read only, never
dropped: ``Blob.cached`` False) or, for an archive or a registry, a ``BaseLayer``
fetched into the layer cache the first time a sink needs its bytes, verified.

Rules (docs/images.md): layers gzip, zstd or uncompressed, OCI or Docker media types;
non-distributable ("foreign") layers are refused, as they must not be copied to
another place and an image naming blobs its destination lacks is not whole. The base's
``containerd.io/snapshot/`` annotations are dropped: base layers are unpacked as
ordinary layers, never taken for stowaway store-path layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, Literal

from stowaway.errors import StowawayError
from stowaway.image.annotations import SNAPSHOT_LABEL_PREFIX
from stowaway.image.config import BaseConfig
from stowaway.image.digest import CHUNK, CorruptBlob, VerifyingReader, parse_digest
from stowaway.image.layer_cache import LayerCache, uncompressed
from stowaway.image.model import Layer, MediaType

__all__ = [
    "BaseImage",
    "BaseImageError",
    "BaseLayer",
    "LAYER_TYPES",
    "base_accounts",
    "base_layers",
    "parse_base",
    "parse_base_config",
]

#: Layer media types a base may use.
LAYER_TYPES = frozenset(
    {
        MediaType.OCI_LAYER.value,
        MediaType.OCI_LAYER_GZIP.value,
        MediaType.OCI_LAYER_ZSTD.value,
        MediaType.DOCKER_LAYER_GZIP.value,
        "application/vnd.docker.image.rootfs.diff.tar",
    }
)
#: Layers whose bytes may not be redistributed (OCI's deprecated non-distributable
#: types, Docker's foreign layers): refused.
FOREIGN_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
#: Docker's names of layer types → OCI's (the bytes are the same).
_AS_OCI = {
    MediaType.DOCKER_LAYER_GZIP.value: MediaType.OCI_LAYER_GZIP.value,
    "application/vnd.docker.image.rootfs.diff.tar": MediaType.OCI_LAYER.value,
}
CONFIG_TYPES = frozenset({MediaType.OCI_CONFIG.value, MediaType.DOCKER_CONFIG.value})
#: Largest config read, and largest layer accepted (1 TiB: a bound, not a budget).
CONFIG_LIMIT = 4 << 20
LAYER_LIMIT = 1 << 40
#: Largest /etc/passwd or /etc/group read from a base.
ACCOUNTS_LIMIT = 1 << 20
_HISTORY_KEYS = {"created": str, "created_by": str, "author": str, "comment": str}


class BaseImageError(StowawayError):
    """A base image that cannot be built on; the message names it (the --from value)."""


@dataclass
class BaseLayer(Layer):
    """A base layer whose bytes are fetched (``fetch``: a stream of the blob) into the
    layer cache the first time they are opened, verified against its digest; until then
    ``path`` is None, so a destination that has the blob never causes a download."""

    fetch: Callable[[], AbstractContextManager[IO[bytes]]] | None = None
    cache: LayerCache | None = None
    where: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def open(self) -> BinaryIO:
        with self._lock:
            if self.path is None:
                self._fetch()
        return super().open()

    def _fetch(self) -> None:
        assert self.fetch is not None and self.cache is not None
        key = hashlib.sha256(f"base-layer-v1 {self.digest} {self.diff_id}".encode()).hexdigest()
        hit = self.cache.lookup(key)
        if hit is not None and hit.digest == self.digest:
            self.path = hit.path
            return
        try:
            with self.cache.blob_writer() as writer, self.fetch() as f:
                reader = VerifyingReader(f, self.digest, self.size)  # type: ignore[arg-type]
                while data := reader.read(CHUNK):  # raises at the end if short or wrong
                    writer.write(data)
                self.path = self.cache.commit(key, writer, self.diff_id, self.media_type).path
        except CorruptBlob as e:
            raise BaseImageError(
                f"{self.where}: layer {self.digest} does not match its digest: "
                f"{e.message.split(': ', 1)[-1]}",
                hint="the base image is damaged or was changed while read; fetch it again",
            ) from None


@dataclass
class BaseImage:
    """A checked base image: its layers bottom first and what its config contributes."""

    where: str
    manifest_digest: str
    layers: list[Layer]
    config: BaseConfig


def base_layers(base: BaseImage, format: Literal["oci", "docker"]) -> list[Layer]:
    """The base's layers as a ``format`` manifest lists them: the same blobs, under the
    OCI or Docker name of their media type (Docker schema 2 has gzip layers only)."""
    out = []
    for i, layer in enumerate(base.layers):
        media_type = _AS_OCI.get(layer.media_type, layer.media_type)
        if format == "docker":
            if media_type != MediaType.OCI_LAYER_GZIP:
                raise BaseImageError(
                    f"{base.where}: layer {i} ({layer.digest}) is {layer.media_type}; "
                    "a Docker schema 2 image holds gzip layers only",
                    hint="use --format oci, or a base with gzip layers",
                )
            media_type = MediaType.DOCKER_LAYER_GZIP.value
        out.append(dataclasses.replace(layer, media_type=media_type)
                   if media_type != layer.media_type else layer)  # fmt: skip
    return out


def parse_base(
    where: str,
    manifest: Mapping[str, Any],
    media_type: str,
    manifest_digest: str,
    config: Callable[[str, int], bytes],
    make_layer: Callable[[Layer], Layer],
    platform: tuple[str, str],
) -> BaseImage:
    """Check a base's manifest (``media_type``, the JSON object ``manifest``), read
    its config through ``config(digest, size)`` and check it for ``platform`` (OS,
    ARCH); ``make_layer`` turns each checked layer into one whose bytes can be read."""
    if media_type not in (MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST):
        raise BaseImageError(
            f"{where}: {media_type or 'a document without a media type'} is not an image "
            "manifest stowaway can build on",
            hint="use an OCI image manifest or a Docker schema 2 manifest (or an index of them)",
        )
    if manifest.get("schemaVersion") != 2:
        raise BaseImageError(f"{where}: manifest {manifest_digest} has no schemaVersion 2")
    cdesc = _descriptor(where, manifest.get("config"), "config")
    if cdesc["mediaType"] not in CONFIG_TYPES:
        raise BaseImageError(
            f"{where}: config media type {cdesc['mediaType']!r} is not an image config"
        )
    if cdesc["size"] > CONFIG_LIMIT:
        raise BaseImageError(f"{where}: config is {cdesc['size']} bytes (at most {CONFIG_LIMIT})")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise BaseImageError(f"{where}: manifest {manifest_digest} has no list of layers")
    descs = [_layer_descriptor(where, i, d) for i, d in enumerate(raw_layers)]
    try:
        doc = json.loads(config(cdesc["digest"], cdesc["size"]))
    except ValueError as e:
        raise BaseImageError(f"{where}: config {cdesc['digest']} is not JSON ({e})") from None
    conf = parse_base_config(where, doc, len(descs), platform)
    layers = [
        make_layer(
            Layer(
                digest=d["digest"],
                size=d["size"],
                media_type=d["mediaType"],
                diff_id=diff_id,
                annotations=d["annotations"],
                reused=True,
            )
        )
        for d, diff_id in zip(descs, conf.diff_ids, strict=True)
    ]
    return BaseImage(where, manifest_digest, layers, conf)


def _descriptor(where: str, desc: object, what: str) -> dict[str, Any]:
    if not isinstance(desc, dict):
        raise BaseImageError(f"{where}: {what} descriptor is not a JSON object")
    digest, size, media_type = desc.get("digest"), desc.get("size"), desc.get("mediaType")
    if not isinstance(digest, str) or not isinstance(media_type, str):
        raise BaseImageError(f"{where}: {what} descriptor lacks a digest or media type")
    if type(size) is not int or size < 0:
        raise BaseImageError(f"{where}: {what} descriptor has no valid size")
    try:
        parse_digest(digest)
    except StowawayError as e:
        raise BaseImageError(f"{where}: {what}: {e.message}") from None
    return {"digest": digest, "size": size, "mediaType": media_type}


def _layer_descriptor(where: str, i: int, desc: object) -> dict[str, Any]:
    out = _descriptor(where, desc, f"layer {i}")
    assert isinstance(desc, dict)
    media_type = out["mediaType"]
    if media_type in FOREIGN_TYPES or desc.get("urls"):
        raise BaseImageError(
            f"{where}: layer {i} ({out['digest']}) is a non-distributable layer "
            f"({media_type}), which stowaway does not copy",
            hint="use a base image whose layers are all distributable",
        )
    if media_type not in LAYER_TYPES:
        raise BaseImageError(
            f"{where}: layer {i} ({out['digest']}) has media type {media_type!r}, "
            "which stowaway cannot use",
            hint="base layers must be tar, tar+gzip or tar+zstd (OCI), or Docker's gzip layers",
        )
    if out["size"] > LAYER_LIMIT:
        raise BaseImageError(f"{where}: layer {i} claims {out['size']} bytes")
    annotations = desc.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise BaseImageError(f"{where}: layer {i} annotations are not a string map")
    out["annotations"] = {
        k: v for k, v in annotations.items() if not k.startswith(SNAPSHOT_LABEL_PREFIX)
    }
    return out


def parse_base_config(
    where: str, doc: object, layers: int, platform: tuple[str, str]
) -> BaseConfig:
    """The checked contribution of a base's config JSON ``doc`` for an image of
    ``platform`` (OS, ARCH) on a base of ``layers`` layers."""
    if not isinstance(doc, dict):
        raise BaseImageError(f"{where}: the config is not a JSON object")
    have = (doc.get("os"), doc.get("architecture"))
    if have != platform:
        name = "/".join(str(x) for x in have)
        raise BaseImageError(
            f"{where} is a {name} image; this image is for {'/'.join(platform)}",
            hint="name the base image of this platform (its tag or digest), or an index",
        )
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if (
        not isinstance(rootfs, dict)
        or rootfs.get("type") != "layers"
        or not isinstance(diff_ids, list)
    ):
        raise BaseImageError(f"{where}: the config has no rootfs of type layers with diff_ids")
    if len(diff_ids) != layers:
        raise BaseImageError(
            f"{where}: the config lists {len(diff_ids)} diff IDs for {layers} layers"
        )
    for d in diff_ids:
        try:
            parse_digest(d if isinstance(d, str) else repr(d))
        except StowawayError as e:
            raise BaseImageError(f"{where}: rootfs.diff_ids: {e.message}") from None
    run = {} if doc.get("config") is None else doc["config"]
    if not isinstance(run, dict):
        raise BaseImageError(f"{where}: the config's 'config' is not a JSON object")
    check = _Checker(where)
    env = check.strings(run, "Env") or ()
    for item in env:
        if "=" not in item or item.startswith("="):
            raise BaseImageError(f"{where}: Env entry {item!r} is not KEY=VALUE")
    labels = {} if run.get("Labels") is None else run["Labels"]
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise BaseImageError(f"{where}: Labels is not a map of strings")
    return BaseConfig(
        env=tuple(env),
        entrypoint=check.strings(run, "Entrypoint"),
        cmd=check.strings(run, "Cmd"),
        user=check.string(run, "User"),
        workdir=check.string(run, "WorkingDir"),
        exposed_ports=check.keys(run, "ExposedPorts"),
        volumes=check.keys(run, "Volumes"),
        labels=dict(labels),
        stop_signal=check.string(run, "StopSignal"),
        history=_history(where, doc.get("history"), layers),
        diff_ids=tuple(diff_ids),
        variant=check.string(doc, "variant"),
    )


@dataclass
class _Checker:
    where: str

    def strings(self, doc: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
        value = doc.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise BaseImageError(f"{self.where}: {key} is not a list of strings")
        return tuple(value)

    def string(self, doc: Mapping[str, Any], key: str) -> str:
        value = "" if doc.get(key) is None else doc[key]
        if not isinstance(value, str):
            raise BaseImageError(f"{self.where}: {key} is not a string")
        return value

    def keys(self, doc: Mapping[str, Any], key: str) -> tuple[str, ...]:
        value = {} if doc.get(key) is None else doc[key]
        if not isinstance(value, dict):
            raise BaseImageError(f"{self.where}: {key} is not a JSON object")
        return tuple(str(k) for k in value)


def _history(where: str, value: object, layers: int) -> tuple[Mapping[str, object], ...]:
    """The base's history entries (known keys only), one per layer plus its empty ones;
    a base with fewer non-empty entries than layers gets entries for the rest."""
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(h, dict) for h in value):
        raise BaseImageError(f"{where}: history is not a list of objects")
    out: list[dict[str, object]] = []
    for h in value:
        entry: dict[str, object] = {
            k: h[k] for k, t in _HISTORY_KEYS.items() if isinstance(h.get(k), t)
        }
        if h.get("empty_layer") is True:
            entry["empty_layer"] = True
        out.append(entry)
    filled = sum(1 for h in out if not h.get("empty_layer"))
    if filled > layers:
        raise BaseImageError(f"{where}: history has {filled} layer entries for {layers} layers")
    out += [{"created_by": "base layer (no history)"}] * (layers - filled)
    return tuple(out)


def base_accounts(where: str, layers: Sequence[Layer]) -> tuple[bytes | None, bytes | None]:
    """The base's /etc/passwd and /etc/group as its layers leave them (topmost copy;
    None when deleted, absent, or not a regular file), reading layers top down only as
    far as needed: a registry base's layers are fetched for this."""
    found: dict[str, bytes | None] = {}
    for layer in reversed(layers):
        with layer.open() as raw:
            reader = VerifyingReader(raw, layer.digest, layer.size)
            stream = uncompressed(reader, layer.media_type)  # type: ignore[arg-type]
            _scan_accounts(where, stream, found)
            while stream.read(CHUNK) or reader.read(CHUNK):  # to the end: the digest check
                pass
        if len(found) == 2:
            break
    return found.get("passwd"), found.get("group")


def _scan_accounts(where: str, stream: IO[bytes], found: dict[str, bytes | None]) -> None:
    """Record passwd/group from one layer's tar (a whiteout records None)."""
    opaque = False
    layer: dict[str, bytes | None] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./").removeprefix("/")
                directory, _, base = name.rpartition("/")
                if directory != "etc":
                    continue
                if base == ".wh..wh..opq":
                    opaque = True
                elif base.removeprefix(".wh.") in ("passwd", "group"):
                    key = base.removeprefix(".wh.")
                    data = None
                    if not base.startswith(".wh.") and member.isfile():
                        if member.size <= ACCOUNTS_LIMIT:
                            f = tar.extractfile(member)
                            data = f.read() if f is not None else None
                    layer[key] = data
    except tarfile.TarError as e:
        raise BaseImageError(f"{where}: a layer is not a readable tar ({e})") from None
    for key in ("passwd", "group"):
        if key not in found and (key in layer or opaque):
            found[key] = layer.get(key)
