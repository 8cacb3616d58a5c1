"""Read back an image written by a sink: its manifest and the store paths per layer.

The store paths come from the ``containerd.io/snapshot/stowaway.paths.<i>``
annotations the composer writes, so this works on any stowaway-built image.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from stowaway.errors import StowawayError
from stowaway.image.annotations import decode_paths
from stowaway.image.digest import parse_digest
from stowaway.store.model import STORE_DIR


class _Layout:
    """Reads files of an OCI layout from a directory or from an oci-archive tarball;
    a context manager, so the tarball is closed."""

    def __init__(self, kind: str, location: str) -> None:
        self.kind = kind
        self.location = location
        self._tar: tarfile.TarFile | None = None
        if kind == "oci-archive":
            try:
                self._tar = tarfile.open(location)
            except (OSError, tarfile.TarError) as e:
                raise StowawayError(f"cannot read OCI archive {location}: {e}") from None

    def __enter__(self) -> _Layout:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tar is not None:
            self._tar.close()

    def read(self, name: str) -> bytes:
        try:
            if self._tar is not None:
                member = self._tar.extractfile(name)
                if member is None:
                    raise KeyError(name)
                return member.read()
            return (Path(self.location) / name).read_bytes()
        except (KeyError, OSError):
            raise StowawayError(f"{self.kind}:{self.location} has no {name}") from None

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except ValueError as e:
            raise StowawayError(f"{self.kind}:{self.location}: {name} is not JSON: {e}") from None


def read_image_summary(target: str) -> dict[str, Any]:
    """Manifest digest, config digest and layers (digest, size, store paths) of an image."""
    kind, _, rest = target.partition(":")
    if kind not in ("oci", "oci-archive") or not rest:
        raise StowawayError(
            f"cannot inspect {target!r}", hint="use oci:DIR[:TAG] or oci-archive:FILE[:TAG]"
        )
    location, _, tag = rest.partition(":")
    try:
        return _summary(target, _Layout(kind, location), tag)
    except (KeyError, TypeError, AttributeError) as e:  # valid JSON, not an OCI layout
        why = f"{type(e).__name__}: {e}"
        raise StowawayError(f"{target} is not a valid OCI layout ({why})") from None


def _summary(target: str, layout: _Layout, tag: str) -> dict[str, Any]:
    with layout:
        index = layout.json("index.json")
        manifests = index.get("manifests", [])
        if tag:
            manifests = [
                m
                for m in manifests
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
            ]
        if not manifests:
            raise StowawayError(f"no image{' tagged ' + tag if tag else ''} in {target}")
        desc = manifests[0]
        algo, hexdigest = parse_digest(str(desc["digest"]))  # it names a file: no "../"
        manifest = layout.json(f"blobs/{algo}/{hexdigest}")
    layers = [
        {
            "digest": layer["digest"],
            "size": layer["size"],
            "media_type": layer.get("mediaType", ""),
            "store_paths": [
                f"{STORE_DIR}/{base}" for base in decode_paths(layer.get("annotations", {})) or []
            ],
        }
        for layer in manifest.get("layers", [])
    ]
    return {
        "manifest_digest": desc["digest"],
        "config_digest": manifest["config"]["digest"],
        "media_type": manifest.get("mediaType", desc.get("mediaType", "")),
        "layers": layers,
    }
