#!/usr/bin/env python3
"""Scale benchmark: stowaway on a synthetic 5,000-path / 5 GiB closure.

The closure comes from bench/synthetic_closure.py (registered in /nix/store once, reused
by later runs). Measured in one run (best of --repeat; the machine is shared):

(a) `stowaway plan APP --json`, whole process — goal < 1 s;
(b) peak RSS (wait4's ru_maxrss) of every timed `stowaway build` — goal <= 256 MiB;
(c) cold build (empty cache, gzip 6) vs ``tar -cf - CLOSURE | pigz -p 2 -6 | sha256sum``,
    interleaved — goal >= 0.9x the floor's throughput;
(d) warm rebuild after the app changes (--app-salt), into hard-linked copies of the cold
    build's cache and layout — goal <= 2 % of the cold build;
(e) `stowaway serve` (storage = the cold build's cache, so the image is composed from
    cached layers) and Debian's docker-registry 2.8 (the same image pushed by `stowaway
    build -o docker://`; manifests checked byte-identical) each serving --clients
    concurrent pulls of the whole image (manifest, config, every layer; one curl process
    per client, layers in a per-client shuffled order, the same orders for both servers),
    alternated per --pull-repeat — goal: stowaway as fast.

Usage: python bench/scale_bench.py [--paths 5000] [--size 5G] [--seed 1] [--repeat 2]
                                   [--clients 64] [--pull-repeat 1] [--json] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from compose_bench import (  # noqa: E402  (sibling scripts, not a package)
    MIB,
    STOWAWAY,
    BenchError,
    Run,
    best,
    build_cmd,
    floor_cmd,
    fresh,
    relink,
    run_in_work,
    timed,
)
from registry_bench import ENV, OCI, Serve, get  # noqa: E402
from synthetic_closure import parse_size  # noqa: E402

from daemons import Registry  # noqa: E402  (tests/ is on sys.path via compose_bench)

GENERATOR = BENCH / "synthetic_closure.py"


def fixture(paths: int, size: int, seed: int, salt: str, work: Path) -> dict[str, Any]:
    """Register (or find) the synthetic closure; return the generator's summary."""
    out = work / f"fixture-{salt or 'base'}.json"
    cmd = [sys.executable, str(GENERATOR), "--paths", str(paths), "--size", str(size),
           "--seed", str(seed), "--app-salt", salt, "--json-out", str(out)]  # fmt: skip
    run = timed(cmd)
    summary: dict[str, Any] = json.loads(out.read_text())
    summary["generator_seconds"] = run.seconds
    return summary


def image_cmd(app: str, target: str, cache: Path, *extra: str) -> list[str]:
    """The same image `stowaway serve` composes for an index entry (contents + env)."""
    return build_cmd(app, target, cache, "--contents", app, "--env", ENV, *extra)


def pull_clients(base: str, manifest: bytes, clients: int, seed: int, work: Path) -> dict[str, Any]:
    """``clients`` curl processes at once, each GETting the manifest, the config and every
    layer; returns wall time, aggregate MiB/s and the slowest client's time."""
    doc = json.loads(manifest)
    blobs = [doc["config"], *doc["layers"]]
    total = len(manifest) + sum(int(b["size"]) for b in blobs)
    procs = []
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for i in range(clients):
        order = list(blobs)
        rng.shuffle(order)
        urls = [f"{base}/v2/app/manifests/latest"]
        urls += [f"{base}/v2/app/blobs/{b['digest']}" for b in order]
        args = ["curl", "-sS", "--fail", "-H", f"Accept: {OCI}", "-w", "%{size_download}\n"]
        for u in urls:
            args += ["-o", "/dev/null", u]
        log = open(work / f"curl-{i}.err", "wb")  # noqa: SIM115
        procs.append((subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log), log))
    ends: list[float] = []
    for proc, log in procs:
        out, _ = proc.communicate()
        ends.append(time.perf_counter() - t0)
        log.close()
        got = sum(int(x) for x in out.split())
        if proc.returncode != 0 or got != total:
            err = Path(log.name).read_text()[-500:]
            raise BenchError(f"pull from {base}: curl {proc.returncode}, {got}/{total} B: {err}")
    wall = max(ends)
    return {"wall_s": wall, "mib_s": clients * total / MIB / wall, "bytes": clients * total}


