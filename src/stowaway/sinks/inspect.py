"""Read back an image from any destination ``build`` writes: its manifest, its config
and the store paths per layer.

``oci:`` and ``oci-archive:`` are read through ``LayoutReader``; ``docker-archive:``
is ``docker save``'s tarball (``manifest.json`` → config and layer files, no
manifest and no descriptors: a layer's digest is its file name under
``blobs/sha256/`` or, for older archives' ``<id>/layer.tar``, the file's hash, and
its media type is sniffed); ``docker://`` goes through the distribution client
(Docker schema 2 and OCI manifests; an index is reported as one, with its
platforms, unless a platform is asked for).

The store paths come from the ``containerd.io/snapshot/stowaway.paths.<i>`` layer
annotations the composer writes (``image.annotations.decode_paths``, which rejects
a malformed one: the error names it). A docker archive has no annotations; there
they come from the config's history comments (``store paths: <names>``), checked
the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, cast

from stowaway.distribution.client import RegistryClient
from stowaway.distribution.credentials import CredentialsLookup
from stowaway.errors import StowawayError
from stowaway.image.annotations import PATHS_PREFIX, PathsAnnotationError, decode_paths
from stowaway.image.config import default_architecture
from stowaway.image.digest import parse_digest, sha256_digest
from stowaway.image.model import MediaType
from stowaway.sinks.oci_layout import REF_NAME, LayoutReader, blob_name, json_object
from stowaway.sinks.targets import (
    DockerArchiveTarget,
    OciArchiveTarget,
    RegistryTarget,
    Target,
    parse_target,
)
from stowaway.store.model import STORE_DIR

__all__ = [
    "ImageReader",
    "InspectError",
    "fetch_manifest",
    "host_platform",
    "image_store_paths",
    "is_index",
    "open_image",
    "pick_platform",
    "read_image_summary",
]

INDEX_TYPES = (MediaType.OCI_INDEX, MediaType.DOCKER_LIST)
MANIFEST_TYPES = (MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST)
ACCEPT = ", ".join([*MANIFEST_TYPES, *INDEX_TYPES])
#: Largest manifest or config read (registries cap manifests at 4 MiB).
SMALL_LIMIT = 4 << 20
#: The history comment the composer gives a store-path layer (image.compose).
HISTORY_PREFIX = "store paths: "

#: (body, media type) of a manifest or index by digest (or tag, for a registry)
FetchManifest = Callable[[str], tuple[bytes, str]]
#: the bytes of a small blob (config) by descriptor digest and size
FetchBlob = Callable[[str, int], bytes]


class InspectError(StowawayError):
    """An image that cannot be read back: names the target and what is wrong."""


def host_platform() -> str:
    """``linux/<this machine's architecture>``: what ``--platform host`` means."""
    return f"linux/{default_architecture()}"


def read_image_summary(
    target: str,
    *,
    platform: str | None = None,
    tls_verify: bool = True,
    creds: CredentialsLookup | None = None,
) -> dict[str, Any]:
    """The manifest, config and layers (digest, size, media type, store paths) of the
    image at ``target``; for an index without ``platform`` (``OS/ARCH[/VARIANT]``),
    the index and its platforms. ``tls_verify`` and ``creds`` are for docker://."""
    dest = parse_target(target)
    want = _parse_platform(platform) if platform else None
    if isinstance(dest, DockerArchiveTarget):
        archive = dest
        return _guarded(target, "docker archive", lambda: _from_docker_archive(target, archive))
    what = "image" if isinstance(dest, RegistryTarget) else "OCI layout"
    hint = "for a plain-HTTP registry pass --tls-verify=false"
    with open_image(dest, tls_verify=tls_verify, creds=creds, plain_http_hint=hint) as reader:
        return _guarded(
            target,
            what,
            lambda: _from_manifest(target, reader.reference, reader.fetch, reader.blob, want),
        )


