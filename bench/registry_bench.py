#!/usr/bin/env python3
"""Registry benchmark: `stowaway serve` side by side with Debian's docker-registry
(distribution 2.8) serving the same image on this machine, over loopback.

(a) first pull of a new name: time from request to manifest on a fresh server with an
    empty layer cache vs the wall time of `stowaway build` of the same image (same
    contents and env) into an OCI layout with an empty cache — goal ≤ 1.2×;
(b) cached-manifest latency p50/p99 and request rate at 1 and 64 concurrent clients
    (an aiohttp load generator; bounded by --requests and --seconds) — the stowaway
    name is an on-demand one, so every request goes through the resolver's cache;
(c) blob throughput: GET the largest layer repeatedly (1 and 4 clients) — goal ≥ 0.8×.

The reference registry gets the image by `stowaway build -o docker://…`; the two
manifests are byte-identical (checked), so both serve exactly the same bytes.

Usage: python bench/registry_bench.py [--fixture realistic|medium|demo] [--repeat N]
                                      [--requests N] [--seconds S] [--json] [--work DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
STOWAWAY = str(Path(sys.executable).parent / "stowaway")
FIXTURE_SCRIPT = ROOT / "scripts" / "realistic-fixture.py"
SUMMARIES = Path("/var/cache/stowaway")
OCI = "application/vnd.oci.image.manifest.v1+json"
ENV = "PATH=/bin:/usr/bin:/sbin:/usr/sbin"  # what `stowaway serve` sets by default
MIB = 1024 * 1024

sys.path.insert(0, str(ROOT / "tests"))
from daemons import Registry, free_port  # noqa: E402  (test harness, not a package)


def fixture_app(variant: str) -> str:
    """The app store path of a fixture (built when missing)."""
    if variant == "demo":
        out = subprocess.run(
            ["nix-build", str(ROOT / "fixtures" / "demo.nix"), "--no-out-link"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        return out.strip().splitlines()[-1]
    summary = SUMMARIES / f"{variant}.json"
    if summary.exists():
        app = str(json.loads(summary.read_text())["app"])
        if os.path.exists(app):
            return app
    subprocess.run([sys.executable, str(FIXTURE_SCRIPT), "--variant", variant], check=True)
    return str(json.loads(summary.read_text())["app"])


class Serve:
    """`stowaway serve` as a process on a free loopback port."""

    def __init__(self, work: Path, index: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = work
        self.log = open(work.with_suffix(".log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [STOWAWAY, "serve", "--listen", f"127.0.0.1:{self.port}", "--storage", str(work),
             "--index", str(index)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        for _ in range(400):
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"stowaway serve did not start; log {self.log.name}")

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def get(url: str, accept: str = OCI) -> tuple[bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read(), dict(r.headers)


def first_pull(app: str, work: Path, repeat: int) -> dict[str, float]:
    """Best-of-N times: serve's first pull (fresh server, empty cache) vs build.
    The order alternates and dirty pages are synced before each timed step, so
    neither side pays for the other's writeback."""
    index = work / "index.json"
    index.write_text(json.dumps({"packages": {"app": app}}))
    pulls: list[float] = []
    builds: list[float] = []

    def build(i: int) -> None:
        build_cache = work / f"build-cache-{i}"
        layout = work / f"layout-{i}"
        cmd = [STOWAWAY, "build", app, "--contents", app, "--env", ENV,
               "-o", f"oci:{layout}:x", "--cache-dir", str(build_cache), "--json"]  # fmt: skip
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        builds.append(time.perf_counter() - t0)
        shutil.rmtree(build_cache)
        shutil.rmtree(layout)

    def pull(i: int) -> None:
        server = Serve(work / f"serve-{i}", index)
        try:
            os.sync()
            t0 = time.perf_counter()
            get(f"{server.url}/v2/app/manifests/latest")
            pulls.append(time.perf_counter() - t0)
        finally:
            server.stop()
            if i < repeat - 1:
                shutil.rmtree(work / f"serve-{i}")

    for i in range(repeat):
        steps = (build, pull) if i % 2 == 0 else (pull, build)
        for step in steps:
            step(i)
    return {"first_pull_s": min(pulls), "build_s": min(builds)}