def note(res: dict[str, Any], work: Path, step: str) -> None:
    """Progress on stderr and the results so far in WORK/partial.json: a long run
    killed late still leaves its numbers."""
    print(f"scale_bench: {time.strftime('%H:%M:%S')} {step} done", file=sys.stderr)
    (work / "partial.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")


def serve_side_by_side(
    res: dict[str, Any], app: str, cache: Path, work: Path, clients: int, repeat: int, seed: int
) -> None:
    """The pull rows, added to ``res``."""
    index = work / "index.json"
    index.write_text(json.dumps({"packages": {"app": app}}))
    relink(cache, work / "serve")()
    relink(cache, work / "push-cache")()
    fresh(work / "reference")()
    server = Serve(work / "serve", index)
    reference = Registry(work / "reference")
    reference.start()
    try:
        t0 = time.perf_counter()
        ours, _ = get(f"{server.url}/v2/app/manifests/latest")
        res["serve_first_manifest_s"] = time.perf_counter() - t0
        push = timed(image_cmd(app, f"docker://{reference.host}/app:latest",
                               work / "push-cache", "--dest-tls-verify=false"))  # fmt: skip
        res["push_s"] = push.seconds
        theirs, _ = get(f"{reference.url}/v2/app/manifests/latest")
        if ours != theirs:
            raise BenchError("stowaway serve and docker-registry return different manifests")
        res["image_bytes"] = len(ours) + sum(
            int(b["size"]) for b in [json.loads(ours)["config"], *json.loads(ours)["layers"]]
        )
        sides = {"stowaway": server.url, "reference": reference.url}
        for who, url in sides.items():  # one client first: warms the page cache
            res[f"{who}_c1"] = pull_clients(url, ours, 1, seed, work)
            note(res, work, f"{who}: 1 client")
        runs: dict[str, list[dict[str, Any]]] = {who: [] for who in sides}
        for i in range(repeat):
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for who in order:
                runs[who].append(pull_clients(sides[who], ours, clients, seed + i, work))
                res[f"{who}_cN_runs"] = runs[who]
                note(res, work, f"{who}: {clients} clients")
        for who, rs in runs.items():
            res[f"{who}_cN"] = min(rs, key=lambda r: r["wall_s"])
            res[f"{who}_cN_all_s"] = [round(r["wall_s"], 2) for r in rs]
    finally:
        server.stop()
        reference.stop()


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = fixture(args.paths, args.size, args.seed, "", work)
    app_v = fixture(args.paths, args.size, args.seed, "bench1", work)
    app, nar = base["app"], int(base["nar_size"])
    res: dict[str, Any] = {
        "paths": base["count"],
        "nar_size": nar,
        "repeat": args.repeat,
        "generator_first_import_s": base["import_seconds"] if base["imported"] else None,
    }
    plans = best(5, [str(STOWAWAY), "plan", app, "--json"])
    res["plan_s"] = plans[0].seconds
    res["plan_layers"] = len(json.loads(plans[0].stdout)["layers"])
    rss = [r.max_rss for r in plans]
    note(res, work, "plan")

    cache, out = work / "cache", work / "out"
    floor: list[Run] = []
    cold: list[Run] = []
    for _ in range(args.repeat):  # interleaved: both see the same background load
        floor.append(timed(floor_cmd(base["closure"])))
        cold.append(timed(image_cmd(app, f"oci:{out}:base", cache), fresh(cache, out)))
        res["floor_all_s"] = [round(r.seconds, 2) for r in floor]
        res["cold_all_s"] = [round(r.seconds, 2) for r in cold]
        note(res, work, "floor + cold build")
    fastest_floor = min(floor, key=lambda r: r.seconds)
    fastest_cold = min(cold, key=lambda r: r.seconds)
    res["floor_s"], res["cold_s"] = fastest_floor.seconds, fastest_cold.seconds
    res["cold_vs_floor"] = fastest_floor.seconds / fastest_cold.seconds
    layers = json.loads(fastest_cold.stdout)["layers"]
    res["layers"] = len(layers)
    res["compressed_bytes"] = sum(int(la["size"]) for la in layers)
    res["build_rss"] = [r.max_rss for r in cold]

    wcache, wout = work / "cache-app", work / "out-app"

    def prepare() -> None:
        relink(cache, wcache)()
        relink(out, wout)()

    warm_cmd = image_cmd(app_v["app"], f"oci:{wout}:app", wcache)
    warm = best(max(3, args.repeat), warm_cmd, prepare)
    res["warm_app_s"] = warm[0].seconds
    res["warm_app_ratio"] = warm[0].seconds / fastest_cold.seconds
    res["warm_app_rebuilt_layers"] = sum(
        not la["reused"] for la in json.loads(warm[0].stdout)["layers"]
    )
    res["build_rss"] += [r.max_rss for r in warm]
    res["peak_rss"] = max(res["build_rss"])
    res["plan_rss"] = max(rss)
    fresh(wcache, wout)()
    note(res, work, "warm rebuild")

    serve_side_by_side(res, app, cache, work, args.clients, args.pull_repeat, args.seed)
    res["clients"] = args.clients
    return res