def _guarded(target: str, what: str, read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return read()
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # valid JSON, wrong shape
        why = f"{type(e).__name__}: {e}"
        raise InspectError(f"{target} is not a valid {what} ({why})") from None


# ------------------------------------------------------------------ platforms


def _parse_platform(value: str) -> tuple[str, str, str | None]:
    if value == "host":
        value = host_platform()
    parts = value.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InspectError(
            f"invalid platform {value!r}", hint="OS/ARCH[/VARIANT], e.g. linux/amd64, or host"
        )
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _platform_name(p: Mapping[str, Any]) -> str:
    name = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return name + (f"/{p['variant']}" if p.get("variant") else "")


def _from_index(
    target: str,
    index: dict[str, Any],
    index_digest: str,
    media_type: str,
    want: tuple[str, str, str | None] | None,
    fetch: FetchManifest,
    blob: FetchBlob,
) -> dict[str, Any]:
    if want is None:
        return {
            "target": target,
            "index": True,
            "media_type": media_type,
            "manifest_digest": index_digest,
            "platforms": _platforms(index),
        }
    summary = _from_manifest(target, pick_platform(target, index, want)[0], fetch, blob, None)
    summary["index_digest"] = index_digest
    return summary


def _platforms(index: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "platform": _platform_name(p if isinstance(p := m.get("platform"), dict) else {}),
            "digest": str(m.get("digest", "")),
            "media_type": m.get("mediaType", ""),
            "size": m.get("size", 0),
        }
        for m in index.get("manifests", [])
        if isinstance(m, dict)
    ]


def pick_platform(
    target: str, index: Mapping[str, Any], want: tuple[str, str, str | None]
) -> tuple[str, str]:
    """The digest and listed media type ("" when unsaid) of the first manifest of
    ``index`` for ``want`` (OS, ARCH, VARIANT or None for any); InspectError listing the
    platforms the index has when none fits."""
    os_, arch, variant = want
    for m in index.get("manifests", []):
        p = m.get("platform") if isinstance(m, dict) else None
        if not isinstance(p, dict):
            continue
        if p.get("os") == os_ and p.get("architecture") == arch:
            if variant is None or p.get("variant") == variant:
                try:  # it names a blob file or goes into a URL
                    digest = "{}:{}".format(*parse_digest(str(m.get("digest"))))
                except StowawayError as e:
                    raise InspectError(f"{target}: index entry: {e.message}") from None
                return digest, str(m.get("mediaType") or "")
    raise InspectError(
        f"{target}: no {'/'.join(x for x in want if x)} image in the index",
        hint="it has: " + (", ".join(r["platform"] for r in _platforms(index)) or "nothing"),
    )


# ------------------------------------------------------------------ manifests


def _from_manifest(
    target: str,
    reference: str,
    fetch: FetchManifest,
    blob: FetchBlob,
    want: tuple[str, str, str | None] | None,
) -> dict[str, Any]:
    """The summary of the manifest (or index) ``fetch`` returns for ``reference``."""
    doc, digest, media_type = fetch_manifest(target, reference, fetch)
    if is_index(doc, media_type):
        return _from_index(target, doc, digest, media_type, want, fetch, blob)
    if media_type and media_type not in MANIFEST_TYPES:
        raise InspectError(f"{target}: {media_type!r} is not an image manifest")
    config_desc = doc["config"]
    config = _json_blob(target, blob(str(config_desc["digest"]), int(config_desc["size"])))
    layers = []
    for i, layer in enumerate(doc.get("layers", [])):
        annotations = layer.get("annotations") or {}
        try:
            paths = decode_paths(annotations)
        except PathsAnnotationError as e:
            raise InspectError(f"{target}: layer {i} ({layer['digest']}): {e.message}") from None
        layers.append(_layer_row(layer["digest"], layer["size"], layer.get("mediaType"), paths))
    return {
        "target": target,
        "index": False,
        "media_type": media_type,
        "manifest_digest": digest,
        "config_digest": config_desc["digest"],
        "config": _config_view(config),
        "layers": layers,
    }


