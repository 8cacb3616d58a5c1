"""A named layer base (``plan(..., base_roots=...)``): its closure is planned on its
own, so every image over it gets the same bottom layers."""

from __future__ import annotations

import random

import pytest
from layering_helpers import MB, bench, closure, sp

from stowaway.errors import PlanError
from stowaway.layering import STRATEGIES, LayerPlan, base_budget, plan
from stowaway.store.model import PathInfo

SMALL = {
    "app": (10_000, ["lib", "cfg", "shell"]),
    "lib": (5 * MB, ["glibc"]),
    "cfg": (1_000, []),
    "shell": (2 * MB, ["glibc", "readline"]),
    "readline": (400_000, ["glibc"]),
    "glibc": (30 * MB, []),
}


def two_apps(seed: int, n: int) -> tuple[dict[str, PathInfo], dict[str, PathInfo], list[str]]:
    """Two apps over one runtime environment (the bench's generator): their closures
    and the base's root."""
    lr = bench()
    spec = lr.synthetic(seed, n, apps=2)
    paths = lr.materialize(spec)
    a, b = (lr.closure_of(spec, paths, [r]) for r in spec.roots)
    return a, b, [paths[i] for i in spec.base]


def roots_of(c: dict[str, PathInfo]) -> list[str]:
    referenced = {r for i in c.values() for r in i.references}
    return sorted(set(c) - referenced)


def base_part(p: LayerPlan) -> list[tuple[str, ...]]:
    return [layer.paths for layer in p.layers[: p.base_layers]]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_two_images_over_one_base_share_its_layers_exactly(strategy: str) -> None:
    a, b, base = two_apps(1, 400)
    pa = plan(a, roots_of(a), strategy=strategy, base_roots=base)
    pb = plan(b, roots_of(b), strategy=strategy, base_roots=base)
    assert pa.base_layers > 10
    assert base_part(pa) == base_part(pb)
    # exactly the plan of the base as an image of its own, on the base's share
    lr = bench()
    spec = lr.synthetic(1, 400, apps=2)
    alone = lr.closure_of(spec, lr.materialize(spec), list(spec.base))
    own = plan(alone, base, strategy=strategy, max_layers=base_budget(100) + 1)
    assert base_part(pa) == [layer.paths for layer in own.layers]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("max_layers", [3, 4, 10, 100, 125])
def test_every_path_once_base_below_within_the_bound(strategy: str, max_layers: int) -> None:
    a, _, base = two_apps(2, 300)
    p = plan(a, roots_of(a), strategy=strategy, max_layers=max_layers, base_roots=base)
    seen = [x for layer in p.layers for x in layer.paths]
    assert sorted(seen) == sorted(a)
    assert 2 <= len(p.layers) <= max_layers - 1
    assert 1 <= p.base_layers <= base_budget(max_layers)
    lr = bench()
    spec = lr.synthetic(2, 300, apps=2)
    in_base = set(lr.closure_of(spec, lr.materialize(spec), list(spec.base)))
    assert {x for paths in base_part(p) for x in paths} == in_base
    assert set(roots_of(a)) <= set(p.layers[-1].paths)  # the app on top


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_deterministic_whatever_the_order(strategy: str) -> None:
    c = closure(SMALL)
    base = [sp("shell"), sp("lib")]
    items = list(c.items())
    random.Random(4).shuffle(items)
    one = plan(c, [sp("app")], strategy=strategy, max_layers=5, base_roots=base)
    two = plan(dict(items), [sp("app")], strategy=strategy, max_layers=5, base_roots=base[::-1])
    assert one == two
    assert one.base_layers >= 1


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_no_base_is_the_plain_plan(strategy: str) -> None:
    a, _, _ = two_apps(0, 300)
    p = plan(a, roots_of(a), strategy=strategy, base_roots=())
    assert p == plan(a, roots_of(a), strategy=strategy)
    assert p.base_layers == 0


def test_small_base_layers_by_hand() -> None:
    """shell's closure (glibc, readline, shell) is planned as its own image would be,
    at the bottom, shell (its root) on top of it; app, cfg and lib above. Without the
    base, cfg and lib (widely shared first) sit between glibc and readline."""
    p = plan(closure(SMALL), [sp("app")], base_roots=[sp("shell")])
    names = [[x.split("-", 1)[1] for x in layer.paths] for layer in p.layers]
    assert p.base_layers == 3
    assert names == [["glibc"], ["readline"], ["shell"], ["cfg"], ["lib"], ["app"]]
    alone = {"shell": SMALL["shell"], "readline": SMALL["readline"], "glibc": SMALL["glibc"]}
    assert p.layers[:3] == plan(closure(alone), [sp("shell")], max_layers=81).layers
    assert [
        [x.split("-", 1)[1] for x in layer.paths]
        for layer in plan(closure(SMALL), [sp("app")]).layers
    ] == [["glibc"], ["cfg"], ["lib"], ["readline"], ["shell"], ["app"]]


def test_the_whole_closure_as_base() -> None:
    c = closure(SMALL)
    p = plan(c, [sp("app")], base_roots=[sp("app")])
    assert p.base_layers == len(p.layers)
    assert p.layers == plan(c, [sp("app")], max_layers=base_budget(100) + 1).layers


def test_base_outside_the_closure_is_named() -> None:
    with pytest.raises(PlanError, match="nope.*not in the image's closure") as err:
        plan(closure(SMALL), [sp("app")], base_roots=[sp("shell"), sp("nope")])
    assert err.value.hint


def test_base_needs_room() -> None:
    with pytest.raises(PlanError, match="no room"):
        plan(closure(SMALL), [sp("app")], max_layers=2, base_roots=[sp("shell")])


@pytest.mark.parametrize("seed", range(5))
def test_second_app_over_a_named_base_and_updates(seed: int) -> None:
    """The goal at 400 paths: the second app's gap under 1 point with the base named
    (it is ~10 without), and every update of the first still within 5 points."""
    lr = bench()
    cross = {(r.strategy, r.scenario): r.gap for r in lr.run_cross(seed, 400)}
    assert cross["auto", "x+base"] < 1.0 < cross["auto", "x-cross"]
    ups = lr.run_updates(lr.synthetic(seed, 400, apps=2), seed, with_base=True)
    gaps = {r.scenario: r.gap for r in ups if r.strategy == "auto"}
    assert set(gaps) == {"a+base", "b+base", "c+base"}
    assert max(gaps.values()) <= 5.0, gaps
