"""Request validation for the distribution API, done on the *raw* request path.

Every name, tag and digest is checked here before any storage access, so a
rejected request can never touch (or create) a file. Names are matched against
the distribution spec's grammar, which by construction has no ``.``/``..``
components, no empty components and no characters a filesystem or S3 key
treats specially; percent-encoding is refused outright because no valid name,
tag or digest needs it (this is what stops ``..%2f`` and ``%2e%2e`` tricks).

Headers are parsed here too (Range, Content-Range, Accept), and so is a pushed
manifest's body (``check_manifest``): its shape, checked before storage is asked
whether what it references is there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from stowaway.distribution.errors import ErrorCode, RegistryApiError
from stowaway.image.digest import sha256_digest
from stowaway.registry.resolver import MANIFEST_TYPES

NAME_RE = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")
#: any algorithm:encoded pair the OCI spec allows; we only *support* sha256.
DIGEST_GRAMMAR_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
#: the algorithms the OCI image spec registers; only sha256 is supported
REGISTERED_ALGORITHMS = frozenset({"sha256", "sha512", "blake3"})
MAX_NAME = 255
IMAGE_MANIFESTS = ("application/vnd.oci.image.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json")  # fmt: skip

RouteKind = Literal["manifest", "blob", "upload_start", "upload", "tags", "referrers"]

_ROUTES: tuple[tuple[RouteKind, re.Pattern[str]], ...] = (
    ("tags", re.compile(r"/v2/(?P<name>.+)/tags/list")),
    ("referrers", re.compile(r"/v2/(?P<name>.+)/referrers/(?P<ref>[^/]+)")),
    ("upload_start", re.compile(r"/v2/(?P<name>.+)/blobs/uploads/?")),
    ("upload", re.compile(r"/v2/(?P<name>.+)/blobs/uploads/(?P<ref>[^/]+)")),
    ("blob", re.compile(r"/v2/(?P<name>.+)/blobs/(?P<ref>[^/]+)")),
    ("manifest", re.compile(r"/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)")),
)


@dataclass(frozen=True)
class Route:
    """A parsed and validated ``/v2/<name>/...`` request target."""

    kind: RouteKind
    name: str
    #: tag or digest (manifests), digest (blobs, referrers' subject), uuid (uploads)
    reference: str = ""


def _name_invalid(message: str) -> RegistryApiError:
    return RegistryApiError.of(ErrorCode.NAME_INVALID, message)


def check_raw_path(raw_path: str) -> str:
    """Return the path part of a raw request target, refusing any encoding
    trick: percent escapes, NUL, backslashes, empty or dot segments."""
    path = raw_path.split("?", 1)[0]
    if "%" in path:
        raise _name_invalid(f"percent-encoded characters are not allowed in {path!r}")
    if "\x00" in path or "\\" in path:
        raise _name_invalid(f"NUL or backslash in request path {path!r}")
    segments = path.split("/")[1:]
    if segments and segments[-1] == "":
        segments = segments[:-1]  # one trailing slash is fine (/v2/, uploads/)
    for seg in segments:
        if seg in ("", ".", ".."):
            raise _name_invalid(f"empty or dot segment in request path {path!r}")
    return path


def check_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise _name_invalid(f"repository name is {len(name)} characters, at most {MAX_NAME}")
    if not NAME_RE.fullmatch(name):
        raise _name_invalid(f"invalid repository name {name!r}")
    return name


def check_digest(digest: str) -> str:
    """A ``sha256:<64 lowercase hex>`` digest. Anything else is DIGEST_INVALID (400),
    also a well-formed digest of another algorithm: refused where it is first seen
    (upload start, mount, finish), before any data is read."""
    if SHA256_RE.fullmatch(digest):
        return digest
    if DIGEST_GRAMMAR_RE.fullmatch(digest) and not digest.startswith("sha256:"):
        raise RegistryApiError.of(
            ErrorCode.DIGEST_INVALID,
            f"digest algorithm of {digest!r} is not supported (sha256 only)",
        )
    raise RegistryApiError.of(ErrorCode.DIGEST_INVALID, f"malformed digest {digest!r}")


def is_digest(reference: str) -> bool:
    return ":" in reference


def check_reference(reference: str) -> str:
    """A manifest reference: a digest of a registered algorithm, or else a tag
    (so ``a:b`` is an invalid tag, MANIFEST_INVALID, not an unknown algorithm)."""
    if reference.split(":", 1)[0] in REGISTERED_ALGORITHMS:
        return check_digest(reference)
    if not TAG_RE.fullmatch(reference):
        raise RegistryApiError.of(ErrorCode.MANIFEST_INVALID, f"invalid tag {reference!r}")
    return reference


def check_upload_id(upload_id: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
        raise RegistryApiError.of(ErrorCode.BLOB_UPLOAD_UNKNOWN, f"unknown upload id {upload_id!r}")
    return upload_id


def parse_route(raw_path: str) -> Route | None:
    """Parse ``/v2/<name>/...``; ``None`` for ``/v2/`` itself. Raises NAME_INVALID &
    co. for anything malformed, and NAME_INVALID for a path matching no route."""
    path = check_raw_path(raw_path)
    if path in ("/v2", "/v2/"):
        return None
    for kind, pattern in _ROUTES:
        m = pattern.fullmatch(path)
        if m is None:
            continue
        name = check_name(m["name"])
        ref = m.groupdict().get("ref") or ""
        if kind == "manifest":
            ref = check_reference(ref)
        elif kind in ("blob", "referrers"):
            ref = check_digest(ref)
        elif kind == "upload":
            ref = check_upload_id(ref)
        return Route(kind, name, ref)
    raise _name_invalid(f"no distribution API endpoint at {path!r}")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse a single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` Range header
    against a blob of ``size`` bytes; return inclusive (start, end) or raise
    RANGE_INVALID. Multi-range requests are refused (no registry client sends them)."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if m is None or (m[1] == "" and m[2] == ""):
        raise RegistryApiError.of(ErrorCode.RANGE_INVALID, f"unsupported Range {header!r}")
    if m[1] == "":
        length = int(m[2])
        if length == 0 or size == 0:
            raise RegistryApiError.of(ErrorCode.RANGE_INVALID, f"empty Range {header!r}")
        return max(0, size - length), size - 1
    start = int(m[1])
    end = int(m[2]) if m[2] else size - 1
    if start >= size or end < start:
        raise RegistryApiError.of(
            ErrorCode.RANGE_INVALID, f"Range {header!r} outside blob of {size} bytes"
        )
    return start, min(end, size - 1)


def parse_content_range(header: str) -> tuple[int, int]:
    """Parse an upload chunk's ``Content-Range: <start>-<end>`` (inclusive; the
    distribution API omits the ``bytes`` unit, but we accept it)."""
    m = re.fullmatch(r"\s*(?:bytes[ =])?\s*(\d+)-(\d+)(?:/\S+)?\s*", header)
    if m is None or int(m[2]) < int(m[1]):
        raise RegistryApiError.of(ErrorCode.RANGE_INVALID, f"malformed Content-Range {header!r}")
    return int(m[1]), int(m[2])


def parse_accept(values: list[str]) -> frozenset[str]:
    """The manifest media types a client accepts; empty means any (no Accept,
    ``*/*``, or no manifest type named at all)."""
    types = {v.split(";", 1)[0].strip() for value in values for v in value.split(",")}
    if "*/*" in types:
        return frozenset()
    return frozenset(types & MANIFEST_TYPES)


@dataclass(frozen=True)
class CheckedManifest:
    """A manifest body that passed ``check_manifest``, and what it references."""

    body: bytes
    digest: str
    media_type: str
    doc: dict[str, Any]
    #: (digest, size) of the config and the layers (image manifests)
    blobs: tuple[tuple[str, int], ...] = ()
    #: digests of the manifests an index lists
    manifests: tuple[str, ...] = ()

    @property
    def subject(self) -> str | None:
        """The digest of the manifest this one refers to (OCI 1.1 referrers)."""
        subject = self.doc.get("subject")
        return str(subject["digest"]) if subject is not None else None

    def referrer_descriptor(self) -> bytes:
        """What the referrers API lists for this manifest: its descriptor, with the
        ``artifactType`` (the manifest's, else its config's media type) and annotations."""
        doc = self.doc
        config = doc.get("config")
        artifact_type = doc.get("artifactType") or (
            config.get("mediaType") if isinstance(config, dict) else None
        )
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.body),
        }
        if artifact_type:
            out["artifactType"] = artifact_type
        if doc.get("annotations"):
            out["annotations"] = doc["annotations"]
        return json.dumps(out, sort_keys=True).encode()


