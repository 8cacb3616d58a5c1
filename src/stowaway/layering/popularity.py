"""The nixpkgs popularity contest (``buildLayeredImage``), reproduced.

nixpkgs expands the reference DAG into a tree from the unreferenced paths and
folds it bottom-up; its score for a path ``x`` works out to the number of tree
nodes whose subtree contains ``x``, i.e. the sum, over every path ``a`` whose
closure holds ``x`` (``x`` included), of how often ``a`` occurs in the tree.
We compute exactly that without expanding: occurrence counts by dynamic
programming in topological order, ancestor sets as bitsets. Paths are sorted by
score descending, ties by name then hash (nixpkgs' ``package_name``); the first
``budget - 1`` paths get a layer each and the rest share the last layer.
"""

from __future__ import annotations

from stowaway.layering.model import PlannedLayer
from stowaway.layering.reference_graph import ReferenceGraph, ancestors, bits, occurrences


def scores(g: ReferenceGraph) -> list[int]:
    """nixpkgs' popularity score of every path (see the module docstring)."""
    occ = occurrences(g)
    return [sum(occ[a] for a in bits(anc)) for anc in ancestors(g)]


def package_name(path: str) -> str:
    """nixpkgs' tie-break key: the name first, the hash part last."""
    base = path.rsplit("/", 1)[-1]
    digest, _, name = base.partition("-")
    return f"{name}-{digest}"


def plan_layers(g: ReferenceGraph, budget: int) -> list[PlannedLayer]:
    """Layers bottom to top: the most popular paths alone, the rest together."""
    score = scores(g)
    ranked = sorted(range(len(g.paths)), key=lambda i: (-score[i], package_name(g.paths[i])))
    if len(ranked) <= budget:
        return [g.layer([i]) for i in ranked]
    head, rest = ranked[: budget - 1], ranked[budget - 1 :]
    return [g.layer([i]) for i in head] + [g.layer(rest)]
