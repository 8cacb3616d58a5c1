"""Software bills of materials of an image's closure: SPDX 2.3 and CycloneDX 1.5 JSON.

Pure: path infos in, document bytes out. One package (component) per store path:
its name and version split the way Nix's ``builtins.parseDrvName`` does (the version
starts after the first ``-`` not followed by a letter), its checksum the SHA-256 of its NAR
serialisation (what Nix itself records and signs; hex here), its deriver, and a
DEPENDS_ON relationship per reference. The roots are what the document describes.

Nothing comes from the clock or from chance: the creation time is the image's own
(``--created``) and the document namespace / serial number is derived from the
content, so the same closure gives the same bytes and the same digest.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from stowaway import __version__
from stowaway.errors import StowawayError
from stowaway.store import nixbase32
from stowaway.store.model import PathInfo
from stowaway.store.paths import parse_store_path

__all__ = [
    "CYCLONEDX_MEDIA_TYPE",
    "SPDX_MEDIA_TYPE",
    "SbomError",
    "SbomFormat",
    "media_type",
    "parse_name",
    "sbom_document",
    "top_paths",
]

SbomFormat = Literal["spdx", "cyclonedx"]
SPDX_MEDIA_TYPE = "application/spdx+json"
CYCLONEDX_MEDIA_TYPE = "application/vnd.cyclonedx+json"
TOOL = f"stowaway-{__version__}"
#: Prefix of the SPDX document namespace (a URI that names this document only:
#: the suffix is derived from the content).
NAMESPACE = "https://spdx.org/spdxdocs/"
_VERSION_START = re.compile(r"-(?=[^A-Za-z])")


class SbomError(StowawayError):
    """A closure that cannot be described (a path info missing or malformed)."""


def media_type(fmt: SbomFormat) -> str:
    return SPDX_MEDIA_TYPE if fmt == "spdx" else CYCLONEDX_MEDIA_TYPE


def parse_name(name: str) -> tuple[str, str]:
    """``(name, version)`` of a store path name as ``builtins.parseDrvName`` splits it:
    at the first ``-`` not followed by a letter (``hello-2.12.1`` → ``("hello",
    "2.12.1")``; ``stowaway-demo-app`` has no version)."""
    m = _VERSION_START.search(name)
    return (name[: m.start()], name[m.end() :]) if m else (name, "")


def sbom_document(
    closure: Mapping[str, PathInfo],
    roots: Sequence[str],
    *,
    name: str,
    created: int,
    fmt: SbomFormat = "spdx",
) -> bytes:
    """The SBOM of ``closure`` (every store path of the image, by path) describing
    ``roots``; ``name`` names the document (the image), ``created`` is epoch seconds."""
    missing = [r for r in roots if r not in closure]
    if missing:
        raise SbomError(f"root {missing[0]} is not in the closure")
    rows = [_row(closure[p]) for p in sorted(closure)]
    when = datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    seed = hashlib.sha256(
        json.dumps([name, when, sorted(roots), rows], sort_keys=True).encode()
    ).hexdigest()
    ident = uuid.uuid5(uuid.NAMESPACE_URL, f"{NAMESPACE}{seed}")
    if fmt == "spdx":
        doc = _spdx(rows, sorted(roots), name, when, ident)
    else:
        doc = _cyclonedx(rows, sorted(roots), name, when, ident)
    return json.dumps(doc, indent=2, sort_keys=False, ensure_ascii=False).encode() + b"\n"


def _row(info: PathInfo) -> dict[str, Any]:
    sp = parse_store_path(info.path)
    algo, _, digest = info.nar_hash.partition(":")
    if algo != "sha256":
        raise SbomError(f"{info.path}: NAR hash {info.nar_hash!r} is not sha256")
    try:
        raw = nixbase32.decode(digest) if len(digest) == 52 else bytes.fromhex(digest)
    except (ValueError, StowawayError):
        raise SbomError(f"{info.path}: NAR hash {info.nar_hash!r} is malformed") from None
    if len(raw) != 32:
        raise SbomError(f"{info.path}: NAR hash {info.nar_hash!r} is not 32 bytes")
    pname, version = parse_name(sp.name)
    return {
        "path": info.path,
        "hash_part": sp.hash_part,
        "name": pname,
        "version": version,
        "sha256": raw.hex(),
        "nar_size": info.nar_size,
        "deriver": info.deriver,
        "references": sorted(r for r in info.references if r != info.path),
    }


def _spdx_id(row: Mapping[str, Any]) -> str:
    return f"SPDXRef-Package-{row['hash_part']}"  # nix32 hashes are valid idstrings


def _spdx(
    rows: list[dict[str, Any]], roots: list[str], name: str, when: str, ident: uuid.UUID
) -> dict[str, Any]:
    ids = {r["path"]: _spdx_id(r) for r in rows}
    packages = []
    for r in rows:
        package: dict[str, Any] = {
            "name": r["name"],
            "SPDXID": ids[r["path"]],
            "versionInfo": r["version"] or "NOASSERTION",
            "packageFileName": r["path"],
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "checksums": [{"algorithm": "SHA256", "checksumValue": r["sha256"]}],
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "comment": "checksum: SHA-256 of the store path's NAR serialisation "
            f"({r['nar_size']} bytes)",
        }
        if not r["version"]:
            del package["versionInfo"]
        if r["deriver"]:
            package["annotations"] = [
                {
                    "annotationDate": when,
                    "annotationType": "OTHER",
                    "annotator": f"Tool: {TOOL}",
                    "comment": f"nix deriver: {r['deriver']}",
                }
            ]
        packages.append(package)
    relationships = [
        {
            "spdxElementId": "SPDXRef-DOCUMENT",
            "relationshipType": "DESCRIBES",
            "relatedSpdxElement": ids[root],
        }
        for root in roots
    ]
    relationships += [
        {
            "spdxElementId": ids[r["path"]],
            "relationshipType": "DEPENDS_ON",
            "relatedSpdxElement": ids[ref],
        }
        for r in rows
        for ref in r["references"]
        if ref in ids
    ]
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": name,
        "documentNamespace": f"{NAMESPACE}{_slug(name)}-{ident}",
        "creationInfo": {"created": when, "creators": [f"Tool: {TOOL}"]},
        "packages": packages,
        "relationships": relationships,
    }


def _cyclonedx(
    rows: list[dict[str, Any]], roots: list[str], name: str, when: str, ident: uuid.UUID
) -> dict[str, Any]:
    components = []
    for r in rows:
        properties = [{"name": "nix:store_path", "value": r["path"]}]
        properties += [{"name": "nix:nar_size", "value": str(r["nar_size"])}]
        if r["deriver"]:
            properties.append({"name": "nix:deriver", "value": r["deriver"]})
        component: dict[str, Any] = {
            "type": "library",
            "bom-ref": r["path"],
            "name": r["name"],
            "hashes": [{"alg": "SHA-256", "content": r["sha256"]}],
            "properties": properties,
        }
        if r["version"]:
            component["version"] = r["version"]
        components.append(component)
    image_ref = f"image:{name}"
    dependencies = [{"ref": image_ref, "dependsOn": roots}]
    dependencies += [{"ref": r["path"], "dependsOn": r["references"]} for r in rows]
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{ident}",
        "version": 1,
        "metadata": {
            "timestamp": when,
            "tools": {
                "components": [{"type": "application", "name": "stowaway", "version": __version__}]
            },
            "component": {"type": "container", "bom-ref": image_ref, "name": name},
        },
        "components": components,
        "dependencies": dependencies,
    }


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-") or "image"


def top_paths(closure: Mapping[str, PathInfo]) -> list[str]:
    """The paths of ``closure`` no other path in it references: what an image read
    back from a target was built from (its roots, as far as the closure can tell)."""
    referenced = {r for info in closure.values() for r in info.references if r != info.path}
    return sorted(p for p in closure if p not in referenced)
