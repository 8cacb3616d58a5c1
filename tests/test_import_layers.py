"""The packages of stowaway form layers: a module imports its own package and the
layers below it, never one above, and never a peer of its own layer (the faces reach
each other only through the packages below them). Read from the source with ``ast``,
so imports inside functions and under TYPE_CHECKING count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stowaway"

#: Bottom to top. ``stowaway`` is the package's own ``__init__`` (the version).
LAYERS: list[set[str]] = [
    {"stowaway", "errors", "fsutil", "parallel", "progress"},
    {"store"},
    {"layering"},
    {"image"},
    {"distribution"},
    {"sinks"},
    {"cli_options", "installables", "_ui"},  # what the command modules share
    {"registry", "runtime", "buildkit"},  # the faces
    {"cli"},
    {"__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(parts: list[str]) -> str:
    """The layer unit of a module named by its parts below ``stowaway``: the top-level
    package or module it belongs to."""
    if not parts or parts[0] == "__init__":
        return "stowaway"
    return parts[0]


def _is_module(parts: list[str]) -> bool:
    path = SRC.joinpath(*parts)
    return path.is_dir() or path.with_suffix(".py").is_file()


def _imported_units(path: Path) -> set[str]:
    """The units ``path`` imports (absolute and relative imports alike)."""
    own = list(path.relative_to(SRC).with_suffix("").parts)
    package = own if path.name == "__init__.py" else own[:-1]
    package = [p for p in package if p != "__init__"]
    units: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["stowaway", *package[: len(package) - node.level + 1]]
            else:
                base = []
            base += node.module.split(".") if node.module else []
            targets = [[*base, alias.name] for alias in node.names]
        else:
            continue
        for target in targets:
            if target[0] != "stowaway":
                continue
            inner = target[1:]
            if isinstance(node, ast.ImportFrom) and not _is_module(inner):
                inner = inner[:-1]  # `from stowaway.x import name`: the name is no module
            units.add(_unit(inner))
    return units


MODULES = sorted(SRC.rglob("*.py"))


def test_every_unit_has_a_layer() -> None:
    units = {_unit(list(p.relative_to(SRC).with_suffix("").parts)) for p in MODULES}
    assert units - set(RANK) == set(), "place new packages in LAYERS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path) -> None:
    unit = _unit(list(path.relative_to(SRC).with_suffix("").parts))
    upward = sorted(
        other
        for other in _imported_units(path) - {unit}
        if RANK.get(other, len(LAYERS)) >= RANK[unit]
    )
    assert upward == [], f"{unit} (layer {RANK[unit]}) imports {upward}"
