"""``stowaway.json``: what `stowaway buildkit context` tells the frontend.

The frontend reads it from the build context, so it is plain JSON checked field by field
here, with errors naming the file and the field. Stdlib only (runs in the frontend image).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stowaway.errors import StowawayError

__all__ = ["SPEC_VERSION", "Member", "Spec", "SpecError", "Target"]

SPEC_VERSION = 1


class SpecError(StowawayError):
    """A stowaway.json that is not what `stowaway buildkit context` writes."""


@dataclass(frozen=True)
class Target:
    """An output the image is made of: derivation, output name, expected store path."""

    drv: str
    output: str
    path: str


@dataclass(frozen=True)
class Member:
    """A customisation-layer entry (``/etc/passwd``, ``/tmp``, ...), relative to ``/``."""

    name: str
    kind: str  # "directory" | "regular"
    mode: int
    data: bytes = b""


@dataclass(frozen=True)
class Spec:
    """Targets, where each .drv and input source lives in the context, the output
    closure's references (None when the outputs were not built locally), layering and
    the image config (JSON bytes, rootfs left for BuildKit to fill)."""

    targets: tuple[Target, ...]
    drv_files: Mapping[str, str]
    source_dirs: Mapping[str, str]
    outputs: Mapping[str, Mapping[str, str]]
    references: Mapping[str, tuple[str, ...]] | None
    nar_sizes: Mapping[str, int] = field(default_factory=dict)
    layering: str = "auto"
    max_layers: int = 100
    customisation: tuple[Member, ...] = ()
    config: bytes = b"{}"

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "version": SPEC_VERSION,
            "targets": [{"drv": t.drv, "output": t.output, "path": t.path} for t in self.targets],
            "derivations": dict(sorted(self.drv_files.items())),
            "sources": dict(sorted(self.source_dirs.items())),
            "outputs": {d: dict(sorted(o.items())) for d, o in sorted(self.outputs.items())},
            "references": None
            if self.references is None
            else {p: list(r) for p, r in sorted(self.references.items())},
            "narSizes": dict(sorted(self.nar_sizes.items())),
            "layering": {"strategy": self.layering, "maxLayers": self.max_layers},
            "customisation": [
                {
                    "name": m.name,
                    "kind": m.kind,
                    "mode": m.mode,
                    "data": base64.b64encode(m.data).decode(),
                }
                for m in self.customisation
            ],
            "config": json.loads(self.config),
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str = "stowaway.json") -> Spec:
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise SpecError(f"{where} is not JSON: {e}") from None
        r = _Reader(doc, where)
        version = r.get(doc, "version", int)
        if version != SPEC_VERSION:
            raise SpecError(
                f"{where}: spec version {version} is not supported (expected {SPEC_VERSION})",
                hint="regenerate the context with the same stowaway version as the frontend",
            )
        targets = tuple(
            Target(r.get(t, "drv", str), r.get(t, "output", str), r.get(t, "path", str))
            for t in r.get(doc, "targets", list)
        )
        if not targets:
            raise SpecError(f"{where}: no targets")
        refs_doc = doc.get("references")
        references = None
        if refs_doc is not None:
            references = {p: tuple(r.strs(v, f"references.{p}")) for p, v in r.dict(refs_doc)}
        layering = r.get(doc, "layering", dict)
        return cls(
            targets=targets,
            drv_files=dict(r.str_map(r.get(doc, "derivations", dict), "derivations")),
            source_dirs=dict(r.str_map(r.get(doc, "sources", dict), "sources")),
            outputs={
                d: dict(r.str_map(o, f"outputs.{d}"))
                for d, o in r.get(doc, "outputs", dict).items()
            },
            references=references,
            nar_sizes={p: int(n) for p, n in r.get(doc, "narSizes", dict).items()},
            layering=r.get(layering, "strategy", str),
            max_layers=r.get(layering, "maxLayers", int),
            customisation=tuple(
                Member(
                    r.get(m, "name", str),
                    r.get(m, "kind", str),
                    r.get(m, "mode", int),
                    base64.b64decode(r.get(m, "data", str)),
                )
                for m in r.get(doc, "customisation", list)
            ),
            config=json.dumps(
                r.get(doc, "config", dict),
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=False,
            ).encode(),
        )


class _Reader:
    def __init__(self, doc: object, where: str) -> None:
        if not isinstance(doc, dict):
            raise SpecError(f"{where}: top level must be a JSON object")
        self.where = where

    def get(self, obj: object, key: str, typ: type[Any]) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise SpecError(f"{self.where}: missing field {key!r}")
        value = obj[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise SpecError(f"{self.where}: field {key!r} must be a {typ.__name__}")
        return value

    def dict(self, obj: object) -> list[tuple[str, object]]:
        if not isinstance(obj, dict):
            raise SpecError(f"{self.where}: expected a JSON object")
        return list(obj.items())

    def strs(self, obj: object, what: str) -> list[str]:
        if not isinstance(obj, list) or not all(isinstance(x, str) for x in obj):
            raise SpecError(f"{self.where}: {what} must be a list of strings")
        return obj

    def str_map(self, obj: object, what: str) -> list[tuple[str, str]]:
        items = self.dict(obj)
        if not all(isinstance(v, str) for _, v in items):
            raise SpecError(f"{self.where}: {what} must map strings to strings")
        return [(k, str(v)) for k, v in items]
