"""Our default planner, built for layer reuse across versions and images.

Nix is input-addressed: a path gets a new hash exactly when something in its
closure changes. A layer is reused only if none of its paths changed, so every
byte of an unchanged path sharing a layer with a changed one is downloaded for
nothing. If an update starts at path ``c`` (each path equally likely), group
``S`` wastes ``size(p)`` for each member ``p`` whose closure lacks ``c`` while
another member's closure has it. Summed over ``c`` this has a closed form:

    waste(S) = |C(S)| * bytes(S) - sum(size(p) * |closure(p)| for p in S)

with ``C(S)`` the union of the members' closures, so a merge is cheap to price
(two bitset ORs and popcounts). The planner:

1. keeps the roots (the application) alone, on top;
2. keeps the biggest paths (>= ``SOLO_MIN``) alone, up to half the budget: a
   one-path layer is new exactly when its path is, in any later version and in
   any other image holding that path;
3. starts every other path alone and makes the cheapest merge (least added
   waste, ties by name then path) until the plan fits the budget and no layer
   is below ``TINY``. Candidate pairs: a path and a reference, and neighbouring
   children of one referrer (ordered by closure size, then name).

Prices depend only on the members' closures and sizes, never on hashes or on
what refers to them, so an update that re-hashes some paths yields the same
grouping and only layers holding changed paths change.
Worked examples: docs/layering.md.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from functools import partial

from stowaway.layering.model import PlannedLayer
from stowaway.layering.reference_graph import ReferenceGraph, descendants, shared_first

#: Paths at least this big may get a layer of their own.
SOLO_MIN = 1 << 20
#: Groups smaller than this are merged even when the budget would allow them:
#: a layer costs a request, a blob and a mount whatever its size.
TINY = 1 << 20
#: Planning size of a store path whose NAR size is unknown (outputs not built on the
#: client, `.nix` builds in BuildKit). 0 would make every group "tiny", and the
#: planner would merge the whole closure into a layer or two. Below SOLO_MIN, so that no
#: path claims a layer of its own (with equal sizes the solo paths would be picked by
#: hash, and re-picked on every update), and as close to TINY as that allows: with
#: today's TINY == SOLO_MIN two paths reach TINY, so the planner groups the closure by
#: its structure alone, in about half as many layers as paths (budget permitting).
UNKNOWN_SIZE = min(SOLO_MIN - 1, TINY)

Label = tuple[str, str]


#: A heap entry: price, the two labels' ranks (smaller first), the keys, their versions.
_Entry = tuple[int, int, int, int, int, int, int]


def _label(path: str) -> Label:
    """Tie-break key: the name first (stable across versions), then the path."""
    return (path.rsplit("/", 1)[-1].partition("-")[2], path)


class _Groups:
    """Disjoint groups of path indices with the sums the waste formula needs
    (``count`` caches the popcount of ``cover``: pricing is the hot loop)."""

    def __init__(self, g: ReferenceGraph, fixed: set[int], clo: list[int]) -> None:
        free = [i for i in range(len(g.paths)) if i not in fixed]
        self.members = {i: [i] for i in free}
        self.bytes = {i: g.sizes[i] for i in free}
        self.cover = {i: clo[i] for i in free}
        self.count = {i: clo[i].bit_count() for i in free}
        # labels by rank: ints compare faster than string tuples in the heap, and a
        # group's smallest member label is its smallest rank (the order is the same)
        order = sorted(range(len(g.paths)), key=lambda i: _label(g.paths[i]))
        rank = [0] * len(g.paths)
        for r, i in enumerate(order):
            rank[i] = r
        self.label = {i: rank[i] for i in free}
        self.version = dict.fromkeys(free, 0)
        self.neighbours: dict[int, set[int]] = {i: set() for i in free}

    def link(self, a: int, b: int) -> None:
        if a != b and a in self.members and b in self.members:
            self.neighbours[a].add(b)
            self.neighbours[b].add(a)

    def entry(self, a: int, b: int) -> _Entry:
        """Heap entry for the pair: the price (added waste if ``a`` and ``b``
        became one group; the per-member terms of the formula cancel out), the
        labels (smaller first) as the tie-break, then the versions that tell a
        stale entry."""
        return next(self.entries(a, [b]))

    def entries(
        self, a: int, others: list[int]
    ) -> Iterator[tuple[int, int, int, int, int, int, int]]:
        """``entry(a, n)`` for each of ``others``, with ``a``'s terms looked up once
        (this runs for every neighbour after every merge: the planner's hot loop)."""
        la, ba, cover_a, va = self.label[a], self.bytes[a], self.cover[a], self.version[a]
        own = self.count[a] * ba
        label, size, cover, count, version = (
            self.label,
            self.bytes,
            self.cover,
            self.count,
            self.version,
        )
        for n in others:
            bn = size[n]
            price = (cover_a | cover[n]).bit_count() * (ba + bn) - own - count[n] * bn
            ln = label[n]
            lo, hi = (ln, la) if ln < la else (la, ln)
            yield (price, lo, hi, a, n, va, version[n])

    def merge(self, a: int, b: int) -> int:
        """Fold one group into the other and return the survivor's key: the one
        with more neighbours survives, so the neighbour sets moved stay small.
        (Keys never reach the plan: labels break every tie first.)"""
        if len(self.neighbours[b]) > len(self.neighbours[a]):
            a, b = b, a
        self.members[a] += self.members.pop(b)
        self.bytes[a] += self.bytes.pop(b)
        self.cover[a] |= self.cover.pop(b)
        self.count[a] = self.cover[a].bit_count()
        del self.count[b]
        self.label[a] = min(self.label[a], self.label.pop(b))
        self.version[a] += 1
        del self.version[b]
        for n in self.neighbours.pop(b):
            self.neighbours[n].discard(b)
            self.link(a, n)
        return a


def plan_layers(
    g: ReferenceGraph, budget: int, skip: frozenset[int] = frozenset()
) -> list[PlannedLayer]:
    """Plan layers bottom to top within ``budget`` store-path layers; the paths in
    ``skip`` (a named base, planned apart) are left out of the layers but still
    count in the closures that price a merge (a change in them renews the rest)."""
    roots = set(g.roots) - skip
    if len(roots) >= budget:
        roots = set()  # no room to keep the roots apart: everything is mergeable
    big = sorted(
        (
            i
            for i in range(len(g.paths))
            if i not in roots and i not in skip and g.sizes[i] >= SOLO_MIN
        ),
        key=lambda i: (-g.sizes[i], g.paths[i]),
    )[: (budget - len(roots)) // 2]
    fixed = roots | set(big)
    clo = descendants(g)
    gs = _Groups(g, fixed | skip, clo)
    sizes = [c.bit_count() for c in clo]
    for i, refs in enumerate(g.refs):
        for j in refs:
            gs.link(i, j)
        kids = sorted((j for j in refs if j in gs.members), key=lambda j: (sizes[j], gs.label[j]))
        for a, b in zip(kids, kids[1:], strict=False):
            gs.link(a, b)

    room = budget - len(fixed)
    # A heap pops the smallest entry whatever the insertion order, so building it
    # in one heapify gives the same merges as pushing pairs one by one.
    heap = [gs.entry(a, b) for a in gs.members for b in gs.neighbours[a] if a < b]
    heapq.heapify(heap)
    while heap:
        _, _, _, a, b, va, vb = heapq.heappop(heap)
        if gs.version.get(a) != va or gs.version.get(b) != vb:
            continue  # stale: one side has merged since this price was computed
        fits = len(gs.members) <= room
        if fits and min(gs.bytes[a], gs.bytes[b]) >= TINY:
            continue  # within budget and neither side tiny: keep them apart
        a = gs.merge(a, b)
        # Groups only grow and the group count only falls: once the plan fits,
        # a pair of two non-tiny groups can never merge, so it is not queued.
        tiny = gs.bytes[a] < TINY
        for entry in gs.entries(a, [n for n in gs.neighbours[a]
                                    if not fits or tiny or gs.bytes[n] < TINY]):  # fmt: skip
            heapq.heappush(heap, entry)

    groups = [[f] for f in sorted(fixed)] + [gs.members[k] for k in sorted(gs.members)]
    if len(groups) > budget:
        groups = _squeeze(g, groups, budget)
    return [g.layer(ms) for ms in sorted(groups, key=partial(shared_first, g))]


def _squeeze(g: ReferenceGraph, groups: list[list[int]], budget: int) -> list[list[int]]:
    """Last resort when no candidate pair is left (paths with no free neighbour,
    or more roots than the budget): merge the two smallest groups (by bytes,
    then first path) until the plan fits."""

    def key(ms: list[int]) -> tuple[int, str]:
        return (sum(g.sizes[m] for m in ms), min(g.paths[m] for m in ms))

    gs = sorted(groups, key=key)
    while len(gs) > budget:
        gs = sorted([gs[0] + gs[1], *gs[2:]], key=key)
    return gs
