"""BuildKit: the stowaway frontend vs a monolithic `nix-build` in one RUN vs local nix-build.

Scenarios (each prints times and ratios to stowaway):

* ``small``: fixtures/buildkit/graph.nix (13 tiny derivations, builders take
  milliseconds), incremental rebuild after the leaf ``alpha`` changes on a warm builder.
  Fixed costs (frontend start-up, context transfer, solves) dominate here.
* ``heavy``: fixtures/buildkit/heavy.nix (15 derivations of ~1 s CPU each, four
  independent branches): cold build, no-op rebuild, rebuild after leaf ``a1`` changes.
* ``fresh``: the CI runner case on heavy.nix. A first dockerd builds with
  ``BUILDKIT_INLINE_CACHE=1`` and pushes to a registry; a *new* dockerd (empty local
  cache) rebuilds after the leaf change with ``--cache-from``. The monolithic build's
  /nix cache mount is in no cache export, so it starts from nothing.

Monolithic = buildkit-nix's approach: a Debian+nix image, the expression copied in, one
RUN ``nix-build`` with /nix in a cache mount (reused on the same builder), the closure
copied out. Local nix-build and the monolithic one both get ``--max-jobs 2`` (2 cores).

Each BuildKit time is followed by the CPU seconds dockerd and containerd used for it
(their own and their reaped children's: runc, the builders, the frontend process), read
from /proc: on a shared machine the wall clock varies with the load, the CPU much less.

Runs private containerd + dockerd (in a network namespace shared with a registry).
Usage: .venv/bin/python bench/buildkit_bench.py [--scenario small|heavy|fresh]... [--rounds N]
       [--work N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "buildkit")]

from dockerd_netns import NetnsDockerd  # noqa: E402
from netns import Netns, NetnsRegistry  # noqa: E402

from daemons import Containerd, Daemon, Dockerd  # noqa: E402
from stowaway.buildkit.context import make_context  # noqa: E402
from stowaway.image.config import ImageOptions  # noqa: E402

FIXTURES = ROOT / "fixtures" / "buildkit"
#: heavy.nix's ``work``: ≈ 1 s of CPU per derivation on this VM on 2026-12-04 (a local
#: nix-build of all 15 with work 8,123,997 took 17.4 s on 2 cores); its speed drifts
#: over the day, so compare tools within one run, and check nix-build's cold time.
WORK = 3_500_000
NIX_OPTS = ["--option", "substituters", "", "--max-jobs", "2"]

DOCKERFILE = """\
FROM stowaway-bench-nix
COPY expr.nix /src/expr.nix
ARG ARGS
RUN --mount=type=cache,target=/nix,id=stowaway-bench-nix \\
    mkdir -p /out && nix-build /src/expr.nix -A app $ARGS -o /out/result \\
       --option build-users-group "" --option substituters "" --max-jobs 2 \\
    && nix-store -qR /out/result | xargs -I{} cp -a --parents {} /out
