"""Worked examples, stability and the reuse goal for the ``auto`` planner."""

from __future__ import annotations

import pytest
from layering_helpers import MB, bench, closure, names, sp

from stowaway.layering import plan

# glibc and libA are big (>= 1 MiB): alone. cfg, libB and zlib are tiny: merged,
# cheapest first: libB+zlib (their closures differ only by libB: 100 KB of
# zlib wasted per origin), then cfg joins (its closure lacks 3 of the 4).
EXAMPLE = {
    "app": (10_000, ["libA", "libB", "cfg"]),
    "libA": (5 * MB, ["glibc", "zlib"]),
    "libB": (200_000, ["zlib", "glibc"]),
    "zlib": (100_000, ["glibc"]),
    "cfg": (1_000, []),
    "glibc": (30 * MB, []),
}


def test_worked_example() -> None:
    p = plan(closure(EXAMPLE), [sp("app")])
    assert p.strategy == "auto"
    # bottom: most referrers (glibc: 3, zlib: 2, libA: 1); the app on top
    assert names(p) == [["glibc"], ["cfg", "libB", "zlib"], ["libA"], ["app"]]


def test_budget_forces_big_paths_together() -> None:
    p = plan(closure(EXAMPLE), [sp("app")], max_layers=3)
    assert names(p)[-1] == ["app"]
    assert len(p.layers) == 2


def test_app_alone_on_top_of_a_large_closure() -> None:
    lr = bench()
    spec = lr.synthetic(11, 600)
    paths = lr.materialize(spec)
    p = plan(lr.closure_of(spec, paths, [spec.roots[0]]), [paths[spec.roots[0]]])
    assert p.layers[-1].paths == (paths[spec.roots[0]],)
    assert len(p.layers) <= 99
    assert all(layer.size >= 1 << 20 for layer in p.layers[:-1]), "no tiny layers"


@pytest.mark.parametrize("seed", [0, 1])
def test_unrelated_change_leaves_other_layers_alone(seed: int) -> None:
    lr = bench()
    spec = lr.synthetic(seed, 300)
    root = spec.roots[0]
    old_paths = lr.materialize(spec)
    old = plan(lr.closure_of(spec, old_paths, [root]), [old_paths[root]])
    leaves = [i for i, k in enumerate(spec.kinds) if k == "leaf"][:5]
    for leaf in leaves:
        new_paths = lr.materialize(spec, frozenset({leaf}))
        new = plan(lr.closure_of(spec, new_paths, [root]), [new_paths[root]])
        changed = {old_paths[i] for i in old_paths if old_paths[i] != new_paths[i]}
        untouched = [layer.paths for layer in old.layers if changed.isdisjoint(layer.paths)]
        assert untouched, "some layers hold no changed path"
        assert set(untouched) <= {layer.paths for layer in new.layers}
        assert len(new.layers) == len(old.layers)


@pytest.mark.parametrize(("seed", "n"), [(0, 400), (1, 400), (2, 150), (3, 700)])
def test_download_within_5_points_of_ideal(seed: int, n: int) -> None:
    lr = bench()
    spec = lr.synthetic(seed, n)
    root = spec.roots[0]
    old_paths = lr.materialize(spec)
    old = lr.closure_of(spec, old_paths, [root])
    p_old = plan(old, [old_paths[root]])
    for scenario, changed in lr.scenarios(spec, seed).items():
        new_paths = lr.materialize(spec, changed)
        new = lr.closure_of(spec, new_paths, [root])
        p_new = plan(new, [new_paths[root]])
        ideal = lr.ideal_share(old, new)
        share = lr.download_share(p_old, p_new)
        assert share >= ideal - 1e-9
        assert 100 * (share - ideal) <= 5, f"{scenario}: {share:.3f} vs ideal {ideal:.3f}"


def test_auto_beats_popularity_and_dominator_across_images() -> None:
    lr = bench()
    gap = {r.strategy: r.gap for r in lr.run_cross(0, 400) if r.scenario == "x-cross"}
    assert gap["auto"] < gap["dominator"] < gap["popularity"]


@pytest.mark.parametrize("seed", range(10))
def test_every_seed_within_5_points_at_400_paths(seed: int) -> None:
    """The goal holds per seed, not on average: a leaf-chunking variant had a
    mean of 4.2 but a worst seed of 7.3 points in scenario (c) at 1000 paths."""
    lr = bench()
    gaps = {
        r.scenario: r.gap
        for r in lr.run_updates(lr.synthetic(seed, 400), seed)
        if r.strategy == "auto"
    }
    assert set(gaps) == {"a-app", "b-midlib", "c-leaflib"}
    assert max(gaps.values()) <= 5, gaps
