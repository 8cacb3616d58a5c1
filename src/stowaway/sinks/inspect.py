"""Read back an image written by a sink: its manifest and the store paths per layer.

The store paths come from the ``containerd.io/snapshot/stowaway.paths.<i>``
annotations the composer writes, so this works on any stowaway-built image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stowaway.errors import StowawayError
from stowaway.image.annotations import decode_paths
from stowaway.sinks.oci_layout import LayoutReader, blob_name
from stowaway.store.model import STORE_DIR


def read_image_summary(target: str) -> dict[str, Any]:
    """Manifest digest, config digest and layers (digest, size, store paths) of an image."""
    kind, _, rest = target.partition(":")
    if kind not in ("oci", "oci-archive") or not rest:
        raise StowawayError(
            f"cannot inspect {target!r}", hint="use oci:DIR[:TAG] or oci-archive:FILE[:TAG]"
        )
    location, _, tag = rest.partition(":")
    try:
        return _summary(target, LayoutReader(Path(location), archive=kind == "oci-archive"), tag)
    except (KeyError, TypeError, AttributeError) as e:  # valid JSON, not an OCI layout
        why = f"{type(e).__name__}: {e}"
        raise StowawayError(f"{target} is not a valid OCI layout ({why})") from None


def _summary(target: str, layout: LayoutReader, tag: str) -> dict[str, Any]:
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
        manifest = layout.json(blob_name(str(desc["digest"])))
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
