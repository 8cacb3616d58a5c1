"""Worked examples for Nixery's dominator-tree grouping."""

from __future__ import annotations

from layering_helpers import MB, closure, names, sp

from stowaway.layering import plan
from stowaway.layering.reference_graph import VIRTUAL, build_reference_graph, dominators

# app -> lib1 -> zlib -> glibc, lib1 -> glibc, app -> lib2 -> glibc, lib2 -> giant.
# glibc is popular (3 of 6 paths refer to it); lib2, giant and app have closures
# over 100 MB: all of them get an edge from the virtual root.
GRAPH = {
    "app": (1 * MB, ["lib1", "lib2"]),
    "lib1": (2 * MB, ["zlib", "glibc"]),
    "zlib": (100_000, ["glibc"]),
    "lib2": (3 * MB, ["glibc", "giant"]),
    "glibc": (30 * MB, []),
    "giant": (150 * MB, []),
}


def test_dominator_tree_of_a_diamond() -> None:
    g = build_reference_graph(
        closure({"a": (1, ["b", "c"]), "b": (1, ["d"]), "c": (1, ["d"]), "d": (1, [])}), [sp("a")]
    )
    idom = dominators(g)
    by = {p.split("-", 1)[1]: i for i, p in enumerate(g.paths)}
    assert [idom[by[x]] for x in "abcd"] == [VIRTUAL, by["a"], by["a"], by["a"]]
    # an extra edge from the virtual root to b makes d reachable around a
    idom = dominators(g, [by["b"]])
    assert idom[by["b"]] == VIRTUAL and idom[by["d"]] == VIRTUAL


def test_each_subtree_under_the_root_is_a_layer() -> None:
    p = plan(closure(GRAPH), [sp("app")], strategy="dominator")
    # ratings: lib2 3e6, {app,lib1,zlib} 3.1e6, glibc 3*30e6, giant 150e6;
    # glibc has the most referrers, so it is the bottom layer.
    assert names(p) == [["glibc"], ["giant"], ["lib2"], ["app", "lib1", "zlib"]]


def test_lowest_rated_candidates_merge_into_one() -> None:
    p = plan(closure(GRAPH), [sp("app")], strategy="dominator", max_layers=4)
    assert names(p) == [["glibc"], ["giant"], ["app", "lib1", "lib2", "zlib"]]
    p = plan(closure(GRAPH), [sp("app")], strategy="dominator", max_layers=3)
    assert names(p) == [["giant"], ["app", "glibc", "lib1", "lib2", "zlib"]]
