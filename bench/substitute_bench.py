#!/usr/bin/env python3
"""Substitution alone: a closure from a signed binary cache into an empty local store.

Usage: python bench/substitute_bench.py [--cache /var/cache/stowaway/runtime-bench]
       [--workers 2] [--batch all|1] [--repeat 3] [--json]

Takes the snapshotter's substitution (``runtime.substitute.Substituter``) apart from
containerd, the layer proof and stub trees: every path of the cache (by default the
signed zstd ``file://`` cache runtime_bench.py made of the realistic closure) fetched
into a new directory under /var/tmp, on a pool of ``--workers`` threads. ``--batch all``
is one ``fetch_all`` of every path (one flush); ``--batch 1`` one call per path (a flush
each, as a layer of one path costs). Reports wall time and the process's CPU time
(user, system): on a shared machine the CPU time is the steadier number. Best of
``--repeat`` by wall time; every run starts after ``sync``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src")]

from stowaway.runtime.substitute import Substituter  # noqa: E402
from stowaway.store.binary_cache import BinaryCache  # noqa: E402
from stowaway.store.narinfo import PublicKey  # noqa: E402


def basenames(cache_dir: Path) -> list[str]:
    out = []
    for ni in cache_dir.glob("*.narinfo"):
        for line in ni.read_text().splitlines():
            if line.startswith("StorePath: "):
                out.append(line.rsplit("/", 1)[-1])
    return sorted(out)


def one_run(cache_root: Path, workers: int, batch: str) -> dict[str, float]:
    key = PublicKey.parse((cache_root / "key.pk").read_text().strip())
    cache = BinaryCache(f"file://{cache_root}/cache", [key])
    bases = basenames(cache_root / "cache")
    dest = Path(tempfile.mkdtemp(prefix="substitute-bench-", dir="/var/tmp"))
    try:
        sub = Substituter([cache], dest)
        subprocess.run(["sync"], check=True)
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            if batch == "all":
                got = sub.fetch_all(bases, pool)
            else:
                got = list(pool.map(sub.fetch, bases))
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        if not all(got):
            missing = [b for b, g in zip(bases, got, strict=True) if g is None]
            raise SystemExit(f"not substituted: {missing}")
        nar = sum(
            int(line.split()[1])
            for ni in (cache_root / "cache").glob("*.narinfo")
            for line in ni.read_text().splitlines()
            if line.startswith("NarSize: ")
        )
        return {
            "paths": len(bases),
            "nar_bytes": nar,
            "wall_s": wall,
            "user_s": after.ru_utime - before.ru_utime,
            "sys_s": after.ru_stime - before.ru_stime,
        }
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(dest)], check=False)
        shutil.rmtree(dest, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/var/cache/stowaway/runtime-bench"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", choices=["all", "1"], default="all")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (args.cache / "key.pk").is_file():
        print(f"{args.cache}: no cache; run bench/runtime_bench.py once", file=sys.stderr)
        return 1
    runs = [one_run(args.cache, args.workers, args.batch) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["wall_s"])
    every = [r["wall_s"] for r in runs]
    load = os.getloadavg()
    if args.json:
        print(json.dumps({**best, "every_wall_s": every, "load": load}, indent=2))
    else:
        print(
            f"{best['paths']} paths, {best['nar_bytes'] / 2**20:.0f} MiB of NAR, "
            f"{args.workers} workers, batch {args.batch}: best wall {best['wall_s']:.2f}s "
            f"(user {best['user_s']:.2f}s, sys {best['sys_s']:.2f}s); every wall: "
            + " ".join(f"{w:.2f}" for w in every)
            + f"; load {load[0]:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
