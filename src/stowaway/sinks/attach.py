"""Attach an SBOM or a cosign signature to an image already written to a target.

SBOMs: on ``docker://`` the referrer manifest is pushed by digest; a registry with
the OCI 1.1 referrers API (``stowaway serve``) lists it from its ``subject`` at once,
one without it (distribution 2.8) gets the referrers tag schema the distribution spec
asks clients to keep: the tag ``sha256-<hex>`` holding an image index of referrer
descriptors, read, extended and written back. In an ``oci:`` layout the blob and
manifest are added and the manifest is listed, untagged, in ``index.json`` (``oras
discover --oci-layout`` finds it through its subject). An archive cannot hold
anything beside its image without changing it, so the SBOM goes to a file next to it:
``FILE.spdx.json`` / ``FILE.cdx.json``.

Signatures: ``docker://`` only, where cosign looks (the ``sha256-<hex>.sig`` tag);
signatures already there are kept, so signing twice with two keys leaves both.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from stowaway.distribution.client import RegistryClient
from stowaway.distribution.credentials import CredentialsLookup
from stowaway.errors import StowawayError
from stowaway.fsutil import atomic_write
from stowaway.image.artifacts import (
    SIMPLESIGNING_MEDIA_TYPE,
    SignatureLayer,
    referrer_descriptor,
    referrers_tag,
    sbom_artifact,
    sign_layer,
    signature_image,
    signature_tag,
    signed_by,
    simple_signing_payload,
)
from stowaway.image.config import canonical_json
from stowaway.image.digest import sha256_digest
from stowaway.image.model import Blob, Descriptor, Image, MediaType
from stowaway.image.sbom import SPDX_MEDIA_TYPE, SbomFormat, media_type, sbom_document, top_paths
from stowaway.sinks.oci_layout import _locked, put_blob, read_index, update_index
from stowaway.sinks.targets import (
    DockerArchiveTarget,
    OciArchiveTarget,
    OciTarget,
    RegistryTarget,
    Target,
)
from stowaway.store.model import PathInfo

__all__ = [
    "AttachError",
    "attach_sbom",
    "attach_to_image",
    "docker_reference",
    "resolve_digest",
    "sign_image",
]

#: Largest signature payload or referrers index read back from a registry.
SMALL_LIMIT = 4 << 20
#: Most signatures kept in one ``.sig`` manifest (each is fetched and checked).
MAX_SIGNATURES = 256
HUB_REFERENCE = "index.docker.io"
ACCEPT = ", ".join(
    [MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST, MediaType.OCI_INDEX, MediaType.DOCKER_LIST]
)


class AttachError(StowawayError):
    """An SBOM or signature that cannot be attached where asked."""


def _sbom_filename(fmt_media_type: str) -> str:
    return "sbom.spdx.json" if fmt_media_type == SPDX_MEDIA_TYPE else "sbom.cdx.json"


def attach_sbom(
    target: Target,
    subject: Descriptor,
    document: bytes,
    media_type: str,
    *,
    created: int,
    tls_verify: bool = True,
    creds: CredentialsLookup | None = None,
    plain_http_hint: str | None = None,
) -> dict[str, Any]:
    """Attach ``document`` to the image manifest ``subject`` at ``target``; says where
    it went (``mode``: referrers-api, referrers-tag, oci-layout or file)."""
    filename = _sbom_filename(media_type)
    if isinstance(target, OciArchiveTarget | DockerArchiveTarget):
        beside = Path(target.file + "." + filename.removeprefix("sbom."))
        atomic_write(beside, document)
        return {"mode": "file", "path": str(beside), "digest": sha256_digest(document)}
    artifact = sbom_artifact(document, media_type, subject, created=created, filename=filename)
    if isinstance(target, OciTarget):
        _write_to_layout(Path(target.directory), artifact)
        return {"mode": "oci-layout", "manifest_digest": artifact.manifest.digest}
    with _session(target, tls_verify, creds, plain_http_hint) as client:
        _push(client, target, artifact, None)
        mode = _record_referrer(client, target.repository, subject.digest, artifact)
    return {"mode": mode, "manifest_digest": artifact.manifest.digest}


def sign_image(
    target: RegistryTarget,
    key: ec.EllipticCurvePrivateKey,
    *,
    digest: str | None = None,
    tls_verify: bool = True,
    creds: CredentialsLookup | None = None,
    plain_http_hint: str | None = None,
) -> dict[str, Any]:
    """Sign the image at ``target`` (its manifest ``digest``, else what the target's
    tag names now) as cosign does; returns the signed digest and the signature tag."""
    with _session(target, tls_verify, creds, plain_http_hint) as client:
        digest = digest or target.digest or resolve_digest(client, target)
        payload = simple_signing_payload(docker_reference(target), digest)
        tag = signature_tag(digest)
        existing = _existing_signatures(client, target, tag)
        # signed by this key already: nothing to add (re-runs do not grow the tag)
        already = any(s.payload == payload and signed_by(s, key.public_key()) for s in existing)
        done: dict[str, Any] = {"signed_digest": digest, "signature_tag": tag}
        if already:
            return done | {"signatures": len(existing), "already_signed": True}
        image = signature_image([*existing, sign_layer(key, payload)])
        _push(client, target, image, tag)
    return done | {
        "signatures": len(image.layers),
        "already_signed": False,
        "signature_manifest": image.manifest.digest,
    }


def docker_reference(target: RegistryTarget) -> str:
    """The repository as cosign names it in the payload (no tag, Hub as index.docker.io)."""
    registry = HUB_REFERENCE if target.registry == "docker.io" else target.registry
    return f"{registry}/{target.repository}"


def resolve_digest(client: RegistryClient, target: RegistryTarget) -> str:
    """The digest of the manifest (or index) ``target``'s tag names now."""
    url = client.url(f"/v2/{target.repository}/manifests/{target.tag or 'latest'}")
    resp = client.request("GET", url, ok={200, 404}, headers={"Accept": ACCEPT})
    if resp.status == 404:
        raise AttachError(f"{target}: no such image", hint="push it first, or check the tag")
    return sha256_digest(resp.body)


