"""Properties every strategy must keep, and the errors for bad requests."""

from __future__ import annotations

import random

import pytest
from layering_helpers import MB, bench, closure, sp

from stowaway.errors import PlanError
from stowaway.layering import STRATEGIES, LayerPlan, plan
from stowaway.store.model import PathInfo

SMALL = {
    "app": (10_000, ["lib", "cfg"]),
    "lib": (5 * MB, ["glibc", "lib"]),  # self-reference, as Nix records them
    "cfg": (1_000, []),
    "glibc": (30 * MB, []),
}


def synthetic(seed: int, n: int) -> tuple[dict[str, PathInfo], str]:
    lr = bench()
    spec = lr.synthetic(seed, n)
    paths = lr.materialize(spec)
    root = paths[spec.roots[0]]
    return lr.closure_of(spec, paths, [spec.roots[0]]), root


def check(p: LayerPlan, c: dict[str, PathInfo], roots: list[str], max_layers: int) -> None:
    seen = [x for layer in p.layers for x in layer.paths]
    assert sorted(seen) == sorted(c), "every path exactly once"
    assert 1 <= len(p.layers) <= max_layers - 1
    for layer in p.layers:
        assert list(layer.paths) == sorted(layer.paths)
        assert layer.size == sum(c[x].nar_size for x in layer.paths)
    # roots sit in the topmost layers: no layer above a root layer lacks a root
    with_root = [i for i, layer in enumerate(p.layers) if set(layer.paths) & set(roots)]
    assert with_root == list(range(len(p.layers) - len(with_root), len(p.layers)))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("max_layers", [2, 3, 10, 100, 125])
def test_properties_on_synthetic_closure(strategy: str, max_layers: int) -> None:
    c, root = synthetic(3, 200)
    p = plan(c, [root], strategy=strategy, max_layers=max_layers)
    assert p.strategy == strategy
    check(p, c, [root], max_layers)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_deterministic_whatever_the_mapping_order(strategy: str) -> None:
    c, root = synthetic(4, 150)
    items = list(c.items())
    random.Random(1).shuffle(items)
    assert plan(dict(items), [root], strategy=strategy) == plan(c, [root], strategy=strategy)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_several_roots_and_tiny_budget(strategy: str) -> None:
    c = closure(SMALL)
    roots = [sp("app"), sp("cfg")]
    for max_layers in (2, 3, 4, 6):
        check(plan(c, roots, strategy=strategy, max_layers=max_layers), c, roots, max_layers)


@pytest.mark.parametrize("max_layers", [126, 1000, 1, 0, -5])
def test_refuses_layer_counts_outside_2_to_125(max_layers: int) -> None:
    with pytest.raises(PlanError, match="between 2 and 125") as err:
        plan(closure(SMALL), [sp("app")], max_layers=max_layers)
    assert "125-127" in str(err.value)


def test_accepts_the_limits() -> None:
    assert len(plan(closure(SMALL), [sp("app")], max_layers=2).layers) == 1
    assert len(plan(closure(SMALL), [sp("app")], max_layers=125).layers) >= 1


def test_unknown_strategy_lists_the_choices() -> None:
    with pytest.raises(PlanError, match="'best'.*auto, dominator, popularity"):
        plan(closure(SMALL), [sp("app")], strategy="best")


def test_reference_outside_the_closure_is_named() -> None:
    c = closure(SMALL)
    del c[sp("glibc")]
    with pytest.raises(PlanError, match=f"{sp('lib')} references {sp('glibc')}"):
        plan(c, [sp("app")])


def test_root_outside_the_closure() -> None:
    with pytest.raises(PlanError, match=f"root {sp('nope')} is not in the closure"):
        plan(closure(SMALL), [sp("nope")])


def test_empty_requests() -> None:
    with pytest.raises(PlanError, match="empty closure"):
        plan({}, [sp("app")])
    with pytest.raises(PlanError, match="at least one root"):
        plan(closure(SMALL), [])


def test_cycle_is_refused() -> None:
    c = closure({"a": (1, ["b"]), "b": (1, ["a"]), "app": (1, ["a"])})
    with pytest.raises(PlanError, match="reference cycle among 2 store paths"):
        plan(c, [sp("app")])


def test_mismatched_path_info() -> None:
    c = closure(SMALL)
    c[sp("cfg")] = c[sp("lib")]
    with pytest.raises(PlanError, match=f"entry {sp('cfg')} holds PathInfo for .*lib"):
        plan(c, [sp("app")])