def table(r: dict[str, Any]) -> str:
    mb = 1e6
    thr = r["nar_size"] / mb
    s, t = r["stowaway_cN"], r["reference_cN"]
    rows = [
        ("fixture", f"{r['paths']} paths, {r['nar_size'] / mb:.0f} MB NAR, {r['layers']} layers, "
                    f"{r['compressed_bytes'] / mb:.0f} MB gzip", ""),  # fmt: skip
        ("plan (whole process)", f"{r['plan_s']:.2f} s, {r['plan_layers']} layers", "goal < 1 s"),
        ("floor tar|pigz|sha256", f"{r['floor_s']:.1f} s  {thr / r['floor_s']:.0f} MB/s", ""),
        ("cold build (gzip 6)", f"{r['cold_s']:.1f} s  {thr / r['cold_s']:.0f} MB/s", ""),
        ("  cold / floor throughput", f"{r['cold_vs_floor']:.2f}x", "goal >= 0.9x"),
        ("warm after app change", f"{r['warm_app_s']:.2f} s ({r['warm_app_rebuilt_layers']} "
                                  "layers built)", ""),  # fmt: skip
        ("  warm / cold", f"{100 * r['warm_app_ratio']:.2f} %", "goal <= 2 %"),
        ("peak RSS of build", f"{r['peak_rss'] / MIB:.0f} MiB (plan {r['plan_rss'] / MIB:.0f})",
         "goal <= 256 MiB"),
        ("serve: first manifest", f"{r['serve_first_manifest_s']:.2f} s (layers cached)", ""),
        ("1 client, all blobs", f"stowaway {r['stowaway_c1']['mib_s']:.0f} MiB/s, "
                                f"registry {r['reference_c1']['mib_s']:.0f} MiB/s", ""),
        (f"{r['clients']} clients, all blobs",
         f"stowaway {s['wall_s']:.1f} s {s['mib_s']:.0f} MiB/s, "
         f"registry {t['wall_s']:.1f} s {t['mib_s']:.0f} MiB/s", ""),
        ("  stowaway / registry", f"{s['mib_s'] / t['mib_s']:.2f}x", "goal >= 1x"),
    ]  # fmt: skip
    return "\n".join(f"{a:<28} {b:<60} {c}".rstrip() for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--paths", type=int, default=5000)
    ap.add_argument("--size", type=parse_size, default=parse_size("5G"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="runs per timing (best is kept)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent pulls of the image")
    ap.add_argument("--pull-repeat", type=int, default=1, help="runs of the --clients pulls")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--work", type=Path, help="work dir (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    result = run_in_work("scale_bench", args.work, lambda work: bench(args, work))
    if result is None:
        return 1
    if args.work is not None:
        (args.work / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1, sort_keys=True) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
