"""How much of an updated image must a client download, per layering strategy?

Generates realistic synthetic closures (deterministic seed) or reads a real one
(``--root /nix/store/...``), simulates updates the way Nix does them (a path
that changes gives new hashes to every path depending on it, transitively), and
compares each strategy's download share with the ideal (the bytes of new store
paths).

    python bench/layer_reuse.py                        # synthetic, several seeds
    python bench/layer_reuse.py --paths 1000 --json
    python bench/layer_reuse.py --root /nix/store/...-app

Scenarios: (a) only the app changes; (b) a mid-level library changes;
(c) a leaf library changes; (x) a second app over the same base, pulled by a
client that holds the first app's image. "+base" rows plan with the base the
apps are built over named (``plan(..., base_roots=...)``): (x+base) the second
app; (a+base)-(c+base) updates of the first app of that closure, the changed path
picked in its closure (in the base or not).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stowaway.layering import LayerPlan, plan
from stowaway.store.model import PathInfo

STRATEGIES = ("popularity", "dominator", "auto")
NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
MB = 1_000_000


@dataclass(frozen=True)
class Spec:
    """A closure's shape, independent of hashes: names, sizes, references by
    index, and the roots. ``kind`` says what a node plays (glibc, leaf, mid, ...)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    deps: tuple[tuple[int, ...], ...]
    kinds: tuple[str, ...]
    roots: tuple[int, ...]
    #: the roots of the base every app is built over (two apps or more)
    base: tuple[int, ...] = ()


