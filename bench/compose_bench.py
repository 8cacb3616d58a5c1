#!/usr/bin/env python3
"""Composer benchmark on the realistic fixture: is `stowaway build` near the hardware floor?

Measured in one run, side by side (best of --repeat, the machine is noisy):

(a) cold build (empty layer cache, gzip level 6) vs the physical floor
    ``tar -cf - CLOSURE | pigz -p 2 -6 | sha256sum`` — goal ≥ 0.8× the floor's throughput;
(b) warm rebuild after an app change and after a leaf-library change, into the previous
    output layout with the previous cache: whole process time / cold time — goal ≤ 5 %
    (the leaf change rebuilds its dependents' layers, so it is reported, not judged);
(c) peak RSS of the stowaway process (wait4's ru_maxrss) — goal ≤ 256 MB;
(d) push of the leaf-changed image to a private docker-registry that holds the base image:
    bytes sent to the registry (counted by a loopback proxy) and bytes it stored, vs the
    changed layers (``reused: false`` in ``--json``) + config + manifest.

Usage: python bench/compose_bench.py [--fixture realistic|medium] [--repeat N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_SCRIPT = ROOT / "scripts" / "realistic-fixture.py"
STOWAWAY = Path(sys.executable).parent / "stowaway"
MIB = 1024 * 1024

sys.path.insert(0, str(ROOT / "tests"))
from daemons import Registry, free_port  # noqa: E402  (test harness, not a package)


class BenchError(Exception):
    """A benchmark step that failed; the message names the command."""


@dataclass
class Run:
    seconds: float
    max_rss: int  # bytes, high-water mark of the process (and children it waited for)
    stdout: str


def timed(cmd: list[str], prepare: Callable[[], None] | None = None) -> Run:
    """Run cmd once, timing the whole process and reading its peak RSS via wait4."""
    if prepare is not None:
        prepare()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise BenchError(
                f"`{' '.join(cmd)[:300]}` failed ({proc.returncode}):\n"
                f"{err.read().decode(errors='replace')[-3000:]}"
            )
        return Run(seconds, usage.ru_maxrss * 1024, out.read().decode())


def best(repeat: int, cmd: list[str], prepare: Callable[[], None] | None = None) -> list[Run]:
    """All runs, fastest first."""
    return sorted((timed(cmd, prepare) for _ in range(repeat)), key=lambda r: r.seconds)


def fixture(variant: str, work: Path, **salts: str) -> dict[str, Any]:
    """Build (or reuse) a fixture version; return its summary."""
    tag = "".join(f"-{k}" for k, v in salts.items() if v) or "-base"
    out = work / f"fixture{tag}.json"
    cmd = [sys.executable, str(FIXTURE_SCRIPT), "--variant", variant, "--json-out", str(out)]
    for k, v in salts.items():
        cmd += [f"--{k}-salt", v]
    timed(cmd)
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary


def relink(src: Path, dst: Path) -> Callable[[], None]:
    """A prepare step: make dst a hard-linked copy of src (cheap; writers replace, not edit)."""

    def prepare() -> None:
        shutil.rmtree(dst, ignore_errors=True)
        subprocess.run(["cp", "-al", str(src), str(dst)], check=True)

    return prepare


def fresh(*dirs: Path) -> Callable[[], None]:
    def prepare() -> None:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

    return prepare


def build_cmd(app: str, target: str, cache: Path, *extra: str) -> list[str]:
    return [
        str(STOWAWAY),
        "build",
        app,
        "-o",
        target,
        "--cache-dir",
        str(cache),
        "--compression",
        "gzip",
        "--compression-level",
        "6",
        "--json",
        *extra,
    ]


class CountingProxy:
    """A loopback TCP proxy counting the bytes clients send upstream (the upload volume)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.sent = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._started.set()
        self._loop.run_forever()
        server.close()

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, count: bool) -> None:
        try:
            while data := await r.read(MIB):
                if count:
                    self.sent += len(data)
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(self._pump(cr, uw, True), self._pump(ur, cw, False))


def floor_cmd(closure: list[str]) -> list[str]:
    script = 'set -o pipefail; tar -cf - "$@" | pigz -p 2 -6 | sha256sum >/dev/null'
    return ["bash", "-c", script, "floor", *closure]


def get(url: str, accept: str) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req) as r:
        body: bytes = r.read()
        return body


def bench(variant: str, repeat: int, work: Path) -> dict[str, Any]:
    base = fixture(variant, work)
    app_v = fixture(variant, work, app="bench1")
    leaf_v = fixture(variant, work, leaf="bench1")
    nar = int(base["nar_size"])
    res: dict[str, Any] = {
        "fixture": variant,
        "paths": base["count"],
        "nar_size": nar,
        "repeat": repeat,
    }

    cache, out = work / "cache", work / "out"
    cold_cmd = build_cmd(base["app"], f"oci:{out}:base", cache)
    floor_runs: list[Run] = []
    cold_runs: list[Run] = []
    for _ in range(repeat):  # interleaved, so both see the same background load
        floor_runs.append(timed(floor_cmd(base["closure"])))
        cold_runs.append(timed(cold_cmd, fresh(cache, out)))
    floor = sorted(floor_runs, key=lambda r: r.seconds)
    cold = sorted(cold_runs, key=lambda r: r.seconds)
    res["floor_s"] = floor[0].seconds
    # The last run left cache + out behind: the starting point of every warm run.
    res["cold_s"] = cold[0].seconds
    res["cold_vs_floor"] = floor[0].seconds / cold[0].seconds
    rss = [r.max_rss for r in cold]

    for name, version in (("app", app_v), ("leaf", leaf_v)):
        wcache, wout = work / f"cache-{name}", work / f"out-{name}"

        def prepare(wcache: Path = wcache, wout: Path = wout) -> None:
            relink(cache, wcache)()
            relink(out, wout)()

        warm = best(repeat, build_cmd(version["app"], f"oci:{wout}:{name}", wcache), prepare)
        layers = json.loads(warm[0].stdout)["layers"]
        res[f"warm_{name}_s"] = warm[0].seconds
        res[f"warm_{name}_ratio"] = warm[0].seconds / cold[0].seconds
        res[f"warm_{name}_rebuilt_layers"] = sum(not la["reused"] for la in layers)
        res[f"warm_{name}_layers"] = len(layers)
        rss += [r.max_rss for r in warm]
    res["peak_rss"] = max(rss)

    res.update(push_leaf(base, leaf_v, cache, work))
    return res


