"""Nixery's dominator-tree grouping (``layers/layers.go``), reproduced.

A virtual root gets edges to the roots and to every "big or popular" path;
each subtree hanging off the virtual root in the dominator tree is a layer
candidate, rated ``popularity x size``. While there are more candidates than
the budget, the lowest-rated one is merged into the next one, and the merged
layer keeps its place and goes on absorbing (Nixery does not re-sort), so in
effect the ``n - budget + 1`` lowest-rated candidates become one layer.

Differences, because we have no channel-wide popularity table: a path's
popularity is its number of referrers inside the closure (at least 1), and a
path is "popular" when at least a tenth of the closure (and at least two paths)
refers to it. "Big" is Nixery's rule: closure size above 100 MB. A candidate's
size is the sum of its members' NAR sizes.
"""

from __future__ import annotations

from functools import partial

from stowaway.layering.model import PlannedLayer
from stowaway.layering.reference_graph import (
    VIRTUAL,
    ReferenceGraph,
    closure_sizes,
    dominators,
    shared_first,
)

BIG_CLOSURE = 100 * 1000 * 1000  # Nixery: 100 MB (decimal)


def popularity(g: ReferenceGraph) -> list[int]:
    """In-closure popularity: number of direct referrers, at least 1."""
    return [max(1, len(r)) for r in g.referrers]


def dominator_groups(g: ReferenceGraph, budget: int) -> list[tuple[int, list[int]]]:
    """Groups as ``(rating, members)``, merged down to ``budget``; the caller orders them."""
    pop = popularity(g)
    popular_min = max(2, len(g.paths) // 10)
    csize = closure_sizes(g)
    extra = [
        i
        for i in range(len(g.paths))
        if csize[i] > BIG_CLOSURE or len(g.referrers[i]) >= popular_min
    ]
    idom = dominators(g, extra)
    head = list(range(len(g.paths)))
    for i in g.order:  # dominators come before the paths they dominate
        if idom[i] != VIRTUAL:
            head[i] = head[idom[i]]
    members: dict[int, list[int]] = {}
    for i, h in enumerate(head):
        members.setdefault(h, []).append(i)
    candidates = sorted(
        (pop[h] * sum(g.sizes[m] for m in ms), g.paths[h], ms) for h, ms in members.items()
    )
    if len(candidates) > budget:
        cut = len(candidates) - budget + 1
        merged = [m for _, _, ms in candidates[:cut] for m in ms]
        rating = sum(r for r, _, _ in candidates[:cut])
        candidates = [(rating, "", merged)] + candidates[cut:]
    return [(r, ms) for r, _, ms in candidates]


def plan_layers(g: ReferenceGraph, budget: int) -> list[PlannedLayer]:
    """Nixery's groups ordered for an image (see ``reference_graph.shared_first``)."""
    groups = [ms for _, ms in dominator_groups(g, budget)]
    return [g.layer(ms) for ms in sorted(groups, key=partial(shared_first, g))]
