#!/usr/bin/env python3
"""Runtime benchmark: CRI PullImage + `ctr run` to first output, and disk per image.

Usage: python bench/runtime_bench.py [--variants 10] [--repeat 1] [--json] [--work DIR]

For the realistic fixture (≈ 230 store paths, ≈ 800 MB of NAR; built by
scripts/realistic-fixture.py, one `--app-salt` per variant) composed by stowaway and
pushed to a private docker-registry, with a private containerd 1.6 (CRI on) per run:

- **overlayfs**: containerd's own snapshotter (download + gunzip + untar every layer);
- **stowaway, paths present**: `stowaway snapshotter --store /nix/store`, a fresh state
  dir (stub trees built during the pull);
- **stowaway, substituted**: an empty `--store`, the closure fetched from a signed
  `file://` binary cache (zstd) into `--local-store`;
- **disk**: all variants pulled into one containerd under each snapshotter; `du` of
  containerd's root plus the snapshotter's state (the host store reported separately).

Bytes downloaded come from the registry's access log (status 200 GETs). Every timing is
the best of `--repeat` runs, each from fresh daemons. Daemons come from tests/daemons.py
and tests/runtime/conftest.py, on private sockets and ports, stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "runtime"), str(ROOT / "tests"), str(ROOT / "src")]

from runtime_helpers import SnapshotterDaemon, StowawayContainerd, cri_pull  # noqa: E402

from daemons import Registry  # noqa: E402
from nixtools import closure_of, nix_build, nix_copy  # noqa: E402
from stowaway.image.compose import compose  # noqa: E402
from stowaway.image.config import ImageOptions  # noqa: E402
from stowaway.image.layer_cache import LayerCache  # noqa: E402
from stowaway.image.layers import LayerSettings  # noqa: E402
from stowaway.sinks.registry import push  # noqa: E402
from stowaway.store.local import LocalStore  # noqa: E402

FIXTURE_SCRIPT = ROOT / "scripts" / "realistic-fixture.py"
#: Survives runs: signing key and binary cache of the fixture closure (≈ 1 min to make).
CACHE = Path("/var/cache/stowaway/runtime-bench")
NS = "k8s.io"
#: Row names for --only: the three timings and the disk measurement.
ROWS = {"overlayfs": "overlayfs", "present": "stowaway (paths present)",
        "substituted": "stowaway (substituted)", "disk": "disk"}  # fmt: skip
SNAP_LOG_LEVEL = "info"  # --snapshotter-log
_ACCESS = re.compile(r'"GET (/v2/\S+) HTTP/[\d.]+" 200 (\d+)')


def log(msg: str) -> None:
    print(f"[runtime_bench] {msg}", file=sys.stderr, flush=True)


def fixture_app(salt: str, work: Path) -> str:
    out = work / f"fixture-{salt or 'base'}.json"
    subprocess.run(
        [sys.executable, str(FIXTURE_SCRIPT), "--app-salt", salt, "--json-out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return str(json.loads(out.read_text())["app"])


def compose_and_push(app: str, busybox: str, reg: Registry, cache: LayerCache, tag: str) -> str:
    """The variant's image (busybox as /bin for the app's #!/bin/sh) in the registry."""
    roots = [app, busybox]
    options = ImageOptions(entrypoint=[f"{app}/bin/app"], contents=[busybox])
    with LocalStore() as store:
        closure = store.closure_infos(roots)
        result = compose(
            store, roots, options, closure=closure, settings=LayerSettings(), cache=cache
        )
    push(result.image, reg.host, "realistic", tag, tls_verify=False)
    return f"{reg.host}/realistic:{tag}"


def registry_bytes(reg: Registry, since: int) -> tuple[int, int]:
    """(bytes, requests) of successful GETs in the registry log after offset ``since``."""
    text = reg.log_path.read_bytes()[since:].decode(errors="replace")
    hits = _ACCESS.findall(text)
    return sum(int(n) for _, n in hits), len(hits)


def run_first_output(ctrd: StowawayContainerd, ref: str, snapshotter: str, cid: str) -> float:
    """Seconds from `ctr run` start to its first line of output."""
    cmd = ["ctr", "-a", ctrd.address, "-n", NS, "run", "--rm", "--snapshotter", snapshotter]
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, ref, cid], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    t = time.perf_counter() - t0
    rest = proc.stdout.read()
    if proc.wait() != 0 or "realistic app" not in line:
        raise RuntimeError(f"ctr run {ref} failed: {line!r}{rest!r}")
    return t