def synthetic(seed: int, n: int = 400, apps: int = 1) -> Spec:
    """A closure shaped like a real Nix one: glibc and a few base paths used by
    everything, leaf libraries over glibc, mid-level libraries over those, a few
    50-200 MB giants, and ``apps`` application paths on top. With two apps or
    more, a third of the top libraries make the base every app refers to, a
    runtime environment (``Spec.base``, like a ``buildEnv`` or ``python3.withPackages``
    the apps are built over); each app has its own share of the other tops."""
    rnd = random.Random(seed)
    names: list[str] = []
    sizes: list[int] = []
    deps: list[list[int]] = []
    kinds: list[str] = []

    def add(name: str, size: int, ds: Sequence[int], kind: str) -> int:
        names.append(name)
        sizes.append(size)
        deps.append(sorted(set(ds)))
        kinds.append(kind)
        return len(names) - 1

    def lognormal() -> int:
        return int(min(40 * MB, max(400, rnd.lognormvariate(math.log(150_000), 1.9))))

    glibc = add("glibc-2.39", 30 * MB, [], "base")
    gcc = add("gcc-13.2.0-lib", 8 * MB, [glibc], "base")
    base = [glibc, gcc]
    for name in ("tzdata-2024a", "iana-etc-20240318", "nss-cacert-3.98"):
        base.append(add(name, lognormal(), [], "data"))
    body = n - len(base) - apps
    n_leaf = body * 35 // 100
    leaves = [
        add(
            f"leaf{i}-1.{i % 7}",
            lognormal(),
            [glibc] + ([gcc] if rnd.random() < 0.3 else []),
            "leaf",
        )
        for i in range(n_leaf)
    ]
    lower = base + leaves
    unused = set(leaves)
    mids: list[int] = []
    for i in range(body - n_leaf):
        k = min(len(lower), rnd.randint(1, 6))
        pick = rnd.sample(lower[-120:], k // 2) + rnd.sample(lower, k - k // 2)
        if unused and rnd.random() < 0.6:
            pick.append(min(unused))
        unused.difference_update(pick)
        m = add(f"mid{i}-2.{i % 5}", lognormal(), [glibc, *pick], "mid")
        mids.append(m)
        lower.append(m)
    for g in rnd.sample(mids, min(len(mids), 4)):
        sizes[g] = rnd.randint(50, 200) * MB
    referenced = {d for ds in deps for d in ds}
    tops = [m for m in mids if m not in referenced]
    roots = []
    base = []
    if apps > 1:  # the runtime environment every app is built over
        env = [t for j, t in enumerate(tops) if j % (apps + 1) == apps]
        base.append(add("runtime-env-1.0", 20_000, env, "env"))
    for a in range(apps):
        own = rnd.sample(mids, min(len(mids), 12))
        share = tops if apps == 1 else [t for j, t in enumerate(tops) if j % (apps + 1) == a]
        roots.append(add(f"app{a}-1.0", 2 * MB + a, own + share + base, "app"))
    return Spec(
        tuple(names), tuple(sizes), tuple(map(tuple, deps)), tuple(kinds), tuple(roots), tuple(base)
    )


def materialize(spec: Spec, changed: frozenset[int] = frozenset()) -> dict[int, str]:
    """Store paths for each node; a node in ``changed`` gets a new hash, and so
    does everything depending on it (hashes cover the references)."""
    order = _topo(spec)
    path: dict[int, str] = {}
    for i in order:
        h = hashlib.sha256(f"{spec.names[i]}|{i in changed}".encode())
        for d in spec.deps[i]:
            h.update(path[d].encode())
        digest = "".join(NIX32[b % 32] for b in h.digest()[:32])
        path[i] = f"/nix/store/{digest}-{spec.names[i]}"
    return path


def _topo(spec: Spec) -> list[int]:
    """Dependencies before dependents."""
    seen: set[int] = set()
    out: list[int] = []
    for start in range(len(spec.names)):
        stack = [(start, False)]
        while stack:
            i, done = stack.pop()
            if done:
                out.append(i)
            elif i not in seen:
                seen.add(i)
                stack.append((i, True))
                stack.extend((d, False) for d in spec.deps[i] if d not in seen)
    return out


def closure_of(spec: Spec, paths: Mapping[int, str], roots: Sequence[int]) -> dict[str, PathInfo]:
    """PathInfo for everything ``roots`` reach."""
    todo, seen = list(roots), set(roots)
    while todo:
        for d in spec.deps[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return {
        paths[i]: PathInfo(
            path=paths[i],
            nar_hash="sha256:" + "0" * 52,
            nar_size=spec.sizes[i],
            references=tuple(sorted(paths[d] for d in spec.deps[i])),
        )
        for i in seen
    }


def download_share(old: LayerPlan, new: LayerPlan) -> float:
    """Share of the new image's bytes in layers whose path set the old image lacks."""
    have = {layer.paths for layer in old.layers}
    total = sum(layer.size for layer in new.layers)
    fetch = sum(layer.size for layer in new.layers if layer.paths not in have)
    return fetch / total if total else 0.0


def ideal_share(old: Mapping[str, PathInfo], new: Mapping[str, PathInfo]) -> float:
    """Share of the new closure's bytes in store paths the old one lacks."""
    total = sum(i.nar_size for i in new.values())
    return sum(i.nar_size for p, i in new.items() if p not in old) / total


def scenarios(
    spec: Spec, seed: int, within: frozenset[int] | None = None
) -> dict[str, frozenset[int]]:
    """The changed node for each update scenario (chosen by ``seed``, among
    ``within`` when given); prefers libraries with at least two users, skips a
    scenario with no candidate."""
    rnd = random.Random(seed * 7919 + 1)
    users: dict[int, int] = {}
    for ds in spec.deps:
        for d in ds:
            users[d] = users.get(d, 0) + 1
    out = {"a-app": frozenset({spec.roots[0]})}
    for name, kind in (("b-midlib", "mid"), ("c-leaflib", "leaf")):
        pool = [
            i
            for i, k in enumerate(spec.kinds)
            if k == kind and i not in spec.roots and (within is None or i in within)
        ]
        shared = [i for i in pool if users.get(i, 0) >= 2]
        if shared or pool:
            out[name] = frozenset({rnd.choice(shared or pool)})
    return out


@dataclass(frozen=True)
class Result:
    strategy: str
    scenario: str
    layers: int
    share: float
    ideal: float
    cpu_ms: float = 0.0  # CPU time of planning the new image

    @property
    def gap(self) -> float:
        """Percentage points downloaded beyond the ideal."""
        return 100 * (self.share - self.ideal)


def timed_plan(
    closure: Mapping[str, PathInfo],
    root: str,
    s: str,
    max_layers: int,
    base: Sequence[str] = (),
) -> tuple[LayerPlan, float]:
    """``plan`` and the CPU milliseconds it took (CPU, not wall: the machine is shared)."""
    t = time.process_time()
    p = plan(closure, [root], strategy=s, max_layers=max_layers, base_roots=base)
    return p, 1000 * (time.process_time() - t)


def run_updates(
    spec: Spec, seed: int, max_layers: int = 100, *, with_base: bool = False
) -> list[Result]:
    """Scenarios (a)-(c) for every strategy on one closure shape (the first app's
    closure; ``with_base``: the spec's base named, rows suffixed "+base")."""
    root = spec.roots[0]
    old_paths = materialize(spec)
    old = closure_of(spec, old_paths, [root])
    within = frozenset(i for i, p in old_paths.items() if p in old) if with_base else None
    out = []
    for name, changed in scenarios(spec, seed, within).items():
        new_paths = materialize(spec, changed)
        new = closure_of(spec, new_paths, [root])
        ideal = ideal_share(old, new)
        base_old = [old_paths[b] for b in spec.base] if with_base else []
        base_new = [new_paths[b] for b in spec.base] if with_base else []
        label = name[0] + "+base" if with_base else name
        for s in STRATEGIES:
            p_old = plan(
                old, [old_paths[root]], strategy=s, max_layers=max_layers, base_roots=base_old
            )
            p_new, ms = timed_plan(new, new_paths[root], s, max_layers, base_new)
            out.append(Result(s, label, len(p_new.layers), download_share(p_old, p_new), ideal, ms))
    return out


def run_cross(seed: int, n: int, max_layers: int = 100) -> list[Result]:
    """Scenario (x): two apps over one base; the client holds the first image.
    Measured twice on the same closures: as is, and with the base named (x+base)."""
    spec = synthetic(seed, n, apps=2)
    paths = materialize(spec)
    a, b = (closure_of(spec, paths, [r]) for r in spec.roots)
    ideal = ideal_share(a, b)
    out = []
    for label, base in (("x-cross", []), ("x+base", [paths[i] for i in spec.base])):
        for s in STRATEGIES:
            pa = plan(a, [paths[spec.roots[0]]], strategy=s, max_layers=max_layers, base_roots=base)
            pb, ms = timed_plan(b, paths[spec.roots[1]], s, max_layers, base)
            out.append(Result(s, label, len(pb.layers), download_share(pa, pb), ideal, ms))
    return out


def real_spec(root: str) -> Spec:
    """The shape of a real closure, read with the nix CLI."""
    out = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "path-info", "--json", "-r", root],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    infos = sorted(json.loads(out), key=lambda x: x["path"])
    index = {x["path"]: i for i, x in enumerate(infos)}
    names = [x["path"].split("-", 1)[1] for x in infos]
    deps = [tuple(sorted(index[r] for r in x["references"] if r != x["path"])) for x in infos]
    kinds = ["mid" if d else "leaf" for d in deps]
    kinds[index[root]] = "app"
    sizes = [x["narSize"] for x in infos]
    return Spec(tuple(names), tuple(sizes), tuple(deps), tuple(kinds), (index[root],))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="a real store path: use its closure's shape")
    ap.add_argument("--paths", type=int, default=400, help="synthetic closure size")
    ap.add_argument("--seeds", type=int, default=5, help="synthetic closures to average")
    ap.add_argument("--max-layers", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results: list[Result] = []
    if args.root:
        spec = real_spec(args.root)
        for seed in range(args.seeds):
            results += run_updates(spec, seed, args.max_layers)
    else:
        for seed in range(args.seeds):
            results += run_updates(synthetic(seed, args.paths), seed, args.max_layers)
            results += run_cross(seed, args.paths, args.max_layers)
            two = synthetic(seed, args.paths, apps=2)
            results += run_updates(two, seed, args.max_layers, with_base=True)
    rows = summarize(results)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        print(
            f"{'strategy':<11} {'scenario':<10} {'layers':>6} {'share%':>7} "
            f"{'ideal%':>7} {'gap':>6} {'worst':>6} {'cpu ms':>7}"
        )
        for r in rows:
            print(
                f"{r['strategy']:<11} {r['scenario']:<10} {r['layers']:>6.0f} {r['share']:>7.1f} "
                f"{r['ideal']:>7.1f} {r['gap']:>6.1f} {r['worst_gap']:>6.1f} {r['cpu_ms']:>7.0f}"
            )
    return 0


def summarize(results: Sequence[Result]) -> list[dict[str, float | str]]:
    """Means over seeds (and the worst gap, and the slowest plan's CPU time)
    per strategy and scenario."""
    rows: list[dict[str, float | str]] = []
    keys = sorted({(r.scenario, r.strategy) for r in results})
    for scenario, strategy in keys:
        rs = [r for r in results if r.scenario == scenario and r.strategy == strategy]
        k = len(rs)
        rows.append(
            {
                "strategy": strategy,
                "scenario": scenario,
                "runs": k,
                "layers": sum(r.layers for r in rs) / k,
                "share": 100 * sum(r.share for r in rs) / k,
                "ideal": 100 * sum(r.ideal for r in rs) / k,
                "gap": sum(r.gap for r in rs) / k,
                "worst_gap": max(r.gap for r in rs),
                "cpu_ms": max(r.cpu_ms for r in rs),
            }
        )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
