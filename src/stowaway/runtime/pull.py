"""``stowaway pull``: pull an image into containerd the way CRI's PullImage does.

Why: ``ctr pull`` in containerd 1.6 downloads every blob before unpacking and passes no
layer annotations to the snapshotter, so the stowaway snapshotter can never skip a
layer through it. This pull fetches the manifest and config, then unpacks layer by
layer with the layer's ``containerd.io/snapshot/*`` annotations and the chain-ID ref
(``unpack_layers``): a layer the snapshotter commits from the Nix store is never
downloaded; every other layer is streamed from the registry into containerd's content
store (digest checked on the way) and applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from stowaway.distribution.client import RegistryClient
from stowaway.distribution.credentials import CredentialsLookup, CredsSource
from stowaway.errors import StowawayError
from stowaway.image.config import default_architecture
from stowaway.image.digest import sha256_digest
from stowaway.image.model import Blob, Descriptor, Layer, MediaType
from stowaway.runtime.containerd_client import ContainerdClient
from stowaway.runtime.unpack import unpack_layers
from stowaway.sinks.targets import RegistryTarget, parse_target

__all__ = ["PullError", "PullResult", "pull_image"]

ACCEPT = ", ".join(
    [MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST, MediaType.OCI_INDEX, MediaType.DOCKER_LIST]
)


class PullError(StowawayError):
    """A manifest or config that cannot be pulled as an image; names the URL or digest."""


@dataclass
class PullResult:
    """What a pull did: the image name created and which layer blobs were downloaded."""

    name: str
    manifest_digest: str
    config_digest: str
    top_chain_id: str
    layers: list[str] = field(default_factory=list)
    downloaded_layers: list[str] = field(default_factory=list)
    bytes_downloaded: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "manifest_digest": self.manifest_digest,
            "config_digest": self.config_digest,
            "top_chain_id": self.top_chain_id,
            "layers": self.layers,
            "downloaded_layers": self.downloaded_layers,
            "bytes_downloaded": self.bytes_downloaded,
        }


class _Source:
    """Manifests and blobs of one repository; blobs streamed, following redirects."""

    def __init__(self, target: RegistryTarget, plain_http: bool, creds: CredsSource) -> None:
        self.repo = target.repository
        self.reg = RegistryClient(
            target.api_host,
            tls_verify=not plain_http,
            creds=creds,
            plain_http_hint="for a plain-HTTP registry pass --plain-http",
        )
        self.reg.ping()
        self.reg.authorize([f"repository:{self.repo}:pull"])

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index."""
        url = self.reg.url(f"/v2/{self.repo}/manifests/{reference}")
        resp = self.reg.request("GET", url, ok={200}, headers={"Accept": ACCEPT})
        digest = sha256_digest(resp.body)
        if reference.startswith("sha256:") and digest != reference:
            raise PullError(f"{url}: manifest body has digest {digest}, not {reference}")
        media_type = resp.header("Content-Type") or ""
        try:
            doc = json.loads(resp.body)
        except ValueError as e:
            raise PullError(f"{url}: manifest is not JSON ({e})") from None
        return resp.body, str(doc.get("mediaType") or media_type).split(";")[0], digest

    def open_blob(self, digest: str) -> BinaryIO:
        """A response streaming the blob (the registry client's auth, TLS, retry and
        redirect rules: credentials only go to the registry itself)."""
        url = self.reg.url(f"/v2/{self.repo}/blobs/{digest}")
        return cast(BinaryIO, self.reg.open_stream(url))

    def small_blob(self, desc: Descriptor) -> bytes:
        with self.open_blob(desc.digest) as f:
            data = f.read(desc.size + 1)
        if len(data) != desc.size or sha256_digest(data) != desc.digest:
            raise PullError(f"blob {desc.digest} of {self.repo}: wrong size or digest")
        return data

    def close(self) -> None:
        self.reg.close()


