#!/usr/bin/env python3
"""Build a realistic Nix closure from Debian packages (one derivation per package).

Why: the composer's speed and layer reuse only show on closures the size of real
images (hundreds of store paths, hundreds of MB). There is no nixpkgs here, so we
turn Debian's own dependency graph into Nix derivations: each package's output is its
unpacked .deb plus ``nix-support/propagated-deps`` naming its dependencies' store
paths, which makes real Nix references.

Steps: resolve the dependency closure with ``apt-cache`` (first real alternative,
virtual packages replaced by a provider, Debian's cycles broken by dropping DFS
back-edges in sorted order so the result is a DAG), download missing .debs into a
cache directory (idempotent), write the graph as JSON, ``nix-build
fixtures/realistic.nix``, and print/write a summary (app path, closure count, total
NAR size).

Usage: realistic-fixture.py [--variant realistic|medium] [--app-salt S] [--mid-salt S]
                            [--leaf-salt S] [--cache-dir DIR] [--json-out FILE]
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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NIX_EXPR = ROOT / "fixtures" / "realistic.nix"
DEFAULT_CACHE = Path("/var/cache/stowaway")
APT_ARCHIVES = Path("/var/cache/apt/archives")


@dataclass(frozen=True)
class Variant:
    """Root packages of a fixture; `mid` changes with --mid-salt, `leaf` with --leaf-salt."""

    roots: tuple[str, ...]
    mid: str = "libssl3"
    leaf: str = "zlib1g"


VARIANTS = {
    # ~230 packages, ~800 MB of NAR
    "realistic": Variant(
        (
            "gcc-12",
            "g++-12",
            "python3.11",
            "perl",
            "libllvm15",
            "git",
            "openssl",
            "curl",
            "vim",
            "libgtk-3-0",
        )
    ),
    # ~45 packages, ~120 MB of NAR
    "medium": Variant(("python3.11", "openssl", "perl")),
}

APT_DEPENDS = [
    "apt-cache",
    "depends",
    "--recurse",
    "--no-recommends",
    "--no-suggests",
    "--no-conflicts",
    "--no-breaks",
    "--no-replaces",
    "--no-enhances",
]
# Characters Nix accepts in a store path name; everything else (`:`, `~`, `%`) becomes `_`.
_BAD_NAME_CHARS = re.compile(r"[^0-9A-Za-z+._?=-]")


class FixtureError(Exception):
    """A fixture step that failed; the message names the command or package."""


@dataclass
class Package:
    name: str
    version: str = ""
    installed_kib: int = 0
    deb: str = ""
    deps: list[str] = field(default_factory=list)


def run(cmd: list[str], **kw: object) -> str:
    """Run a command, returning stdout; on failure raise with its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise FixtureError(
            f"{' '.join(cmd[:4])}… failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    return str(proc.stdout)


def _strip_arch(name: str) -> str:
    return name.split(":", 1)[0]


def parse_depends(text: str) -> tuple[dict[str, list[list[str]]], dict[str, list[str]]]:
    """Parse `apt-cache depends --recurse` output.

    Returns (real package → list of alternative groups, virtual package → providers).
    Each alternative group lists candidate names in apt's order; a virtual candidate
    is written as ``<name>``.
    """
    groups: dict[str, list[list[str]]] = {}
    providers: dict[str, list[str]] = {}
    current: str | None = None
    last_dep: str | None = None
    continuing = False
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not line.startswith(" "):
            name = line.strip()
            current = None if name.startswith("<") else _strip_arch(name)
            if current is not None:
                groups.setdefault(current, [])
            continuing = False
            continue
        if current is None:
            continue
        if line.startswith("    "):  # provider of the virtual dependency just above
            if last_dep is not None and last_dep.startswith("<"):
                providers.setdefault(last_dep, []).append(_strip_arch(line.strip()))
            continue
        m = re.match(r"\s+(\|?)(PreDepends|Depends): (.+)$", line)
        if m is None:
            raise FixtureError(f"apt-cache depends output line {lineno}: cannot parse {line!r}")
        alt, _, dep = m.groups()
        dep = f"<{_strip_arch(dep[1:-1])}>" if dep.startswith("<") else _strip_arch(dep)
        if continuing:
            groups[current][-1].append(dep)
        else:
            groups[current].append([dep])
        last_dep = dep
        continuing = alt == "|"
    return groups, providers


def choose(
    roots: Iterable[str], groups: dict[str, list[list[str]]], providers: dict[str, list[str]]
) -> dict[str, list[str]]:
    """Pick one package per alternative group and return the closure reachable from roots."""

    def pick(group: list[str]) -> str | None:
        for cand in group:
            if not cand.startswith("<"):
                if cand in groups:
                    return cand
                continue
            for prov in providers.get(cand, []):
                if prov in groups:
                    return prov
        return None  # purely virtual with no installable provider: dropped

    graph: dict[str, list[str]] = {}
    todo = sorted(roots)
    while todo:
        name = todo.pop()
        if name in graph:
            continue
        if name not in groups:
            raise FixtureError(f"package {name!r} is unknown to apt-cache (run apt-get update?)")
        deps = sorted({d for g in groups[name] if (d := pick(g)) is not None and d != name})
        graph[name] = deps
        todo.extend(deps)
    return graph


def break_cycles(graph: dict[str, list[str]], roots: list[str]) -> dict[str, list[str]]:
    """Drop DFS back-edges (visiting in sorted order) so the graph becomes a DAG."""
    dag: dict[str, list[str]] = {n: [] for n in graph}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for start in sorted(roots) + sorted(graph):
        if start in state:
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        state[start] = 1
        while stack:
            node, i = stack[-1]
            deps = graph[node]
            if i == len(deps):
                state[node] = 2
                stack.pop()
                continue
            stack[-1] = (node, i + 1)
            dep = deps[i]
            if state.get(dep) == 1:
                continue  # back-edge: would close a cycle
            dag[node].append(dep)
            if dep not in state:
                state[dep] = 1
                stack.append((dep, 0))
    return dag


def describe(names: list[str]) -> dict[str, tuple[str, int, str]]:
    """Candidate version, Installed-Size (KiB) and .deb file name of each package."""
    out = run(["apt-cache", "show", "--no-all-versions", *names])
    info: dict[str, tuple[str, int, str]] = {}
    for stanza in out.split("\n\n"):
        fields = dict(
            (k, v.strip())
            for k, _, v in (ln.partition(":") for ln in stanza.splitlines() if ln[:1] != " ")
        )
        if "Package" in fields:
            info.setdefault(
                fields["Package"],
                (
                    fields["Version"],
                    int(fields.get("Installed-Size", "0")),
                    # apt-get download's file name: the epoch colon is escaped as %3a
                    f"{fields['Package']}_{fields['Version'].replace(':', '%3a')}"
                    f"_{fields['Architecture']}.deb",
                ),
            )
    missing = sorted(set(names) - set(info))
    if missing:
        raise FixtureError(f"apt-cache show has no candidate for: {', '.join(missing)}")
    return info


def resolve(roots: list[str]) -> dict[str, Package]:
    groups, providers = parse_depends(run([*APT_DEPENDS, *roots]))
    dag = break_cycles(choose(roots, groups, providers), roots)
    info = describe(sorted(dag))
    return {n: Package(n, info[n][0], info[n][1], info[n][2], dag[n]) for n in sorted(dag)}


def download(pkgs: dict[str, Package], deb_dir: Path) -> None:
    """Fetch every .deb not yet in deb_dir (reusing apt's own archive cache when it has it)."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    want = []
    for p in pkgs.values():
        dest = deb_dir / p.deb
        if dest.exists():
            continue
        local = APT_ARCHIVES / p.deb
        if local.exists():
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(local, tmp)
            os.replace(tmp, dest)
            continue
        want.append(f"{p.name}={p.version}")
    if want:
        print(f"downloading {len(want)} .deb files into {deb_dir}", file=sys.stderr)
        # apt-get download writes each file under its final name only when complete.
        run(["apt-get", "download", "-q", *want], cwd=deb_dir)
    missing = [p.deb for p in pkgs.values() if not (deb_dir / p.deb).exists()]
    if missing:
        raise FixtureError(f"after download, missing in {deb_dir}: {', '.join(missing[:5])}")


def store_version(version: str) -> str:
    return _BAD_NAME_CHARS.sub("_", version)


def write_json_atomic(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def build(
    variant: str, graph_file: Path, deb_dir: Path, app_salt: str, mid_salt: str, leaf_salt: str
) -> str:
    # No substituters: everything is built locally, and there is no network to ask.
    # The sandbox is off for this build only (a command-line option; no nix.conf is
    # touched): each derivation unpacks a Debian .deb from the host's cache with the host's
    # dpkg-deb, which the sandbox (store paths only) cannot see.
    cmd = ["nix-build", str(NIX_EXPR), "--no-out-link", "--quiet", "--option", "substituters", ""]
    cmd += ["--option", "sandbox", "false"]
    for k, v in {
        "graphFile": str(graph_file),
        "debDir": str(deb_dir),
        "appSalt": app_salt,
        "midSalt": mid_salt,
        "leafSalt": leaf_salt,
    }.items():
        cmd += ["--argstr", k, v]
    print(f"building {variant} closure with nix-build", file=sys.stderr)
    return run(cmd).strip().splitlines()[-1]


def closure_of(app: str) -> tuple[list[str], int]:
    """The app's closure (dependencies first) and its total NAR size."""
    closure = run(["nix-store", "-qR", app]).split()
    sizes = [int(s) for s in run(["nix-store", "-q", "--size", *closure]).split()]
    return closure, sum(sizes)


def summary_path(cache_dir: Path, variant: str, salts: dict[str, str]) -> Path:
    """CACHE/VARIANT.json for the base build, one file per salted version otherwise."""
    tag = "".join(f"-{k}={store_version(v)}" for k, v in salts.items() if v)
    return cache_dir / f"{variant}{tag}.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="realistic")
    ap.add_argument("--app-salt", default="")
    ap.add_argument("--mid-salt", default="")
    ap.add_argument("--leaf-salt", default="")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--json-out", type=Path, help="summary file (default: CACHE/VARIANT.json)")
    args = ap.parse_args(argv)

    spec = VARIANTS[args.variant]
    roots, mid, leaf = list(spec.roots), spec.mid, spec.leaf
    try:
        pkgs = resolve(roots)
        for special in (mid, leaf):
            if special not in pkgs:
                raise FixtureError(f"{special} is not in the {args.variant} closure")
        deb_dir = args.cache_dir / "debs"
        download(pkgs, deb_dir)
        graph_file = args.cache_dir / f"graph-{args.variant}.json"
        graph = {
            "roots": sorted(roots),
            "mid": mid,
            "leaf": leaf,
            "packages": {
                p.name: {"version": store_version(p.version), "deb": p.deb, "deps": p.deps}
                for p in pkgs.values()
            },
        }
        write_json_atomic(graph_file, graph)
        app = build(args.variant, graph_file, deb_dir, args.app_salt, args.mid_salt, args.leaf_salt)
        closure, nar_size = closure_of(app)
    except FixtureError as e:
        print(f"realistic-fixture: {e}", file=sys.stderr)
        return 1
    salts = {"app": args.app_salt, "mid": args.mid_salt, "leaf": args.leaf_salt}
    summary = {
        "app": app,
        "closure": closure,
        "count": len(closure),
        "nar_size": nar_size,
        "variant": args.variant,
        "debian_packages": len(pkgs),
        "installed_size": sum(p.installed_kib for p in pkgs.values()) * 1024,
        "salts": salts,
        "mid": mid,
        "leaf": leaf,
    }
    out = args.json_out or summary_path(args.cache_dir, args.variant, salts)
    write_json_atomic(out, summary)
    print(f"app:      {app}")
    print(f"paths:    {len(closure)}")
    print(f"nar size: {nar_size / 1e6:.1f} MB")
    print(f"summary:  {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
