"""Artifacts attached to an image: an SBOM as an OCI 1.1 referrer, and a cosign
signature. Pure: bytes and descriptors in, blobs and manifests out.

An SBOM referrer is an OCI image manifest with ``artifactType`` (the SBOM's media
type), the empty config (``application/vnd.oci.empty.v1+json``, ``{}``), the document
as its one layer and ``subject`` = the image manifest's descriptor; registries list it
under ``/v2/<repo>/referrers/<digest>`` (or, without that API, clients keep the
referrers tag ``sha256-<hex>`` holding an index of such descriptors).

A cosign signature, as cosign 2.x writes it (and ``cosign verify --key`` reads it):
the simple-signing payload ``{"critical":{"identity":{"docker-reference":REPO},
"image":{"docker-manifest-digest":DIGEST},"type":"cosign container image signature"},
"optional":null}`` as a layer of media type
``application/vnd.dev.cosign.simplesigning.v1+json``, its ECDSA P-256 / SHA-256
signature (DER, base64) in the layer annotation ``dev.cosignproject.cosign/signature``,
in an OCI manifest tagged ``sha256-<hex>.sig``; every signature of the image is one
layer of that manifest.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from stowaway.errors import StowawayError
from stowaway.image.config import canonical_json
from stowaway.image.digest import parse_digest, sha256_digest
from stowaway.image.model import Blob, Descriptor, Image, Layer, MediaType

__all__ = [
    "EMPTY_MEDIA_TYPE",
    "SIGNATURE_ANNOTATION",
    "SIMPLESIGNING_MEDIA_TYPE",
    "ArtifactError",
    "SignatureLayer",
    "referrer_descriptor",
    "referrers_tag",
    "sbom_artifact",
    "signature_image",
    "signature_tag",
    "signed_by",
    "sign_layer",
    "simple_signing_payload",
]

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_DATA = b"{}"
SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
CREATED = "org.opencontainers.image.created"
TITLE = "org.opencontainers.image.title"


class ArtifactError(StowawayError):
    """An existing signature manifest or referrers index that cannot be extended."""


def _blob(data: bytes, media_type: str) -> Blob:
    return Blob(sha256_digest(data), len(data), media_type, data=data)


def _layer(blob: Blob, annotations: Mapping[str, str]) -> Layer:
    return Layer(
        blob.digest, blob.size, blob.media_type, data=blob.data,
        diff_id=blob.digest, annotations=dict(annotations),
    )  # fmt: skip


def sbom_artifact(
    document: bytes, media_type: str, subject: Descriptor, *, created: int, filename: str
) -> Image:
    """The referrer manifest attaching ``document`` (an SBOM of ``media_type``) to the
    manifest ``subject``; deterministic (``created`` is epoch seconds)."""
    config = _blob(EMPTY_DATA, EMPTY_MEDIA_TYPE)
    layer = _layer(_blob(document, media_type), {TITLE: filename})
    when = datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = {
        "schemaVersion": 2,
        "mediaType": MediaType.OCI_MANIFEST.value,
        "artifactType": media_type,
        "config": config.descriptor().to_json(),
        "layers": [layer.descriptor(layer.annotations).to_json()],
        "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_json(),
        "annotations": {CREATED: when},
    }
    manifest = _blob(canonical_json(doc), MediaType.OCI_MANIFEST.value)
    return Image(layers=[layer], config=config, manifest=manifest)


def referrer_descriptor(artifact: Image) -> dict[str, Any]:
    """The artifact's entry in a referrers list: its descriptor with ``artifactType``
    and the manifest's annotations (what the referrers API answers)."""
    doc = json.loads(artifact.manifest.data or b"{}")
    entry: dict[str, Any] = {
        "mediaType": artifact.manifest.media_type,
        "digest": artifact.manifest.digest,
        "size": artifact.manifest.size,
        "artifactType": doc.get("artifactType", ""),
    }
    if doc.get("annotations"):
        entry["annotations"] = doc["annotations"]
    return entry


def referrers_tag(digest: str) -> str:
    """The OCI 1.1 referrers tag schema's tag for ``digest``: ``<alg>-<hex>``."""
    algorithm, hex_ = parse_digest(digest)
    return f"{algorithm}-{hex_}"


def signature_tag(digest: str) -> str:
    """cosign's tag for the signatures of ``digest``: ``sha256-<hex>.sig``."""
    return referrers_tag(digest) + ".sig"


def simple_signing_payload(docker_reference: str, manifest_digest: str) -> bytes:
    """The payload cosign signs for an image (key order and spacing as cosign's)."""
    parse_digest(manifest_digest)
    doc = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": SIGNATURE_TYPE,
        },
        "optional": None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SignatureLayer:
    """One signature: the payload bytes and its layer annotations, the base64 DER
    signature among them (a keyless signature's certificate and bundle too, kept as
    found when another signature is added)."""

    payload: bytes
    annotations: Mapping[str, str]

    @property
    def signature(self) -> str:
        return self.annotations.get(SIGNATURE_ANNOTATION, "")


def sign_layer(key: ec.EllipticCurvePrivateKey, payload: bytes) -> SignatureLayer:
    """ECDSA P-256 over SHA-256 of ``payload`` (ASN.1 DER, base64), as cosign signs."""
    der = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    return SignatureLayer(payload, {SIGNATURE_ANNOTATION: base64.b64encode(der).decode()})


def signed_by(layer: SignatureLayer, key: ec.EllipticCurvePublicKey) -> bool:
    """Whether ``layer``'s signature is ``key``'s over its payload (a malformed one is not)."""
    try:
        key.verify(base64.b64decode(layer.signature, validate=True), layer.payload,
                   ec.ECDSA(hashes.SHA256()))  # fmt: skip
    except (InvalidSignature, ValueError):
        return False
    return True


def signature_image(layers: Sequence[SignatureLayer]) -> Image:
    """The ``.sig`` manifest holding ``layers`` (duplicates dropped, order kept), with
    a config like cosign's (its diff_ids are the payload digests)."""
    seen: dict[tuple[str, str], Layer] = {}
    for s in layers:
        blob = _blob(s.payload, SIMPLESIGNING_MEDIA_TYPE)
        seen.setdefault((blob.digest, s.signature), _layer(blob, s.annotations))
    image_layers = list(seen.values())
    config_doc = {
        "architecture": "",
        "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"} for _ in image_layers],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": [x.digest for x in image_layers]},
    }
    config = _blob(canonical_json(config_doc), MediaType.OCI_CONFIG.value)
    doc = {
        "schemaVersion": 2,
        "mediaType": MediaType.OCI_MANIFEST.value,
        "config": config.descriptor().to_json(),
        "layers": [x.descriptor(x.annotations).to_json() for x in image_layers],
    }
    manifest = _blob(canonical_json(doc), MediaType.OCI_MANIFEST.value)
    return Image(layers=image_layers, config=config, manifest=manifest)
