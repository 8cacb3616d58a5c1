#!/usr/bin/env python3
"""Register a synthetic Nix closure of N store paths / S bytes in the local Nix store.

Why: the scale goals (plan < 1 s, build RSS <= 256 MiB, throughput, warm rebuilds,
serving) only show on closures far bigger than the Debian fixture, and there is no
nixpkgs here to build one. Building thousands of derivations would take hours; this
writes the closure as a `nix-store --export` stream (NARs + references) straight into
`nix-store --import`, so the paths are real, valid, garbage-collectable store paths
with real references, registered at disk speed.

Shape (reproducible from --seed): path 0 is a libc everyone uses; a few big libraries
(hundreds of MB, like LLVM or a JDK), ~4 % medium paths and many small ones; each path
references ~1-7 earlier paths, biased towards the foundational low indices; the last path
is the "app", which references every path nobody else references (so the whole set is
its closure) and whose --app-salt changes only it. Files: shared objects (repetitive
"machine code" mixed with incompressible data), headers and docs (word text), data files
(incompressible), symlinks, executables, and nix-support/propagated-deps naming the
references, so gzip does real work (-6 gives ≈ 0.58 of the tar) and the references
are in the bytes as in Nix.

Store paths are input-addressed (hash of seed, shape, index, salt and references, like a
derivation's inputs), so the set of paths is known without generating any content:
paths already valid are skipped and a second run costs only a validity check.

Usage: synthetic_closure.py [--paths 5000] [--size 5G] [--seed 1] [--app-salt S]
                            [--json-out FILE] [--dry-run] [--remove]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Union

from stowaway.store import nixbase32

STORE = "/nix/store"
GENERATOR = "stowaway-synthetic-v1"  # change when the shape or content changes
POOL = 16 << 20  # bytes per content pool (less for small closures: tests stay fast)
EXPORT_MAGIC = 0x4558494E


@dataclass
class File:
    size: int
    kind: str  # "code" | "text" | "data"
    executable: bool = False
    extra: bytes = b""  # exact leading bytes (e.g. the references, the salt)


Node = Union[File, str, "Tree"]  # str: a symlink target


@dataclass
class Tree:
    entries: dict[str, Node] = field(default_factory=dict)

    def put(self, rel: str, node: Node) -> None:
        head, _, rest = rel.partition("/")
        if not rest:
            self.entries[head] = node
            return
        sub = self.entries.setdefault(head, Tree())
        assert isinstance(sub, Tree)
        sub.put(rest, node)


@dataclass
class PathSpec:
    index: int
    name: str
    size: int  # approximate NAR size
    refs: list[int]
    path: str = ""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5G, 300M, 4096)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(m.group(1)) * scale[m.group(2).upper()])


def shape(paths: int, total: int, seed: int, salt: str) -> list[PathSpec]:
    """The DAG and the size of every path; index order is a topological order."""
    rng = random.Random(f"{GENERATOR}:shape:{seed}")
    n = paths - 1  # the app comes last
    big = max(1, n // 500)  # 10 at 5000 paths
    medium = max(1, n // 25)
    # shares of the total: big 45 %, medium 30 %, small 25 %, app ~0
    kinds = ["small"] * n
    for i in rng.sample(range(1, max(2, int(n * 0.4))), big):
        kinds[i] = "big"
    smalls = [i for i in range(1, n) if kinds[i] == "small"]
    for i in rng.sample(smalls, min(medium, len(smalls))):
        kinds[i] = "medium"
    kinds[0] = "medium"  # libc
    weights = [rng.lognormvariate(0, 0.6 if k != "small" else 1.2) for k in kinds]
    sizes = [0] * n
    for kind, share in (("big", 0.45), ("medium", 0.30), ("small", 0.25)):
        members = [i for i in range(n) if kinds[i] == kind]
        w = sum(weights[i] for i in members) or 1.0
        for i in members:
            sizes[i] = max(2048, int(total * share * weights[i] / w))
    specs: list[PathSpec] = []
    referred = [False] * n
    for i in range(n):
        refs: set[int] = set()
        if i > 0:
            if rng.random() < 0.9:
                refs.add(0)
            for _ in range(min(i, 1 + int(rng.expovariate(1 / 2.5)))):
                refs.add(int(i * rng.random() ** 2))
        for r in refs:
            referred[r] = True
        prefix = {"big": "libbig", "medium": "lib", "small": "pkg"}[kinds[i]]
        name = "glibc-synth-2.36" if i == 0 else f"{prefix}{i:04d}-synth-1.{i % 10}"
        specs.append(PathSpec(i, name, sizes[i], sorted(refs)))
    tops = [i for i in range(n) if not referred[i]]
    specs.append(PathSpec(n, "synth-app-1.0", 96 << 10, tops))
    for spec in specs:
        key = f"{GENERATOR}:{seed}:{paths}:{total}:{spec.index}:{spec.name}"
        if spec.index == n:
            key += f":salt={salt}"
        key += ":" + ",".join(specs[r].path for r in spec.refs)
        digest = hashlib.sha256(key.encode()).digest()[:20]
        spec.path = f"{STORE}/{nixbase32.encode(digest)}-{spec.name}"
    return specs


def layout(spec: PathSpec, specs: list[PathSpec], seed: int, salt: str) -> Tree:
    """The files of one path: their names, sizes and kinds (content comes later)."""
    rng = random.Random(f"{GENERATOR}:layout:{seed}:{spec.index}")
    tree = Tree()
    deps = "".join(specs[r].path + "\n" for r in spec.refs).encode()
    tree.put("nix-support/propagated-deps", File(0, "text", extra=deps))
    base = spec.name.split("-synth")[0]
    budget = max(1024, spec.size - len(deps) - 512)
    if spec.index == len(specs) - 1:  # the app
        header = f"#!/bin/sh\n# synthetic app, salt {salt!r}\n".encode()
        tree.put("bin/app", File(4096, "text", executable=True, extra=header + deps))
        tree.put("share/app/data.bin", File(budget - 4096, "data", extra=salt.encode()))
        return tree
    nfiles = min(400, 2 + budget // (160 << 10))
    so = int(budget * rng.uniform(0.35, 0.6))
    tree.put(f"lib/{base}.so.1", File(so, "code"))
    tree.put(f"lib/{base}.so", f"{base}.so.1")
    rest = budget - so
    cuts = sorted(rng.random() for _ in range(nfiles - 1))
    parts = [b - a for a, b in zip([0.0, *cuts], [*cuts, 1.0], strict=True)]
    for k, frac in enumerate(parts):
        size = int(rest * frac)
        roll = rng.random()
        if roll < 0.08:
            tree.put(f"bin/{base}-tool{k}", File(size, "code", executable=True))
        elif roll < 0.38:
            tree.put(f"include/{base}/h{k:03d}.h", File(size, "text"))
        elif roll < 0.55:
            tree.put(f"share/doc/{base}/doc{k:03d}.txt", File(size, "text"))
        elif roll < 0.85:
            tree.put(f"lib/{base}/mod{k:03d}.so", File(size, "code"))
        else:
            tree.put(f"share/{base}/asset{k:03d}.dat", File(size, "data"))
    return tree


class Pools:
    """Seeded byte pools that file contents are cut from: cheap to slice, and each has
    the compressibility of its kind (code ≈ 0.5, text ≈ 0.33, data = 1.0 under gzip -6)."""

    def __init__(self, seed: int, total: int) -> None:
        self.size = size = min(POOL, max(1 << 20, total // 64 >> 20 << 20))
        self.data = hashlib.shake_256(f"{GENERATOR}:data:{seed}".encode()).digest(size)
        rng = random.Random(f"{GENERATOR}:pools:{seed}")
        syll = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 4)))
                for _ in range(300)]  # fmt: skip
        words = [(a + b).encode() for a in syll[:60] for b in syll[60:120]][:3000]
        zipf = [1 / (k + 1) for k in range(len(words))]
        seps = [b" ", b" ", b" ", b" ", b", ", b".\n", b"\n", b"(", b") ", b" = ", b";\n    "]
        out: list[bytes] = []
        got = 0
        while got < size:
            chunk = rng.choices(words, zipf, k=4096)
            sep = rng.choices(seps, k=4096)
            piece = b"".join(w + s for w, s in zip(chunk, sep, strict=True))
            out.append(piece)
            got += len(piece)
        self.text = b"".join(out)[:size]
        ops = [self.data[i * 64 : i * 64 + rng.randint(2, 12)] for i in range(4096)]
        opw = [1 / (k + 1) ** 0.8 for k in range(len(ops))]
        out, got = [], 0
        noise = 0
        while got < size:
            piece = b"".join(rng.choices(ops, opw, k=8192))
            # incompressible "addresses" (1/16 of the bytes) keep it from compressing like text
            piece += self.data[noise : noise + len(piece) // 16]
            noise = (noise + 7919) % max(1, size - (1 << 20))
            out.append(piece)
            got += len(piece)
        self.code = b"".join(out)[:size]

    def content(self, rng: random.Random, kind: str, size: int) -> Iterator[bytes]:
        """``size`` bytes of ``kind``; code files mix in incompressible stretches."""
        left = size
        while left > 0:
            n = min(left, rng.randint(4 << 10, 96 << 10))
            pool = self.data if kind == "data" else self.text if kind == "text" else self.code
            if kind == "code" and rng.random() < 0.15:
                pool = self.data
            off = rng.randrange(0, self.size - n)
            yield pool[off : off + n]
            left -= n


class NarWriter:
    """NAR serialisation (Nix's archive format) and the export framing around it."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.bytes = 0

    def raw(self, data: bytes) -> None:
        self.out.write(data)
        self.bytes += len(data)

    def num(self, n: int) -> None:
        self.raw(struct.pack("<Q", n))

    def str(self, s: bytes | str) -> None:
        b = s.encode() if isinstance(s, str) else s
        self.num(len(b))
        self.raw(b + b"\0" * (-len(b) % 8))

    def node(self, node: Node, pools: Pools, rng: random.Random, label: bytes) -> None:
        self.str("(")
        if isinstance(node, str):
            for tok in ("type", "symlink", "target", node):
                self.str(tok)
        elif isinstance(node, File):
            self.str("type")
            self.str("regular")
            if node.executable:
                self.str("executable")
                self.str("")
            self.str("contents")
            if node.size == 0:  # exactly the given bytes
                head, size = node.extra, len(node.extra)
            else:  # the file's own name keeps every file distinct
                head = node.extra + label + b"\n"
                size = max(node.size, len(head))
            self.num(size)
            self.raw(head)
            for chunk in pools.content(rng, node.kind, size - len(head)):
                self.raw(chunk)
            self.raw(b"\0" * (-size % 8))
        else:
            self.str("type")
            self.str("directory")
            for name in sorted(node.entries, key=str.encode):
                self.str("entry")
                self.str("(")
                self.str("name")
                self.str(name)
                self.str("node")
                self.node(node.entries[name], pools, rng, label + b"/" + name.encode())
                self.str(")")
        self.str(")")

    def export(self, spec: PathSpec, specs: list[PathSpec], tree: Tree, pools: Pools,
               seed: int) -> None:  # fmt: skip
        rng = random.Random(f"{GENERATOR}:content:{seed}:{spec.index}")
        self.num(1)
        self.str("nix-archive-1")
        self.node(tree, pools, rng, spec.path.encode())
        self.num(EXPORT_MAGIC)
        self.str(spec.path)
        refs = sorted(specs[r].path for r in spec.refs)
        self.num(len(refs))
        for r in refs:
            self.str(r)
        self.str("")  # deriver
        self.num(0)  # no legacy signature


def invalid_paths(paths: list[str]) -> set[str]:
    out = subprocess.run(
        ["nix-store", "--check-validity", "--print-invalid", *paths],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return set(out.split())


def nar_sizes(paths: list[str]) -> int:
    out = subprocess.run(
        ["nix-store", "-q", "--size", *paths], check=True, capture_output=True, text=True
    ).stdout
    return sum(int(x) for x in out.split())


def generate(paths: int, total: int, seed: int, salt: str, dry_run: bool) -> dict[str, object]:
    specs = shape(paths, total, seed, salt)
    all_paths = [s.path for s in specs]
    missing = invalid_paths(all_paths)
    todo = [s for s in specs if s.path in missing]
    t0 = time.perf_counter()
    written = 0
    if todo and not dry_run:
        pools = Pools(seed, total)
        proc = subprocess.Popen(["nix-store", "--import"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL)  # fmt: skip
        assert proc.stdin is not None
        writer = NarWriter(proc.stdin)
        try:
            for spec in todo:
                writer.export(spec, specs, layout(spec, specs, seed, salt), pools, seed)
            writer.num(0)
        finally:
            proc.stdin.close()
        if proc.wait() != 0:
            raise SystemExit(f"synthetic_closure: nix-store --import failed ({proc.returncode})")
        written = writer.bytes
    return {
        "generator": GENERATOR,
        "seed": seed,
        "app_salt": salt,
        "app": specs[-1].path,
        "count": len(specs),
        "closure": all_paths,
        "imported": 0 if dry_run else len(todo),
        "export_bytes": written,
        "import_seconds": round(time.perf_counter() - t0, 2),
        "nar_size": 0 if dry_run else nar_sizes(all_paths),
    }


def remove(specs: list[PathSpec]) -> int:
    """Delete this variant's app, then the shared paths (which fails, harmlessly, while
    another --app-salt variant's app still refers to them)."""
    missing = invalid_paths([s.path for s in specs])
    app, rest = specs[-1].path, [s.path for s in specs[:-1] if s.path not in missing]
    for group in ([app] if app not in missing else [], rest):
        if group and subprocess.run(["nix-store", "--delete", *group]).returncode != 0:
            print(
                f"synthetic_closure: {len(group)} paths are still in use (another --app-salt "
                "variant's app, or a GC root): remove that variant too, or `nix-store --gc`",
                file=sys.stderr,
            )
            return 1
    print(f"removed {len(rest) + (app not in missing)} paths", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--paths", type=int, default=5000, help="store paths, app included (>= 3)")
    ap.add_argument("--size", type=parse_size, default=parse_size("5G"), help="total bytes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--app-salt", default="", help="changes only the app path")
    ap.add_argument("--json-out", type=Path, help="also write the summary here")
    ap.add_argument("--dry-run", action="store_true", help="name the paths, import nothing")
    ap.add_argument("--remove", action="store_true", help="delete the closure from the store")
    args = ap.parse_args(argv)
    if args.paths < 3:
        ap.error("--paths must be at least 3")
    if args.remove:
        return remove(shape(args.paths, args.size, args.seed, args.app_salt))
    summary = generate(args.paths, args.size, args.seed, args.app_salt, args.dry_run)
    text = json.dumps(summary, indent=1)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    flags = f"--paths {args.paths} --size {args.size} --seed {args.seed}"
    if args.app_salt:
        flags += f" --app-salt {args.app_salt}"
    print(
        f"app {summary['app']}: {summary['count']} paths, "
        f"{int(summary['nar_size']) / 1e9:.2f} GB of NAR "  # type: ignore[call-overload]
        f"({summary['imported']} imported in {summary['import_seconds']} s)\n"
        f"remove: {sys.executable} {Path(__file__).resolve()} {flags} --remove "
        f"(or nix-store --gc: nothing roots these paths)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