async def load(
    url: str, clients: int, requests: int, seconds: float, accept: str
) -> dict[str, Any]:
    """Latencies of GETs of ``url`` by ``clients`` concurrent workers (bounded)."""
    latencies: list[float] = []
    sent = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                t0 = time.perf_counter()
                async with session.get(url, headers={"Accept": accept}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url}: HTTP {resp.status}")
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": len(latencies),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "rps": len(latencies) / elapsed,
    }


async def throughput(url: str, clients: int, size: int, seconds: float) -> dict[str, Any]:
    """MiB/s of repeated full GETs of one blob by ``clients`` workers for ``seconds``."""
    total = 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def worker() -> None:
            nonlocal total
            while time.perf_counter() < deadline:
                async with session.get(url) as resp:
                    got = 0
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        got += len(chunk)
                    if got != size:
                        raise RuntimeError(f"{url}: got {got} bytes, want {size}")
                    total += got

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"mib_s": total / MIB / elapsed, "bytes": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture", choices=["realistic", "medium", "demo"], default="realistic")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    app = fixture_app(args.fixture)
    work = args.work or Path(tempfile.mkdtemp(prefix="registry-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"fixture": args.fixture, "app": app}
    try:
        results.update(first_pull(app, work, args.repeat))
        server = Serve(work / "serve-warm", work / "index.json")
        reference = Registry(work / "reference")
        reference.start()
        try:
            subprocess.run(
                [STOWAWAY, "build", app, "--contents", app, "--env", ENV, "--cache-dir",
                 str(work / "serve-warm"), "-o", f"docker://{reference.host}/app:latest",
                 "--dest-tls-verify=false"],
                check=True, capture_output=True,
            )  # fmt: skip
            ours_url = f"{server.url}/v2/app/manifests/latest"
            ref_url = f"{reference.url}/v2/app/manifests/latest"
            ours, _ = get(ours_url)
            theirs, _ = get(ref_url)
            results["same_manifest"] = ours == theirs
            layer = max(json.loads(ours)["layers"], key=lambda d: d["size"])
            results["layer_bytes"] = layer["size"]
            for who, base, murl in (
                ("stowaway", server.url, ours_url),
                ("reference", reference.url, ref_url),
            ):
                for c in (1, 64):
                    r = asyncio.run(load(murl, c, args.requests, args.seconds, OCI))
                    results[f"{who}_manifest_c{c}"] = r
                blob_url = f"{base}/v2/app/blobs/{layer['digest']}"
                for c in (1, 4):
                    r = asyncio.run(throughput(blob_url, c, layer["size"], args.seconds))
                    results[f"{who}_blob_c{c}"] = r
        finally:
            server.stop()
            reference.stop()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report(results, args.json)
    return 0


def report(r: dict[str, Any], as_json: bool) -> None:
    rows = [("first pull / build time", r["first_pull_s"], r["build_s"], "≤ 1.2× (lower better)")]
    for c in (1, 64):
        s, t = r[f"stowaway_manifest_c{c}"], r[f"reference_manifest_c{c}"]
        rows.append((f"manifest p50 ms, {c} clients", s["p50_ms"], t["p50_ms"], "comparable"))
        rows.append((f"manifest p99 ms, {c} clients", s["p99_ms"], t["p99_ms"], "comparable"))
        rows.append((f"manifest req/s, {c} clients", s["rps"], t["rps"], "≥ 0.8×"))
    for c in (1, 4):
        s, t = r[f"stowaway_blob_c{c}"], r[f"reference_blob_c{c}"]
        rows.append((f"blob MiB/s, {c} clients", s["mib_s"], t["mib_s"], "≥ 0.8×"))
    r["table"] = [
        {"metric": m, "stowaway": a, "reference": b, "ratio": a / b if b else None, "goal": g}
        for m, a, b, g in rows
    ]
    if as_json:
        print(json.dumps(r, indent=2))
        return
    print(f"fixture {r['fixture']}: {r['app']}; largest layer {r['layer_bytes'] / MIB:.1f} MiB; "
          f"identical manifests: {r['same_manifest']}")  # fmt: skip
    print(f"{'metric':32} {'stowaway':>10} {'reference':>10} {'ratio':>7}  goal")
    for row in r["table"]:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        print(f"{row['metric']:32} {row['stowaway']:10.2f} {row['reference']:10.2f} {ratio:>7}  "
              f"{row['goal']}")  # fmt: skip
    print("(first row: 'reference' is `stowaway build` of the same image)")


if __name__ == "__main__":
    sys.exit(main())
