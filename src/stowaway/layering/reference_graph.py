"""The reference graph every planner works on, validated once.

Planners are pure functions over integers: paths are numbered in sorted string
order, so every tie broken by index is a tie broken by path string, and the same
closure always gives the same plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stowaway.errors import PlanError
from stowaway.layering.model import PlannedLayer
from stowaway.store.model import PathInfo

#: Virtual root index used by dominator computations (never a real path).
VIRTUAL = -1


@dataclass(frozen=True)
class ReferenceGraph:
    """A closure as a DAG: ``refs[i]`` are the paths ``paths[i]`` references
    (self-references dropped), ``referrers[i]`` the reverse edges, ``order`` a
    topological order with referrers before references (roots first)."""

    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    refs: tuple[tuple[int, ...], ...]
    referrers: tuple[tuple[int, ...], ...]
    order: tuple[int, ...]
    roots: tuple[int, ...]
    entries: tuple[int, ...]

    def layer(self, members: Sequence[int]) -> PlannedLayer:
        """A planned layer holding ``members`` (paths sorted, sizes summed)."""
        ms = sorted(members)
        return PlannedLayer(
            paths=tuple(self.paths[i] for i in ms), size=sum(self.sizes[i] for i in ms)
        )


def build_reference_graph(closure: Mapping[str, PathInfo], roots: Sequence[str]) -> ReferenceGraph:
    """Validate ``closure``/``roots`` and index them.

    ``entries`` are the given roots plus any path nothing in the closure refers
    to (like nixpkgs, which treats unreferenced paths as roots), sorted.
    """
    if not closure:
        raise PlanError("cannot plan layers for an empty closure")
    if not roots:
        raise PlanError("cannot plan layers without at least one root store path")
    paths = tuple(sorted(closure))
    index = {p: i for i, p in enumerate(paths)}
    refs: list[tuple[int, ...]] = []
    sizes: list[int] = []
    for p in paths:
        info = closure[p]
        if info.path != p:
            raise PlanError(f"closure entry {p} holds PathInfo for a different path {info.path}")
        if info.nar_size < 0:
            raise PlanError(f"{p} has a negative NAR size {info.nar_size}")
        out = set()
        for r in info.references:
            j = index.get(r)
            if j is None:
                raise PlanError(
                    f"{p} references {r}, which is not in the closure",
                    hint="pass the full closure (nix-store -qR) of the roots",
                )
            if r != p:
                out.add(j)
        refs.append(tuple(sorted(out)))
        sizes.append(info.nar_size)
    root_ids: list[int] = []
    for r in roots:
        j = index.get(r)
        if j is None:
            raise PlanError(f"root {r} is not in the closure")
        root_ids.append(j)
    back: list[list[int]] = [[] for _ in paths]
    for i, rs in enumerate(refs):
        for j in rs:
            back[j].append(i)
    referrers = tuple(tuple(b) for b in back)
    entries = sorted(set(root_ids) | {i for i, b in enumerate(referrers) if not b})
    return ReferenceGraph(
        paths=paths,
        sizes=tuple(sizes),
        refs=tuple(refs),
        referrers=referrers,
        order=_topological(paths, refs, referrers),
        roots=tuple(sorted(set(root_ids))),
        entries=tuple(entries),
    )


def _topological(
    paths: Sequence[str], refs: Sequence[Sequence[int]], referrers: Sequence[Sequence[int]]
) -> tuple[int, ...]:
    """Kahn's algorithm, referrers first; refuses cycles (Nix closures are DAGs
    once self-references are dropped)."""
    pending = [len(b) for b in referrers]
    ready = [i for i, n in enumerate(pending) if n == 0]
    ready.reverse()  # pop() from the end takes the smallest index first
    order: list[int] = []
    while ready:
        i = ready.pop()
        order.append(i)
        for j in reversed(refs[i]):
            pending[j] -= 1
            if pending[j] == 0:
                ready.append(j)
    if len(order) != len(paths):
        stuck = sorted(paths[i] for i, n in enumerate(pending) if n > 0)
        raise PlanError(f"reference cycle among {len(stuck)} store paths, e.g. {stuck[0]}")
    return tuple(order)


def occurrences(g: ReferenceGraph) -> list[int]:
    """How often each path occurs when the DAG is expanded into a tree from its
    entries, i.e. the number of distinct reference chains from an entry to it.
    Dynamic programming in topological order instead of expansion."""
    count = [0] * len(g.paths)
    for e in g.entries:
        count[e] += 1
    for i in g.order:
        c = count[i]
        for j in g.refs[i]:
            count[j] += c
    return count


def closure_sizes(g: ReferenceGraph) -> list[int]:
    """Total NAR size of each path's closure (itself included), via bitsets."""
    closures = descendants(g)
    return [sum(g.sizes[j] for j in bits(c)) for c in closures]


def descendants(g: ReferenceGraph) -> list[int]:
    """Each path's closure (itself included) as an int bitset."""
    clo = [0] * len(g.paths)
    for i in reversed(g.order):
        b = 1 << i
        for j in g.refs[i]:
            b |= clo[j]
        clo[i] = b
    return clo


def ancestors(g: ReferenceGraph) -> list[int]:
    """Each path's referrers, transitively (itself included), as an int bitset."""
    anc = [0] * len(g.paths)
    for i in g.order:
        b = 1 << i
        for j in g.referrers[i]:
            b |= anc[j]
        anc[i] = b
    return anc


def bits(b: int) -> list[int]:
    """Indices of the set bits of ``b``, ascending. Goes through the binary
    string so the loop runs in C, not once per bit in Python."""
    s = bin(b)[:1:-1]
    out: list[int] = []
    i = s.find("1")
    while i >= 0:
        out.append(i)
        i = s.find("1", i + 1)
    return out


def dominators(g: ReferenceGraph, extra: Sequence[int] = ()) -> list[int]:
    """Immediate dominator of each path in the graph rooted at a virtual node
    with edges to the entries and to ``extra`` (``VIRTUAL`` = the virtual root).

    The graph is a DAG, so one pass in topological order suffices: a node's
    idom is the nearest common dominator-tree ancestor of its predecessors
    (Cooper, Harvey and Kennedy's intersect without iterating to a fixpoint).
    """
    from_root = set(g.entries) | set(extra)
    idom = [VIRTUAL] * len(g.paths)
    depth = [0] * len(g.paths)

    def up(a: int, b: int) -> int:
        while a != b:
            if a == VIRTUAL or b == VIRTUAL:
                return VIRTUAL
            if depth[a] >= depth[b]:
                a = idom[a]
            else:
                b = idom[b]
        return a

    for i in g.order:
        if i in from_root or not g.referrers[i]:
            d = VIRTUAL
        else:
            preds = g.referrers[i]
            d = preds[0]
            for p in preds[1:]:
                d = up(d, p)
                if d == VIRTUAL:
                    break
        idom[i] = d
        depth[i] = 1 if d == VIRTUAL else depth[d] + 1
    return idom


def shared_first(g: ReferenceGraph, members: Sequence[int]) -> tuple[int, str]:
    """Sort key putting widely shared groups at the bottom: most referrers of any
    member first, ties by first path. (``plan`` then lifts the roots to the top.)"""
    return (-max(len(g.referrers[m]) for m in members), min(g.paths[m] for m in members))