def push_leaf(
    base: dict[str, Any], leaf_v: dict[str, Any], cache: Path, work: Path
) -> dict[str, Any]:
    """Push base, then the leaf-changed image through a counting proxy; compare volumes."""
    pcache = work / "cache-push"
    relink(cache, pcache)()
    fresh(work / "registry")()  # a registry left by an earlier run would already hold it all
    with Registry(work / "registry") as reg, CountingProxy(reg.port) as proxy:
        host = f"127.0.0.1:{proxy.port}"
        tls = "--dest-tls-verify=false"
        timed(build_cmd(base["app"], f"docker://{host}/bench/app:base", pcache, tls))
        stored0, sent0 = reg.blob_bytes(), proxy.sent
        run = timed(build_cmd(leaf_v["app"], f"docker://{host}/bench/app:leaf", pcache, tls))
        sent, stored = proxy.sent - sent0, reg.blob_bytes() - stored0
        report = json.loads(run.stdout)
        manifest = get(
            f"{reg.url}/v2/bench/app/manifests/leaf",
            "application/vnd.oci.image.manifest.v1+json,"
            "application/vnd.docker.distribution.manifest.v2+json",
        )
    config_size = int(json.loads(manifest)["config"]["size"])
    changed = sum(la["size"] for la in report["layers"] if not la["reused"])
    expected = changed + config_size + len(manifest)
    return {
        "push_seconds": run.seconds,
        "push_changed_layers": sum(not la["reused"] for la in report["layers"]),
        "push_expected_bytes": expected,
        "push_sent_bytes": sent,
        "push_stored_bytes": stored,
        "push_sent_ratio": sent / expected,
        "push_stored_ratio": stored / expected,
    }


def table(r: dict[str, Any]) -> str:
    mb = 1e6
    thr = r["nar_size"] / mb
    rows = [
        ("fixture", f"{r['fixture']}: {r['paths']} paths, {r['nar_size'] / mb:.0f} MB NAR", ""),
        ("floor tar|pigz|sha256", f"{r['floor_s']:.2f} s  {thr / r['floor_s']:.0f} MB/s", ""),
        ("cold build (gzip 6)", f"{r['cold_s']:.2f} s  {thr / r['cold_s']:.0f} MB/s", ""),
        ("  cold / floor throughput", f"{r['cold_vs_floor']:.2f}x", "goal >= 0.8x"),
    ]
    for name in ("app", "leaf"):
        rows += [
            (
                f"warm after {name} change",
                f"{r[f'warm_{name}_s']:.2f} s  "
                f"({r[f'warm_{name}_rebuilt_layers']}/{r[f'warm_{name}_layers']} layers built)",
                "",
            ),
            (
                f"  warm {name} / cold",
                f"{100 * r[f'warm_{name}_ratio']:.1f} %",
                "goal <= 5 %" if name == "app" else "",
            ),
        ]
    rows += [
        ("peak RSS", f"{r['peak_rss'] / MIB:.0f} MiB", "goal <= 256 MiB"),
        (
            "push after leaf change",
            f"{r['push_seconds']:.2f} s, {r['push_changed_layers']} changed layers",
            "",
        ),
        ("  expected (layers+cfg+mf)", f"{r['push_expected_bytes'] / mb:.2f} MB", ""),
        (
            "  sent to registry",
            f"{r['push_sent_bytes'] / mb:.2f} MB ({r['push_sent_ratio']:.3f}x)",
            "incl. HTTP",
        ),
        (
            "  stored by registry",
            f"{r['push_stored_bytes'] / mb:.2f} MB ({r['push_stored_ratio']:.3f}x)",
            "",
        ),
    ]
    return "\n".join(f"{a:<28} {b:<44} {c}".rstrip() for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fixture", choices=["realistic", "medium"], default="realistic")
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing (best is kept)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--work", type=Path, help="work dir (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    result = run_in_work("compose_bench", args.work, lambda w: bench(args.fixture, args.repeat, w))
    if result is None:
        return 1
    print(json.dumps(result, indent=1, sort_keys=True) if args.json else table(result))
    return 0


def run_in_work(
    name: str, given: Path | None, run: Callable[[Path], dict[str, Any]]
) -> dict[str, Any] | None:
    """``run`` in the work dir ``given`` (else a temp dir, removed afterwards) once the
    CLI is installed; None, after saying why on stderr, when it cannot or fails."""
    if not STOWAWAY.exists():
        print(f"{name}: {STOWAWAY} not found (pip install -e .)", file=sys.stderr)
        return None
    work = given or Path(tempfile.mkdtemp(prefix=f"stowaway-{name}-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(work)
    except BenchError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return None
    finally:
        if given is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
