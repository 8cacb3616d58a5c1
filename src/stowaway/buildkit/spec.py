"""``stowaway.json``: what `stowaway buildkit context` tells the frontend.

The frontend reads it from the build context, so it is plain JSON checked field by field
here, with errors naming the file and the field. Stdlib only (runs in the frontend image).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stowaway.errors import StowawayError

__all__ = ["MEMBER_KINDS", "SPEC_VERSION", "Member", "Spec", "SpecError", "Target"]

#: 2: the context also holds ``modes/<octal>`` template directories (see graph.py).
SPEC_VERSION = 2
#: What the customisation layer of a BuildKit image may hold (no symlinks yet).
MEMBER_KINDS = ("directory", "regular")


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
        drv_files = dict(r.str_map(r.get(doc, "derivations", dict), "derivations"))
        for t in targets:
            if t.drv not in drv_files:
                raise SpecError(
                    f"{where}: target {t.drv}!{t.output} names a derivation that is not "
                    "in 'derivations'",
                    hint="regenerate the context with `stowaway buildkit context`",
                )
        refs_doc = doc.get("references")
        references = None
        if refs_doc is not None:
            references = {p: tuple(r.strs(v, f"references.{p}")) for p, v in r.dict(refs_doc)}
        layering = r.get(doc, "layering", dict)
        return cls(
            targets=targets,
            drv_files=drv_files,
            source_dirs=dict(r.str_map(r.get(doc, "sources", dict), "sources")),
            outputs={
                d: dict(r.str_map(o, f"outputs.{d}"))
                for d, o in r.get(doc, "outputs", dict).items()
            },
            references=references,
            nar_sizes={
                p: r.size(n, f"narSizes.{p}") for p, n in r.dict(r.get(doc, "narSizes", dict))
            },
            layering=r.get(layering, "strategy", str),
            max_layers=r.get(layering, "maxLayers", int),
            customisation=tuple(
                r.member(m, f"customisation[{i}]")
                for i, m in enumerate(r.get(doc, "customisation", list))
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

    def size(self, obj: object, what: str) -> int:
        if not isinstance(obj, int) or isinstance(obj, bool) or obj < 0:
            raise SpecError(f"{self.where}: {what} must be a non-negative integer, not {obj!r}")
        return obj

    def member(self, obj: object, what: str) -> Member:
        name, kind = self.get(obj, "name", str), self.get(obj, "kind", str)
        if kind not in MEMBER_KINDS:
            raise SpecError(
                f"{self.where}: {what}.kind is {kind!r}, expected one of {', '.join(MEMBER_KINDS)}"
            )
        mode = self.get(obj, "mode", int)
        if not 0 <= mode <= 0o7777:
            raise SpecError(f"{self.where}: {what}.mode {mode} is not a file mode (0..0o7777)")
        try:
            data = base64.b64decode(self.get(obj, "data", str), validate=True)
        except binascii.Error as e:
            raise SpecError(f"{self.where}: {what}.data is not base64: {e}") from None
        return Member(name, kind, mode, data)

    def strs(self, obj: object, what: str) -> list[str]:
        if not isinstance(obj, list) or not all(isinstance(x, str) for x in obj):
            raise SpecError(f"{self.where}: {what} must be a list of strings")
        return obj

    def str_map(self, obj: object, what: str) -> list[tuple[str, str]]:
        items = self.dict(obj)
        if not all(isinstance(v, str) for _, v in items):
            raise SpecError(f"{self.where}: {what} must map strings to strings")
        return [(k, str(v)) for k, v in items]