def fetch_manifest(
    target: str, reference: str, fetch: FetchManifest
) -> tuple[dict[str, Any], str, str]:
    """(JSON object, digest, media type) of the manifest or index ``fetch`` returns for
    ``reference`` (a tag or digest), checked against the digest when it names one."""
    body, media_type = fetch(reference)
    if len(body) > SMALL_LIMIT:
        raise InspectError(f"{target}: manifest {reference} is larger than {SMALL_LIMIT} bytes")
    digest = sha256_digest(body)
    if reference.startswith("sha256:") and digest != reference:
        raise InspectError(f"{target}: manifest {reference} has digest {digest}")
    doc = json_object(body, f"{target}: manifest {digest}", InspectError)
    return doc, digest, str(doc.get("mediaType") or media_type)


def is_index(doc: Mapping[str, Any], media_type: str) -> bool:
    """An image index (or Docker manifest list) rather than one image's manifest."""
    return media_type in INDEX_TYPES or (not media_type and "manifests" in doc)


def _layer_row(digest: str, size: int, media_type: object, paths: list[str] | None) -> Any:
    return {
        "digest": str(digest),
        "size": int(size),
        "media_type": str(media_type or ""),
        "store_paths": [f"{STORE_DIR}/{base}" for base in paths or []],
    }


def _json_blob(target: str, data: bytes) -> dict[str, Any]:
    return json_object(data, f"{target}: the image config", InspectError)


