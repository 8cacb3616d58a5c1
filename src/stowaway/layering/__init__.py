"""Layer planning: which store paths go into which image layer.

``plan`` is pure and deterministic: the same closure, roots and named base always
give the same plan. Strategies: ``auto`` (ours, the default; see docs/layering.md),
``popularity`` (nixpkgs buildLayeredImage) and ``dominator`` (Nixery), each a module
whose entry point is ``plan_layers(graph, budget) -> list[PlannedLayer]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from stowaway.errors import PlanError
from stowaway.layering import auto, dominator, popularity
from stowaway.layering.auto import UNKNOWN_SIZE
from stowaway.layering.model import LayerPlan, PlannedLayer
from stowaway.layering.reference_graph import ReferenceGraph, build_reference_graph
from stowaway.store.model import PathInfo, sub_closure

__all__ = [
    "MAX_LAYERS_LIMIT",
    "STRATEGIES",
    "UNKNOWN_SIZE",
    "LayerPlan",
    "PlannedLayer",
    "base_budget",
    "plan",
]

#: Registries and runtimes start failing near 125-127 layers.
MAX_LAYERS_LIMIT = 125

#: Strategy name → the planner module's ``plan_layers``.
STRATEGIES = {
    "auto": auto.plan_layers,
    "popularity": popularity.plan_layers,
    "dominator": dominator.plan_layers,
}


def plan(
    closure: Mapping[str, PathInfo],
    roots: Sequence[str],
    *,
    strategy: str = "auto",
    max_layers: int = 100,
    base_roots: Sequence[str] = (),
) -> LayerPlan:
    """Group every path of ``closure`` into layers, bottom (most shared) to top
    (``roots``). ``max_layers`` counts every image layer, so at most
    ``max_layers - 1`` are planned here (the composer adds the customisation layer).

    With ``base_roots`` (store paths in ``closure``), the closure of the base is
    planned first, on its own graph and its own share of the layers
    (``base_budget``), exactly as if it were the image: every image naming the same
    base (same strategy and ``max_layers``) gets the same bottom layers, whatever
    else it holds. The other paths are planned on top with the layers left. The base
    is an input, never guessed, so a plan depends on the arguments alone."""
    if not 2 <= max_layers <= MAX_LAYERS_LIMIT:
        raise PlanError(
            f"max_layers must be between 2 and {MAX_LAYERS_LIMIT}, got {max_layers}",
            hint="one layer is reserved for customisation, and registries and container "
            "runtimes start failing near 125-127 layers",
        )
    planner = STRATEGIES.get(strategy)
    if planner is None:
        raise PlanError(
            f"unknown layering strategy {strategy!r}; choose one of {', '.join(sorted(STRATEGIES))}"
        )
    budget = max_layers - 1
    if not base_roots:
        layers = _plan_graph(planner, build_reference_graph(closure, roots), budget)
        return LayerPlan(strategy=strategy, layers=tuple(layers))
    outside = sorted(set(base_roots) - set(closure))
    if outside:
        raise PlanError(
            f"layer base {outside[0]} is not in the image's closure"
            + (f" (nor {len(outside) - 1} more)" if len(outside) > 1 else ""),
            hint="name as the base a package the image depends on (or drop it)",
        )
    if budget < 2:
        raise PlanError(
            f"max_layers {max_layers} leaves no room to plan a layer base apart",
            hint="a layer base needs max_layers of at least 3",
        )
    base = sub_closure(closure, base_roots)
    below = _plan_graph(planner, build_reference_graph(base, base_roots), base_budget(max_layers))
    above: list[PlannedLayer] = []
    room = budget - len(below)
    if len(base) < len(closure) and strategy == "auto":
        # auto prices a merge by the members' whole closures: it sees the whole
        # graph, so that a change in the base is known to renew the paths above it
        graph = build_reference_graph(closure, [r for r in roots if r not in base] or roots)
        skip = frozenset(i for i, p in enumerate(graph.paths) if p in base)
        above = _on_top(graph, auto.plan_layers(graph, room, skip))
    elif len(base) < len(closure):
        rest = {
            p: dataclasses.replace(i, references=tuple(r for r in i.references if r not in base))
            for p, i in closure.items()
            if p not in base
        }
        # Every other path hangs under a root outside the base (the base is closed
        # under references); a closure with stray paths falls back to its entries.
        tops = [r for r in roots if r in rest] or sorted(
            set(rest) - {r for i in rest.values() for r in i.references if r != i.path}
        )
        above = _plan_graph(planner, build_reference_graph(rest, tops), room)
    return LayerPlan(strategy=strategy, layers=(*below, *above), base_layers=len(below))


def base_budget(max_layers: int) -> int:
    """Store-path layers a named base may use: four fifths of them (80 of 99), the
    paths on top keep the rest (at least one). A base is usually most of an image;
    with 75 % leaf updates got 1 point worse at 1000 paths, with 85 % 1.4 points worse
    at 5000 (bench/layer_reuse.py). A function of ``max_layers`` alone, so that the
    base's plan never depends on what else an image holds."""
    budget = max_layers - 1
    return budget - max(1, budget // 5)


def _plan_graph(
    planner: Callable[[ReferenceGraph, int], list[PlannedLayer]], graph: ReferenceGraph, budget: int
) -> list[PlannedLayer]:
    return _on_top(graph, planner(graph, budget))


def _on_top(graph: ReferenceGraph, layers: list[PlannedLayer]) -> list[PlannedLayer]:
    """Roots on top whatever the strategy (stable: keeps each side's order)."""
    top = {graph.paths[r] for r in graph.roots}
    layers.sort(key=lambda layer: not top.isdisjoint(layer.paths))
    return layers
