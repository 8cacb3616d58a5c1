"""Plans for the real demo closure built by nix (tests/conftest.py)."""

from __future__ import annotations

import subprocess

import pytest

from stowaway.layering import STRATEGIES, plan
from stowaway.store.model import PathInfo


def query(flag: str, path: str) -> list[str]:
    out = subprocess.run(
        ["nix-store", "-q", flag, path], check=True, capture_output=True, text=True
    )
    return out.stdout.split()


@pytest.fixture(scope="module")
def demo_infos(demo_closure: list[str]) -> dict[str, PathInfo]:
    return {
        p: PathInfo(
            path=p,
            nar_hash=query("--hash", p)[0],
            nar_size=int(query("--size", p)[0]),
            references=tuple(sorted(query("--references", p))),
        )
        for p in demo_closure
    }


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_demo_closure_plans(strategy: str, demo_app: str, demo_infos: dict[str, PathInfo]) -> None:
    assert len(demo_infos) == 3
    p = plan(demo_infos, [demo_app], strategy=strategy)
    assert sorted(x for layer in p.layers for x in layer.paths) == sorted(demo_infos)
    assert demo_app in p.layers[-1].paths
    assert sum(layer.size for layer in p.layers) == sum(i.nar_size for i in demo_infos.values())


def test_demo_closure_auto(demo_app: str, demo_infos: dict[str, PathInfo]) -> None:
    p = plan(demo_infos, [demo_app])
    assert p.layers[-1].paths == (demo_app,)
    busybox = next(x for x in demo_infos if x.endswith("-busybox"))
    # busybox (> 1 MiB) is big enough to be alone
    assert (busybox,) in [layer.paths for layer in p.layers]
