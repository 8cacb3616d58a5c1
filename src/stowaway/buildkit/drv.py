"""The frontend's view of ``.drv`` files: the store's parser (``stowaway.store.drv``)
plus the one thing the frontend cannot build, structured attrs (their JSON attribute
file is written by Nix's own build loop, which BuildKit's ExecOps do not replay)."""

from __future__ import annotations

from stowaway.store.drv import Derivation, DrvError, DrvOutput
from stowaway.store.drv import parse_drv as parse_store_drv

__all__ = ["Derivation", "DrvError", "DrvOutput", "parse_drv"]


def parse_drv(text: str | bytes, path: str = "<drv>") -> Derivation:
    """Parse ``.drv`` text as ``stowaway.store.drv.parse_drv`` does; a derivation with
    structured attrs is a DrvError."""
    drv = parse_store_drv(text, path)
    if drv.structured_attrs:
        raise DrvError(
            f"derivation {path} ({drv.name}) uses structured attrs (__structuredAttrs), "
            "which the stowaway BuildKit frontend does not support",
            hint="drop __structuredAttrs = true from the derivation",
        )
    return drv
