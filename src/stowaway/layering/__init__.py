"""Layer planning: which store paths go into which image layer.

``plan`` is pure and deterministic: the same closure and roots always give the
same plan. Strategies: ``auto`` (ours, the default; see docs/layering.md),
``popularity`` (nixpkgs buildLayeredImage) and ``dominator`` (Nixery), each a module
whose entry point is ``plan_layers(graph, budget) -> list[PlannedLayer]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from stowaway.errors import PlanError
from stowaway.layering import auto, dominator, popularity
from stowaway.layering.auto import UNKNOWN_SIZE
from stowaway.layering.model import LayerPlan, PlannedLayer
from stowaway.layering.reference_graph import build_reference_graph
from stowaway.store.model import PathInfo

__all__ = [
    "MAX_LAYERS_LIMIT",
    "STRATEGIES",
    "UNKNOWN_SIZE",
    "LayerPlan",
    "PlannedLayer",
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
) -> LayerPlan:
    """Group every path of ``closure`` into layers, bottom (most shared) to top
    (``roots``). ``max_layers`` counts every image layer, so at most
    ``max_layers - 1`` are planned here (the composer adds the customisation layer)."""
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
    graph = build_reference_graph(closure, roots)
    layers = planner(graph, max_layers - 1)
    # Roots on top whatever the strategy (stable: keeps each side's order).
    top = {graph.paths[r] for r in graph.roots}
    layers.sort(key=lambda layer: not top.isdisjoint(layer.paths))
    return LayerPlan(strategy=strategy, layers=tuple(layers))