"""


def nix_rootfs() -> Path:
    """Debian minbase + nix-bin + busybox-static (the fixture's bootstrap), cached; made
    by the script the Nix image is made from."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "nix-rootfs.sh")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return Path(out.split()[-1])


def cpu_seconds(*daemons: Daemon) -> float:
    """User + system CPU of the daemons' processes and of their reaped children."""
    total = 0
    for d in daemons:
        assert d.proc is not None
        fields = Path(f"/proc/{d.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


class Bench:
    """The three ways to build one fixture, on one dockerd."""

    def __init__(self, dockerd: Dockerd, tmp: Path, expr: Path, containerd: Containerd) -> None:
        self.dockerd, self.tmp, self.expr = dockerd, tmp, expr
        self.cpu: dict[str, float] = {}  # case name → CPU seconds of the last timed build
        self.daemons = (dockerd, containerd)
        env = dockerd.client_env()
        self.frontend = subprocess.run(
            ["bash", str(ROOT / "scripts" / "frontend-image.sh")],
            check=True, capture_output=True, text=True, env=env,
        ).stdout.split()[-1]  # fmt: skip
        subprocess.run(
            ["/usr/bin/docker", "import", "--change", "ENV PATH=/usr/bin:/bin",
             str(nix_rootfs()), "stowaway-bench-nix"],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
        self.mono = tmp / f"mono-{expr.stem}"
        self.mono.mkdir(exist_ok=True)
        shutil.copy(expr, self.mono / "expr.nix")
        (self.mono / "Dockerfile").write_text(DOCKERFILE)

    def stowaway(self, args: dict[str, str], *extra: str) -> None:
        name = "-".join(f"{k}{v}" for k, v in sorted(args.items())) or "plain"
        ctx = make_context(
            str(self.expr), ["app"], self.tmp / f"ctx-{self.expr.stem}-{name}", ImageOptions(),
            argstrs=args,
        ).path  # fmt: skip
        self.dockerd.docker(
            "build", "-f", str(ctx / "stowaway.json"),
            "--build-arg", f"BUILDKIT_SYNTAX={self.frontend}", *extra, str(ctx), timeout=1800,
        )  # fmt: skip

    def monolithic(self, args: dict[str, str], *extra: str) -> None:
        argstr = " ".join(f"--argstr {k} {v}" for k, v in sorted(args.items()))
        self.dockerd.docker(
            "build", "--network", "none", "--build-arg", f"ARGS={argstr}", *extra,
            str(self.mono), timeout=1800,
        )  # fmt: skip

    def nix_build(self, args: dict[str, str]) -> None:
        nix_build(self.expr, args)


def nix_build(expr: Path, args: dict[str, str]) -> None:
    """Local nix-build (no substituters, two jobs)."""
    argv = ["nix-build", str(expr), "-A", "app", "--no-out-link", *NIX_OPTS]
    for k, v in sorted(args.items()):
        argv += ["--argstr", k, v]
    subprocess.run(argv, check=True, capture_output=True)


def timed(fn: Callable[..., None], *args: object) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def timed_cpu(b: Bench, name: str, fn: Callable[..., None], *args: object) -> float:
    """``timed``, also noting the daemons' CPU seconds in ``b.cpu[name]`` (not for the
    local nix-build, which the daemons do not run)."""
    c = cpu_seconds(*b.daemons)
    t = timed(fn, *args)
    if name != "nix-build":
        b.cpu[name] = cpu_seconds(*b.daemons) - c
    return t


@contextmanager
def builder(tmp: Path, netns: Netns, expr: Path) -> Iterator[Bench]:
    with Containerd(tmp) as ctrd, NetnsDockerd(tmp, containerd=ctrd, netns=netns) as dockerd:
        yield Bench(dockerd, tmp, expr, ctrd)


def report(title: str, rows: dict[str, dict[str, float]], cpu: dict[str, dict[str, float]]) -> None:
    """Best times, ratios to stowaway's, and the CPU seconds of the best runs."""
    print(title)
    for case, times in rows.items():
        base = times.get("stowaway")
        cells = []
        for name, t in times.items():
            ratio = f" ({t / base:.2f}x)" if base and name != "stowaway" else ""
            used = cpu.get(case, {}).get(name)
            cells.append(f"{name} {t:6.2f} s{ratio}" + (f" [cpu {used:.2f} s]" if used else ""))
        print(f"  {case:<22} " + " | ".join(cells))
    sys.stdout.flush()


def keep_best(rows: dict[str, float], cpu: dict[str, float], b: Bench, name: str, t: float) -> None:
    """Record ``t`` (and that run's CPU) if it is the best time of ``name`` so far."""
    if t <= rows.get(name, t):
        rows[name] = t
        if name in b.cpu:
            cpu[name] = b.cpu[name]


def small(tmp: Path, netns: Netns, rounds: int, base_work: int) -> None:
    stamp = str(time.time_ns())
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    with builder(tmp / "small", netns, FIXTURES / "graph.nix") as b:
        for r in range(rounds):
            warm, changed = {"salt": f"-{stamp}-{r}a"}, {"salt": f"-{stamp}-{r}b"}
            for name, fn in (
                ("stowaway", b.stowaway),
                ("monolithic", b.monolithic),
                ("nix-build", b.nix_build),
            ):
                fn(warm)
                keep_best(best, cpu, b, name, timed_cpu(b, name, fn, changed))
    report(
        f"small (graph.nix, 13 tiny derivations), best of {rounds}:",
        {"leaf change": best},
        {"leaf change": cpu},
    )


def heavy(tmp: Path, netns: Netns, rounds: int, base_work: int) -> None:
    stamp = time.time_ns() % 1000  # + at most 1 % of the work
    rows: dict[str, dict[str, float]] = {"cold": {}, "no-op rebuild": {}, "leaf change": {}}
    cpu: dict[str, dict[str, float]] = {case: {} for case in rows}
    with builder(tmp / "heavy", netns, FIXTURES / "heavy.nix") as b:
        for r in range(rounds):
            work = str(base_work + stamp * 10 + r)  # new for every round: all 15 build
            cold, changed = {"work": work}, {"work": work, "salt": "-b"}
            for name, fn in (
                ("stowaway", b.stowaway),
                ("monolithic", b.monolithic),
                ("nix-build", b.nix_build),
            ):
                for case, args in (
                    ("cold", cold),
                    ("no-op rebuild", cold),
                    ("leaf change", changed),
                ):
                    keep_best(rows[case], cpu[case], b, name, timed_cpu(b, name, fn, args))
    report(f"heavy (heavy.nix, 15 derivations of ~1 s), best of {rounds}:", rows, cpu)


def fresh(tmp: Path, netns: Netns, rounds: int, base_work: int) -> None:
    rows: dict[str, dict[str, float]] = {"fresh builder, leaf": {}, "fresh builder, no-op": {}}
    cpu: dict[str, dict[str, float]] = {case: {} for case in rows}
    expr = FIXTURES / "heavy.nix"
    with NetnsRegistry(tmp / "fresh", netns) as reg:
        for r in range(rounds):
            work = str(base_work + time.time_ns() % 10000 * 10 + r)
            first, changed = {"work": work}, {"work": work, "salt": "-b"}
            refs = {n: f"{reg.host}/{n}:cache{r}" for n in ("stowaway", "monolithic")}
            inline = ("--build-arg", "BUILDKIT_INLINE_CACHE=1")
            with builder(tmp / f"fresh{r}a", netns, expr) as a:
                a.stowaway(first, *inline, "-t", refs["stowaway"])
                a.monolithic(first, *inline, "-t", refs["monolithic"])
                for ref in refs.values():
                    a.dockerd.docker("push", ref, timeout=1800)
            for case, args in (("fresh builder, leaf", changed), ("fresh builder, no-op", first)):
                # a runner each: the first build on a new dockerd pays its start-up costs
                # (BuildKit's worker, the first container's network), so one builder for
                # both would charge them to whichever ran first
                for name in ("stowaway", "monolithic"):
                    with builder(tmp / f"fresh{r}{case[-2:]}{name}", netns, expr) as b:
                        fn = b.stowaway if name == "stowaway" else b.monolithic
                        t = timed_cpu(b, name, fn, args, "--cache-from", refs[name])
                        keep_best(rows[case], cpu[case], b, name, t)
            # a fresh machine has no /nix/store to reuse: local nix-build builds all 15
            cold = {"work": str(int(work) + 1), "salt": "-b"}
            t = timed(nix_build, expr, cold)
            for case in rows:
                rows[case]["nix-build, empty store"] = min(
                    rows[case].get("nix-build, empty store", t), t
                )
    report(
        f"fresh builder (heavy.nix, cache imported from a registry), best of {rounds}:", rows, cpu
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--scenario", action="append", choices=["small", "heavy", "fresh"])
    ap.add_argument(
        "--work",
        type=int,
        default=WORK,
        help=f"heavy.nix's CPU per derivation (default {WORK}: about a second here)",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bkbench-", dir="/var/tmp"))
    try:
        with Netns() as netns:
            for name in args.scenario or ["small", "heavy", "fresh"]:
                scenario = {"small": small, "heavy": heavy, "fresh": fresh}[name]
                scenario(tmp, netns, args.rounds, args.work)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
