"""What a layer planner returns: an ordered list of groups of store paths."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlannedLayer:
    """One store-path layer: the paths it holds (sorted) and their total NAR size."""

    paths: tuple[str, ...]
    size: int


@dataclass(frozen=True)
class LayerPlan:
    """Layers bottom (most widely shared) to top (the application). The
    customisation layer is *not* part of the plan; the composer appends it."""

    strategy: str
    layers: tuple[PlannedLayer, ...]
    #: how many of the bottom layers were planned from a named layer base
    base_layers: int = 0