@contextmanager
def node(
    work: Path, reg: Registry, snapshotter: str, snap_args: list[str] | None
) -> Iterator[tuple[StowawayContainerd, SnapshotterDaemon | None]]:
    """A fresh containerd with CRI (and, for stowaway, a fresh snapshotter process)."""
    shutil.rmtree(work, ignore_errors=True)  # a previous run's leftovers (--work)
    work.mkdir(parents=True)
    snap_cm = (
        SnapshotterDaemon(
            work,
            "--gcroots",
            str(work / "gcroots"),
            "--log-level",
            SNAP_LOG_LEVEL,
            *(a.replace("{node}", str(work)) for a in snap_args),  # a fresh local store
        )
        if snap_args is not None
        else nullcontext(None)
    )
    with snap_cm as snap:
        plugins = {"stowaway": {"type": "snapshot", "address": snap.socket}} if snap else {}
        StowawayContainerd.registry_host = reg.host
        StowawayContainerd.cri_snapshotter = snapshotter
        with StowawayContainerd(work, cri=True, proxy_plugins=plugins) as ctrd:
            yield ctrd, snap


def pull_and_run(
    work: Path, reg: Registry, ref: str, snapshotter: str, snap_args: list[str] | None
) -> dict[str, Any]:
    os.sync()  # the previous run's writeback (≈ 1 GB after an overlayfs pull) ends first
    with node(work, reg, snapshotter, snap_args) as (ctrd, snap):
        since = reg.log_path.stat().st_size
        t0 = time.perf_counter()
        cri_pull(ctrd, ref)
        pulled = time.perf_counter() - t0
        first = run_first_output(ctrd, ref, snapshotter, "bench")
        nbytes, requests = registry_bytes(reg, since)
        mode = re.search(r"rootfs mode (\w+)", snap.log_text()) if snap else None
        if snap:  # kept for profiling (per-call times with --snapshotter-log debug)
            (work.parent / f"{work.name}-snapshotter.log").write_text(snap.log_text())
    return {
        "pull_s": pulled,
        "run_first_output_s": first,
        "total_s": pulled + first,
        "bytes_downloaded": nbytes,
        "registry_gets": requests,
        "rootfs_mode": mode.group(1) if mode else None,
    }


def du(*paths: Path) -> int:
    """Bytes allocated under ``paths`` (one du run: hard links counted once). A file
    vanishing mid-walk (containerd tidying up) makes du exit 1 but still total."""
    out = subprocess.run(
        ["du", "-s", "-c", "--block-size=1", *map(str, paths)], capture_output=True, text=True
    ).stdout
    return int(out.splitlines()[-1].split()[0])


def disk_for(
    work: Path, reg: Registry, refs: list[str], snapshotter: str, snap_args: list[str] | None
) -> dict[str, Any]:
    with node(work, reg, snapshotter, snap_args) as (ctrd, snap):
        for ref in refs:
            cri_pull(ctrd, ref)
        # one container per image proves each is usable (and CRI's view is complete)
        run_first_output(ctrd, refs[-1], snapshotter, "disk")
        content = du(ctrd.root / "io.containerd.content.v1.content")
        total = du(ctrd.root, *([snap.root] if snap else []))
    shutil.rmtree(work, ignore_errors=True)
    return {"images": len(refs), "bytes": total, "content_store_bytes": content}