def _config_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a person asks of a config: how the container runs and for which platform."""
    c = config.get("config") or {}
    return {
        "entrypoint": c.get("Entrypoint"),
        "cmd": c.get("Cmd"),
        "user": c.get("User") or None,
        "env": list(c.get("Env") or []),
        "workdir": c.get("WorkingDir") or None,
        "exposed_ports": sorted(c.get("ExposedPorts") or {}),
        "labels": dict(c.get("Labels") or {}),
        "os": config.get("os"),
        "architecture": config.get("architecture"),
        "variant": config.get("variant"),
        "created": config.get("created"),
    }


# ------------------------------------------------------------------ image readers


@dataclass
class ImageReader:
    """One image at an ``oci:``, ``oci-archive:`` or ``docker://`` target: ``fetch`` gets
    a manifest or index by ``reference`` (what the target names), ``blob`` a small blob
    checked against its digest, ``open_blob`` a stream of any blob (unverified: callers
    verify while copying), ``blob_file`` the file holding a blob in a layout directory
    (None elsewhere). ``origin`` is (API host, repository) for a registry."""

    target: str
    reference: str
    fetch: FetchManifest
    blob: FetchBlob
    open_blob: Callable[[str], AbstractContextManager[IO[bytes]]]
    blob_file: Callable[[str], Path | None]
    origin: tuple[str, str] | None = None


@contextlib.contextmanager
def open_image(
    dest: Target,
    *,
    tls_verify: bool = True,
    creds: CredentialsLookup | None = None,
    plain_http_hint: str | None = None,
) -> Iterator[ImageReader]:
    """An ``ImageReader`` for ``dest`` (not docker-archive:, which has no manifests),
    open for the ``with`` block: a registry client or an archive stays open."""
    target = str(dest)
    if isinstance(dest, DockerArchiveTarget):
        raise InspectError(
            f"{target}: a docker archive holds no manifests to read an image from",
            hint="convert it: skopeo copy docker-archive:FILE oci:DIR:TAG",
        )
    if isinstance(dest, RegistryTarget):
        with _registry_reader(dest, tls_verify, creds, plain_http_hint) as reader:
            yield reader
        return
    archive = isinstance(dest, OciArchiveTarget)
    location = Path(dest.file if isinstance(dest, OciArchiveTarget) else dest.directory)
    with LayoutReader(location, archive=archive) as layout:
        yield _layout_reader(target, layout, dest.tag)


def _layout_reader(target: str, layout: LayoutReader, tag: str | None) -> ImageReader:
    index = layout.json("index.json")
    manifests = index.get("manifests", []) if isinstance(index, dict) else None
    if not isinstance(manifests, list):
        raise InspectError(f"{target} is not a valid OCI layout (index.json lists no manifests)")
    manifests = [m for m in manifests if isinstance(m, dict)]
    if tag:
        manifests = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) == tag]
    else:  # referrers (an attached SBOM) are listed untagged, and are no image
        manifests = [m for m in manifests if not m.get("artifactType")]
    if not manifests:
        raise InspectError(f"no image{' tagged ' + tag if tag else ''} in {target}")
    desc = manifests[0]
    if not isinstance(desc.get("digest"), str):
        raise InspectError(f"{target} is not a valid OCI layout (an index entry has no digest)")

    def fetch(digest: str) -> tuple[bytes, str]:
        media_type = desc.get("mediaType", "") if digest == desc.get("digest") else ""
        return layout.read(blob_name(digest)), str(media_type)

    def blob(digest: str, size: int) -> bytes:
        if size > SMALL_LIMIT:
            raise InspectError(f"{target}: blob {digest} is {size} bytes")
        data = layout.read(blob_name(digest))
        if len(data) != size or sha256_digest(data) != digest:
            raise InspectError(f"{target}: blob {digest} does not match its digest or size")
        return data

    return ImageReader(
        target,
        str(desc.get("digest")),
        fetch,
        blob,
        lambda digest: layout.open(blob_name(digest)),
        lambda digest: layout.file(blob_name(digest)),
    )


@contextlib.contextmanager
def _registry_reader(
    dest: RegistryTarget,
    tls_verify: bool,
    creds: CredentialsLookup | None,
    plain_http_hint: str | None,
) -> Iterator[ImageReader]:
    target = str(dest)
    lookup = creds or CredentialsLookup()
    client = RegistryClient(
        dest.api_host,
        tls_verify=tls_verify,
        creds=lookup.for_registry(dest.registry, dest.repository),
        plain_http_hint=plain_http_hint,
    )
    repo = dest.repository
    try:
        client.ping()
        client.authorize([f"repository:{repo}:pull"])

        def fetch(reference: str) -> tuple[bytes, str]:
            url = client.url(f"/v2/{repo}/manifests/{reference}")
            resp = client.request("GET", url, ok={200}, headers={"Accept": ACCEPT})
            return resp.body, (resp.header("Content-Type") or "").split(";")[0]

        def open_blob(digest: str) -> AbstractContextManager[IO[bytes]]:
            parse_digest(digest)  # it goes into a URL
            stream = client.open_stream(client.url(f"/v2/{repo}/blobs/{digest}"))
            return cast(AbstractContextManager[IO[bytes]], stream)

        def blob(digest: str, size: int) -> bytes:
            if size > SMALL_LIMIT:
                raise InspectError(f"{target}: config blob {digest} is {size} bytes")
            with open_blob(digest) as f:
                data = f.read(size + 1)
            if len(data) != size or sha256_digest(data) != digest:
                raise InspectError(f"{target}: blob {digest} does not match its digest or size")
            return data

        yield ImageReader(
            target,
            dest.digest or dest.tag or "latest",
            fetch,
            blob,
            open_blob,
            lambda digest: None,
            origin=(dest.api_host, repo),
        )
    finally:
        client.close()


# ------------------------------------------------------------------ docker archives


def _from_docker_archive(target: str, dest: DockerArchiveTarget) -> dict[str, Any]:
    try:
        tar = tarfile.open(dest.file)
    except (OSError, tarfile.TarError) as e:
        raise InspectError(f"cannot read docker archive {dest.file}: {e}") from None
    with tar:

        def member(name: str) -> IO[bytes]:
            try:
                f = tar.extractfile(name)
            except KeyError:
                f = None
            if f is None:
                raise InspectError(f"{target}: the archive has no {name}")
            return f

        try:
            entries = json.loads(member("manifest.json").read(SMALL_LIMIT))
        except ValueError as e:
            raise InspectError(f"{target}: manifest.json is not JSON ({e})") from None
        entry = _archive_entry(target, entries, dest.reference)
        config_bytes = member(entry["Config"]).read(SMALL_LIMIT)
        config = _json_blob(target, config_bytes)
        history = [h for h in config.get("history", []) if not h.get("empty_layer")]
        layers = []
        for i, name in enumerate(entry["Layers"]):
            info = tar.getmember(name)
            digest, media_type = _archive_layer(name, member(name))
            comment = str(history[i].get("comment", "")) if i < len(history) else ""
            paths = None
            if comment.startswith(HISTORY_PREFIX):
                key = f"history[{i}].comment"
                try:  # the same checks as for annotations, naming the comment
                    paths = decode_paths({f"{PATHS_PREFIX}0": comment[len(HISTORY_PREFIX) :]})
                except PathsAnnotationError as e:
                    why = e.message.split(": ", 1)[-1]
                    raise InspectError(f"{target}: layer {i}: {key!r}: {why}") from None
            layers.append(_layer_row(digest, info.size, media_type, paths))
    return {
        "target": target,
        "index": False,
        "media_type": "docker-archive",
        "manifest_digest": None,  # docker save keeps no manifest
        "config_digest": sha256_digest(config_bytes),
        "repo_tags": list(entry.get("RepoTags") or []),
        "config": _config_view(config),
        "layers": layers,
    }


def _archive_entry(target: str, entries: object, reference: str | None) -> dict[str, Any]:
    if not isinstance(entries, list) or not entries:
        raise InspectError(f"{target}: manifest.json lists no image")
    if reference is None:
        if len(entries) > 1:
            tags = [t for e in entries for t in e.get("RepoTags") or []]
            raise InspectError(
                f"{target}: the archive holds {len(entries)} images",
                hint="name one: docker-archive:FILE:NAME:TAG (" + ", ".join(tags) + ")",
            )
        return dict(entries[0])
    for e in entries:
        if _familiar(reference) in [_familiar(t) for t in e.get("RepoTags") or []]:
            return dict(e)
    tags = [t for e in entries for t in e.get("RepoTags") or []]
    raise InspectError(
        f"{target}: no image tagged {reference}", hint="it has: " + (", ".join(tags) or "no tags")
    )


def _familiar(reference: str) -> str:
    """A Docker Hub reference as people write it (``docker.io/library/x:1`` → ``x:1``):
    skopeo writes RepoTags in full, docker and stowaway as given."""
    for prefix in ("docker.io/", "library/"):
        reference = reference.removeprefix(prefix)
    return reference


def _archive_layer(name: str, f: Any) -> tuple[str, str]:
    """(digest, media type) of a layer file: the digest its blobs/sha256/ name says (or
    its hash), the media type by its first bytes."""
    head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        media_type = MediaType.DOCKER_LAYER_GZIP.value
    elif head == b"\x28\xb5\x2f\xfd":
        media_type = MediaType.OCI_LAYER_ZSTD.value
    else:
        media_type = "application/vnd.docker.image.rootfs.diff.tar"
    prefix = "blobs/sha256/"
    if name.startswith(prefix):
        parse_digest("sha256:" + name[len(prefix) :])
        return "sha256:" + name[len(prefix) :], media_type
    sha = hashlib.sha256(head)
    while chunk := f.read(1 << 20):
        sha.update(chunk)
    return "sha256:" + sha.hexdigest(), media_type


def image_store_paths(
    target: str, *, tls_verify: bool = True, creds: CredentialsLookup | None = None
) -> tuple[list[str], int]:
    """The store paths the image at ``target`` holds (from its layers' annotations)
    and its creation time (epoch seconds): what ``stowaway sbom`` describes."""
    summary = read_image_summary(target, tls_verify=tls_verify, creds=creds)
    if summary["index"]:
        raise InspectError(
            f"{target} is an image index", hint="name one platform's image by its digest"
        )
    paths = sorted({p for layer in summary["layers"] for p in layer["store_paths"]})
    if not paths:
        raise InspectError(
            f"{target}: no layer says which store paths it holds",
            hint="only images stowaway built carry the store-path annotations",
        )
    created = summary["config"]["created"]
    try:
        when = datetime.fromisoformat(str(created).replace("Z", "+00:00")) if created else None
    except ValueError:
        raise InspectError(f"{target}: the config's created {created!r} is not RFC 3339") from None
    return paths, int(when.timestamp()) if when else 1