# ------------------------------------------------------------------ registries


@contextlib.contextmanager
def _session(
    target: RegistryTarget,
    tls_verify: bool,
    creds: CredentialsLookup | None,
    hint: str | None,
) -> Iterator[RegistryClient]:
    """A client of ``target``'s registry, authorized to pull and push its repository."""
    lookup = (creds or CredentialsLookup()).for_registry(target.registry, target.repository)
    client = RegistryClient(
        target.api_host, tls_verify=tls_verify, creds=lookup, plain_http_hint=hint
    )
    try:
        client.ping()
        client.authorize([f"repository:{target.repository}:pull,push"])
        yield client
    finally:
        client.close()


def _push(client: RegistryClient, target: RegistryTarget, image: Image, tag: str | None) -> None:
    """Upload the artifact's small blobs (those the registry lacks) and its manifest."""
    repo = target.repository
    for blob in [image.config, *image.layers]:
        url = client.url(f"/v2/{repo}/blobs/{blob.digest}")
        if client.request("HEAD", url, ok=(200, 404)).status == 200:
            continue
        started = client.request("POST", client.url(f"/v2/{repo}/blobs/uploads/"), ok=(202,))
        location = started.header("Location")
        if not location:
            raise AttachError(f"{client.base}: upload of {blob.digest} got no Location")
        client.request(
            "PUT",
            client.url(client.url(location), digest=blob.digest),
            ok=(201,),
            headers={"Content-Type": "application/octet-stream"},
            body=blob.data or b"",
        )
    manifest = image.manifest
    client.request(
        "PUT",
        client.url(f"/v2/{repo}/manifests/{tag or manifest.digest}"),
        ok=(201,),
        headers={"Content-Type": manifest.media_type},
        body=manifest.data or b"",
    )


def _get_json(
    client: RegistryClient, path: str, accept: str, missing: Collection[int] = (404,)
) -> tuple[int, str, Any]:
    """(status, content type, JSON) of a GET; a status in ``missing`` means none."""
    resp = client.request("GET", client.url(path), ok={200, *missing}, headers={"Accept": accept})
    if resp.status != 200:
        return resp.status, "", None
    if len(resp.body) > SMALL_LIMIT:
        raise AttachError(f"{path}: {len(resp.body)} bytes is too large")
    try:
        doc = json.loads(resp.body)
    except ValueError:
        raise AttachError(f"{client.url(path)} is not JSON") from None
    return 200, (resp.header("Content-Type") or "").split(";")[0], doc


def _record_referrer(client: RegistryClient, repo: str, subject: str, artifact: Image) -> str:
    """``referrers-api`` when the registry lists referrers itself, else keep the
    referrers tag (OCI distribution 1.1, "unavailable referrers API")."""
    status, content_type, doc = _get_json(  # registries without it: 404, some 400/405
        client, f"/v2/{repo}/referrers/{subject}", MediaType.OCI_INDEX.value, (400, 404, 405)
    )
    if status == 200 and content_type == MediaType.OCI_INDEX and isinstance(doc, dict):
        return "referrers-api"
    tag = referrers_tag(subject)
    status, _, index = _get_json(client, f"/v2/{repo}/manifests/{tag}", MediaType.OCI_INDEX.value)
    if status == 404:
        index = {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX.value, "manifests": []}
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise AttachError(
            f"{repo}:{tag} is not an image index",
            hint="the referrers tag holds something else; remove it and attach again",
        )
    entry = referrer_descriptor(artifact)
    if all(
        not isinstance(m, dict) or m.get("digest") != entry["digest"] for m in index["manifests"]
    ):
        index["manifests"].append(entry)
        body = canonical_json(index)
        client.request(
            "PUT",
            client.url(f"/v2/{repo}/manifests/{tag}"),
            ok=(201,),
            headers={"Content-Type": MediaType.OCI_INDEX.value},
            body=body,
        )
    return "referrers-tag"