def binary_cache(closure: list[str]) -> tuple[str, str]:
    """(URL, public key) of a signed zstd file:// cache holding ``closure`` (made once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sk, pk = CACHE / "key.sk", CACHE / "key.pk"
    if not pk.exists():
        subprocess.run(
            ["nix-store", "--generate-binary-cache-key", "runtime-bench-1", str(sk), str(pk)],
            check=True,
        )
    log("binary cache: nix copy (only paths not yet there)")
    url = nix_copy(CACHE / "cache", closure, "zstd", str(sk))
    return url, pk.read_text().strip()


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda r: float(r["total_s"]))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=int, default=10, help="images for the disk measurement")
    ap.add_argument("--repeat", type=int, default=1, help="runs per timing (best kept)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--work", type=Path, help="keep the work dir here (default: a temp dir)")
    ap.add_argument(
        "--only",
        action="append",
        choices=list(ROWS),
        help="run only these rows (repeatable; default: all)",
    )
    ap.add_argument(
        "--snapshotter-log",
        choices=["debug", "info"],
        default="info",
        help="debug: the snapshotter logs each gRPC call's time (kept in WORK/node-*.log)",
    )
    args = ap.parse_args()
    global SNAP_LOG_LEVEL
    SNAP_LOG_LEVEL = args.snapshotter_log
    if os.geteuid() != 0:
        print("runtime_bench: needs root (containerd, mounts)", file=sys.stderr)
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="runtime-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    log("fixture variants (nix-build; built paths are reused)")
    apps = [fixture_app(f"rb-{i}" if i else "", work) for i in range(args.variants)]
    busybox = next(
        p for p in closure_of(nix_build(ROOT / "fixtures" / "demo.nix")) if p.endswith("-busybox")
    )
    closure = closure_of(apps[0])
    host_store = du(*map(Path, sorted({p for a in apps for p in closure_of(a)} | {busybox})))
    url, key = binary_cache([apps[0], busybox])
    results: dict[str, Any] = {
        "fixture": {"store_paths": len(closure) + 1, "host_store_bytes_all_variants": host_store}
    }
    with Registry(work / "registry") as reg:
        log("compose + push the variants")
        cache = LayerCache(work / "layer-cache")
        refs = [compose_and_push(a, busybox, reg, cache, f"v{i}") for i, a in enumerate(apps)]
        manifest = json.loads(
            subprocess.run(
                ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{refs[0]}"],
                check=True, capture_output=True, text=True,
            ).stdout
        )  # fmt: skip
        layers = manifest["layers"]
        custom = layers[-1]["size"]
        results["image"] = {
            "layers": len(layers),
            "compressed_bytes": sum(ly["size"] for ly in layers) + manifest["config"]["size"],
            "customisation_layer_bytes": custom,
            "config_bytes": manifest["config"]["size"],
        }
        empty = work / "empty-store"
        empty.mkdir(exist_ok=True)
        scenarios: dict[str, tuple[str, list[str] | None]] = {
            "overlayfs": ("overlayfs", None),
            "stowaway (paths present)": ("stowaway", []),
            "stowaway (substituted)": (
                "stowaway",
                [
                    "--store",
                    str(empty),
                    "--local-store",
                    "{node}/local-store",
                    "--substituter",
                    url,
                    "--trusted-public-key",
                    key,
                ],
            ),  # fmt: skip
        }
        only = {ROWS[o] for o in args.only or ROWS}
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in scenarios if n in only}
        # Interleaved (the machine drifts), each run in a new directory kept to the end:
        # ext4 skips recently freed inodes when it allocates, so deleting one run's
        # 25k-file tree slowed every file the next run created (measured: a symlink
        # took 0.4-0.9 ms instead of 0.03 ms).
        for r in range(args.repeat):
            for i, (name, (sn, snap_args)) in enumerate(scenarios.items()):
                if name in runs:
                    log(f"{name}: run {r + 1}/{args.repeat}")
                    node_dir = work / f"node-{i}-{r}"
                    runs[name].append(pull_and_run(node_dir, reg, refs[0], sn, snap_args))
        for d in work.glob("node-*"):
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
        results["pull_and_run"] = {
            name: {**best(rs), "every_total_s": [r["total_s"] for r in rs]}
            for name, rs in runs.items()
        }
        disk: dict[str, Any] = {}
        for name, (sn, snap_args) in list(scenarios.items())[:2] if "disk" in only else []:
            log(f"disk: {args.variants} images under {name}")
            disk[name] = disk_for(work / "disk", reg, refs, sn, snap_args)
        results["disk"] = disk
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


def print_timing(t: dict[str, Any]) -> None:
    base = t["overlayfs"]["total_s"] if "overlayfs" in t else float("nan")
    print(f"\n{'CRI pull + ctr run':28} {'pull':>8} {'run→out':>8} {'total':>8} {'speed-up':>9} "
          f"{'downloaded':>12} {'GETs':>5}")  # fmt: skip
    for name, r in t.items():
        print(
            f"{name:28} {r['pull_s']:7.2f}s {r['run_first_output_s']:7.2f}s {r['total_s']:7.2f}s "
            f"{base / r['total_s']:8.1f}× {fmt_bytes(r['bytes_downloaded']):>12} "
            f"{r['registry_gets']:>5}"
        )
    print("(best of each; every run's total: " + "; ".join(
        f"{name} " + " ".join(f"{x:.2f}" for x in r["every_total_s"]) for name, r in t.items()
    ) + ")")  # fmt: skip


def print_table(res: dict[str, Any]) -> None:
    img = res["image"]
    print(
        f"image: {img['layers']} layers, {fmt_bytes(img['compressed_bytes'])} compressed; "
        f"manifest+config+customisation layer ≈ "
        f"{fmt_bytes(img['config_bytes'] + img['customisation_layer_bytes'])}"
    )
    t = res["pull_and_run"]
    if t:
        print_timing(t)
    if not res["disk"]:
        return
    print(f"\n{'disk, ' + str(next(iter(res['disk'].values()))['images']) + ' images':28} "
          f"{'containerd+snapshotter':>24} {'content store':>14}")  # fmt: skip
    for name, d in res["disk"].items():
        print(f"{name:28} {fmt_bytes(d['bytes']):>24} {fmt_bytes(d['content_store_bytes']):>14}")
    print(
        f"host Nix store (shared, all variants): "
        f"{fmt_bytes(res['fixture']['host_store_bytes_all_variants'])}"
    )


if __name__ == "__main__":
    sys.exit(main())