def _platform_manifest(index: dict[str, Any], where: str) -> str:
    """The digest of the linux/<this machine> manifest of an image index."""
    arch = default_architecture()
    seen = []
    for m in index.get("manifests", []):
        p = m.get("platform") or {}
        seen.append(f"{p.get('os')}/{p.get('architecture')}")
        if p.get("os") == "linux" and p.get("architecture") == arch:
            return str(m["digest"])
    raise PullError(f"{where}: no linux/{arch} image in the index (has: {', '.join(seen)})")


def _descriptor(d: Any, where: str) -> Descriptor:
    try:
        return Descriptor(str(d["mediaType"]), str(d["digest"]), int(d["size"]))
    except (KeyError, TypeError, ValueError) as e:
        raise PullError(f"{where}: bad descriptor {d!r} ({e})") from None


def pull_image(
    ref: str,
    client: ContainerdClient,
    *,
    snapshotter: str = "stowaway",
    plain_http: bool = False,
    creds: CredentialsLookup | None = None,
) -> PullResult:
    """Pull ``ref`` (``HOST/REPO[:TAG|@DIGEST]``) into ``client``'s namespace, unpacked
    with ``snapshotter``; the image record is named ``HOST/REPO:TAG`` (or ``@DIGEST``).
    ``creds`` says where credentials come from, looked up if the registry asks."""
    target = parse_target("docker://" + ref)
    assert isinstance(target, RegistryTarget)
    reference = target.digest or target.tag or "latest"
    sep = "@" if target.digest else ":"
    name = f"{target.registry}/{target.repository}{sep}{reference}"
    lookup = creds or CredentialsLookup()
    src = _Source(target, plain_http, lookup.for_registry(target.registry, target.repository))
    try:
        body, media_type, digest = src.manifest(reference)
        downloaded = len(body)
        if media_type in (MediaType.OCI_INDEX, MediaType.DOCKER_LIST):
            body, media_type, digest = src.manifest(_platform_manifest(json.loads(body), name))
            downloaded += len(body)
        if media_type not in (MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST):
            raise PullError(f"{name}: unsupported manifest media type {media_type!r}")
        doc = json.loads(body)
        config_desc = _descriptor(doc.get("config"), f"{name} config")
        config = src.small_blob(config_desc)
        downloaded += len(config)
        diff_ids = json.loads(config).get("rootfs", {}).get("diff_ids", [])
        layer_docs = doc.get("layers", [])
        if len(diff_ids) != len(layer_docs):
            raise PullError(
                f"{name}: config lists {len(diff_ids)} diff IDs for {len(layer_docs)} layers"
            )
        layers = []
        for ld, diff_id in zip(layer_docs, diff_ids, strict=True):
            d = _descriptor(ld, f"{name} layer")
            layers.append(
                Layer(
                    d.digest,
                    d.size,
                    d.media_type,
                    diff_id=str(diff_id),
                    annotations=dict(ld.get("annotations") or {}),
                )
            )

        fetched: list[str] = []

        def fetch(layer: Layer) -> None:
            labels = {"containerd.io/uncompressed": layer.diff_id}
            if client.put_blob(layer, labels, lambda: src.open_blob(layer.digest)):
                fetched.append(layer.digest)

        gc = {"containerd.io/gc.ref.content.config": config_desc.digest}
        gc.update({f"containerd.io/gc.ref.content.l.{i}": ly.digest for i, ly in enumerate(layers)})
        with client.lease():
            client.put_blob(
                Blob(config_desc.digest, len(config), config_desc.media_type, data=config)
            )
            client.put_blob(Blob(digest, len(body), media_type, data=body), gc)
            top, _ = unpack_layers(client, snapshotter, layers, fetch)
            client.set_content_labels(
                config_desc.digest, {f"containerd.io/gc.ref.snapshot.{snapshotter}": top}
            )
            client.put_image(name, Descriptor(media_type, digest, len(body)), {})
    finally:
        src.close()
    return PullResult(
        name=name,
        manifest_digest=digest,
        config_digest=config_desc.digest,
        top_chain_id=top,
        layers=[ly.digest for ly in layers],
        downloaded_layers=fetched,
        bytes_downloaded=downloaded
        + sum({ly.digest: ly.size for ly in layers if ly.digest in fetched}.values()),
    )