def _existing_signatures(
    client: RegistryClient, target: RegistryTarget, tag: str
) -> list[SignatureLayer]:
    """The signatures already in the ``.sig`` manifest, payloads fetched and checked."""
    repo = target.repository
    accept = f"{MediaType.OCI_MANIFEST}, {MediaType.DOCKER_MANIFEST}"
    status, _, doc = _get_json(client, f"/v2/{repo}/manifests/{tag}", accept)
    if status == 404:
        return []
    where = f"{target.registry}/{repo}:{tag}"
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise AttachError(f"{where} is not a signature manifest (no layers)")
    if len(layers) >= MAX_SIGNATURES:
        raise AttachError(
            f"{where} already holds {len(layers)} signatures",
            hint="remove the tag's old signatures (cosign clean) and sign again",
        )
    found = []
    for i, layer in enumerate(layers):
        ok = isinstance(layer, dict) and layer.get("mediaType") == SIMPLESIGNING_MEDIA_TYPE
        annotations = layer.get("annotations") if ok else None
        size, digest = (layer.get("size"), layer.get("digest")) if ok else (None, None)
        if (
            not isinstance(annotations, dict)
            or not all(isinstance(v, str) for v in annotations.values())
            or not isinstance(size, int)
            or not 0 <= size <= SMALL_LIMIT
            or not isinstance(digest, str)
        ):
            raise AttachError(
                f"{where}: layer {i} is not a cosign signature",
                hint="the signature tag holds something else; remove it and sign again",
            )
        with client.open_stream(client.url(f"/v2/{repo}/blobs/{digest}")) as f:
            payload = f.read(size + 1)
        if len(payload) != size or sha256_digest(payload) != digest:
            raise AttachError(f"{where}: layer {i} ({digest}) does not match its digest")
        found.append(SignatureLayer(payload, dict(annotations)))
    return found


# ------------------------------------------------------------------ OCI layouts


def _write_to_layout(directory: Path, artifact: Image) -> None:
    if not (directory / "index.json").is_file():
        raise AttachError(f"oci:{directory} holds no image to attach an SBOM to")
    blobs_dir = directory / "blobs" / "sha256"
    for blob in [artifact.config, *artifact.layers, artifact.manifest]:
        put_blob(blob, blobs_dir)
    entry = referrer_descriptor(artifact)
    desc = Descriptor(
        artifact.manifest.media_type, artifact.manifest.digest, artifact.manifest.size
    )
    index_path = directory / "index.json"
    with _locked(directory):
        index = update_index(read_index(index_path), desc)
        for m in index["manifests"]:
            if m.get("digest") == entry["digest"]:
                m["artifactType"] = entry["artifactType"]
        atomic_write(index_path, canonical_json(index))


def attach_to_image(
    target: Target,
    manifest: Blob,
    closure: Mapping[str, PathInfo],
    *,
    name: str,
    sbom_format: SbomFormat | None,
    key: ec.EllipticCurvePrivateKey | None,
    created: int,
    tls_verify: bool = True,
    creds: CredentialsLookup | None = None,
    plain_http_hint: str | None = None,
) -> dict[str, Any]:
    """What ``build --sbom`` and ``--sign-key`` do once the image (or index) whose
    ``manifest`` this is was written: the SBOM of ``closure`` attached (``sbom``),
    the manifest signed (``signature``)."""
    done: dict[str, Any] = {}
    if sbom_format is not None:
        doc = sbom_document(
            closure, top_paths(closure), name=name, created=created, fmt=sbom_format
        )
        done["sbom"] = attach_sbom(
            target, manifest.descriptor(), doc, media_type(sbom_format),
            created=created, tls_verify=tls_verify, creds=creds, plain_http_hint=plain_http_hint,
        )  # fmt: skip
    if key is not None:
        if not isinstance(target, RegistryTarget):
            raise AttachError(f"{target} cannot hold a cosign signature")
        done["signature"] = sign_image(
            target, key, digest=manifest.digest, tls_verify=tls_verify,
            creds=creds, plain_http_hint=plain_http_hint,
        )  # fmt: skip
    return done