def _manifest_invalid(message: str) -> RegistryApiError:
    return RegistryApiError.of(ErrorCode.MANIFEST_INVALID, message)


def _descriptor(d: Any, where: str) -> tuple[str, int]:
    """A descriptor's digest and size."""
    if not isinstance(d, dict):
        raise _manifest_invalid(f"{where} is not a descriptor object")
    digest, size = d.get("digest"), d.get("size")
    if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
        raise _manifest_invalid(f"{where} needs a digest string and a size")
    try:
        check_digest(digest)
    except RegistryApiError as err:
        raise _manifest_invalid(f"{where}: {err.message}") from None
    return digest, size


def check_manifest(body: bytes, content_type: str) -> CheckedManifest:
    """Check a pushed manifest's JSON shape, media type (``content_type`` is the
    request header, "" when absent), descriptors and the referrers fields
    (``subject``, ``artifactType``, ``annotations``); MANIFEST_INVALID otherwise.
    Whether what it references exists is the caller's to check."""
    invalid = _manifest_invalid
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise invalid(f"manifest is not JSON: {err}") from None
    except RecursionError:  # deeply nested arrays/objects: not a manifest either
        raise invalid("manifest is not JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise invalid("manifest is not a JSON object")
    declared = doc.get("mediaType")
    media_type = content_type or declared  # the header wins; the field when it is absent
    if media_type not in MANIFEST_TYPES:
        raise invalid(f"unsupported manifest media type {content_type or declared!r}")
    if declared is not None and declared != media_type:
        raise invalid(f"Content-Type {media_type} but mediaType field {declared!r}")
    if doc.get("schemaVersion") != 2:
        raise invalid("schemaVersion must be 2")
    blobs: list[tuple[str, int]] = []
    children: list[str] = []
    if media_type in IMAGE_MANIFESTS:
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise invalid("manifest has no layers list")
        blobs.append(_descriptor(doc.get("config"), "config"))
        blobs += [_descriptor(d, f"layers[{i}]") for i, d in enumerate(layers)]
    else:
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise invalid("index has no manifests list")
        children += [_descriptor(d, f"manifests[{i}]")[0] for i, d in enumerate(manifests)]
    if "subject" in doc:
        _descriptor(doc["subject"], "subject")
    if not isinstance(doc.get("artifactType", ""), str):
        raise invalid("artifactType must be a string")
    annotations = doc.get("annotations", {})
    if not isinstance(annotations, dict) or not all(
        isinstance(v, str) for v in annotations.values()
    ):
        raise invalid("annotations must map strings to strings")
    digest = sha256_digest(body)
    return CheckedManifest(body, digest, str(media_type), doc, tuple(blobs), tuple(children))
