"""Hand-made closures for the layering tests, and the bench's generator."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

from stowaway.layering import LayerPlan
from stowaway.store.model import PathInfo

MB = 1_000_000
BENCH = Path(__file__).resolve().parents[2] / "bench" / "layer_reuse.py"


def sp(name: str, digest: str = "0" * 32) -> str:
    """A store path; the default hash makes paths sort by name."""
    return f"/nix/store/{digest}-{name}"


def closure(graph: Mapping[str, tuple[int, Sequence[str]]]) -> dict[str, PathInfo]:
    """``{name: (nar_size, [referenced names])}`` as a closure of PathInfo."""
    return {
        sp(n): PathInfo(
            path=sp(n),
            nar_hash="sha256:" + "0" * 52,
            nar_size=size,
            references=tuple(sorted(sp(r) for r in refs)),
        )
        for n, (size, refs) in graph.items()
    }


def names(plan: LayerPlan) -> list[list[str]]:
    """Layers as lists of names (bottom to top)."""
    return [[p.split("-", 1)[1] for p in layer.paths] for layer in plan.layers]


def bench() -> ModuleType:
    """bench/layer_reuse.py, imported by file path (bench/ is not a package)."""
    if "layer_reuse" not in sys.modules:
        spec = importlib.util.spec_from_file_location("layer_reuse", BENCH)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["layer_reuse"] = module
        spec.loader.exec_module(module)
    return sys.modules["layer_reuse"]
