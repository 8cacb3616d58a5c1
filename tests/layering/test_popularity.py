"""Worked examples for the nixpkgs popularity contest."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from layering_helpers import closure, names, sp

from stowaway.layering import plan
from stowaway.layering.popularity import package_name, scores
from stowaway.layering.reference_graph import build_reference_graph

# The example in nixpkgs' closure-graph.py: A-B-C-D-F, C-E-F, B-E, A-G.
NIXPKGS = {
    "A": (1, ["B", "G"]),
    "B": (1, ["C", "E"]),
    "C": (1, ["D", "E"]),
    "D": (1, ["F"]),
    "E": (1, ["F"]),
    "F": (1, []),
    "G": (1, []),
}


def named_scores(graph: Mapping[str, tuple[int, Sequence[str]]], root: str) -> dict[str, int]:
    g = build_reference_graph(closure(graph), [sp(root)])
    return {p.split("-", 1)[1]: s for p, s in zip(g.paths, scores(g), strict=True)}


def test_scores_match_the_nixpkgs_example() -> None:
    assert named_scores(NIXPKGS, "A") == {"A": 1, "B": 2, "C": 3, "D": 4, "E": 5, "F": 9, "G": 2}


def test_scores_match_the_nixpkgs_unit_test() -> None:
    graph = {
        "foo": (1, ["bar", "baz", "foo"]),
        "bar": (1, ["baz"]),
        "baz": (1, ["tux"]),
        "tux": (1, []),
    }
    assert named_scores(graph, "foo") == {"foo": 1, "bar": 2, "baz": 4, "tux": 6}


def test_one_layer_per_path_most_popular_at_the_bottom() -> None:
    p = plan(closure(NIXPKGS), [sp("A")], strategy="popularity")
    # B and G tie at 2: name order.
    assert names(p) == [["F"], ["E"], ["D"], ["C"], ["B"], ["G"], ["A"]]


def test_over_budget_the_rest_shares_the_last_layer() -> None:
    p = plan(closure(NIXPKGS), [sp("A")], strategy="popularity", max_layers=4)
    assert names(p) == [["F"], ["E"], ["A", "B", "C", "D", "G"]]


def test_ties_break_by_name_before_hash() -> None:
    a, b = sp("aaa", "z" * 32), sp("bbb", "0" * 32)
    assert sorted([b, a], key=package_name) == [a, b]


def expanded_scores(refs: dict[int, list[int]], roots: list[int]) -> dict[int, int]:
    """nixpkgs' definition by brute force: expand the tree, count for each node
    occurrence every path in its subtree once."""
    score = dict.fromkeys(refs, 0)

    def visit(n: int) -> set[int]:
        below = {n}
        for r in refs[n]:
            below |= visit(r)
        for x in below:
            score[x] += 1
        return below

    for r in roots:
        visit(r)
    return score


def test_dynamic_programming_equals_tree_expansion() -> None:
    rnd = random.Random(7)
    for _ in range(20):
        n = rnd.randint(2, 12)
        refs = {i: sorted(rnd.sample(range(i + 1, n), rnd.randint(0, n - i - 1))) for i in range(n)}
        graph = {f"p{i:02}": (1, [f"p{j:02}" for j in rs]) for i, rs in refs.items()}
        g = build_reference_graph(closure(graph), [sp("p00")])
        entries = [int(g.paths[e].rsplit("p", 1)[1]) for e in g.entries]
        want = expanded_scores(refs, entries)
        got = {int(p.rsplit("p", 1)[1]): s for p, s in zip(g.paths, scores(g), strict=True)}
        assert got == want
