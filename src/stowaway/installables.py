"""Turn what a user names on the command line into store paths.

Accepted: store paths (``/nix/store/<hash>-<name>``, also a file below one), symlinks
to store paths such as ``./result``, flake references (``.#app``, ``path:/dir#app``,
``/dir#app``, ``github:owner/repo#app``, a directory holding a ``flake.nix``), built
with ``nix build`` (Nix ≥ 2.4; the experimental features ``nix-command flakes`` are
enabled on its command line, never in nix.conf), and ``-f FILE.nix [-A ATTR]
[--arg NAME EXPR] [--argstr NAME VALUE]``, built with ``nix-build``.

While Nix builds, its log (stderr) is passed through to ours line by line; stdout is
read for the outputs only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import click

from stowaway.errors import StowawayError
from stowaway.image.platform import Platform, parse_platform
from stowaway.store.model import STORE_DIR
from stowaway.store.paths import parse_store_path

if TYPE_CHECKING:
    from stowaway.sinks.pipeline import Wanted

__all__ = [
    "FLAKE_FEATURES",
    "build_flakes",
    "build_nix_file",
    "is_flake_ref",
    "platform_images",
    "resolve",
]

#: Given to every `nix` (new CLI) command: flakes are experimental in every Nix so far.
FLAKE_FEATURES = ["--extra-experimental-features", "nix-command flakes"]

# `github:`, `path:`, `git+file:`, `flake:` ... (a URL-like flake reference)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def is_flake_ref(item: str, *, store_dir: str = STORE_DIR) -> bool:
    """True if ``item`` names a flake output rather than a store path or a link to one:
    it has a ``#ATTR``, or it is a directory with a flake.nix outside the store, or
    (not being a file) it starts with a URL scheme such as ``github:``."""
    if "#" in item:  # no store path name has a '#'
        return True
    if item.startswith(store_dir + "/"):
        return False
    if os.path.lexists(item):
        if os.path.realpath(item).startswith(store_dir + "/"):
            return False  # ./result
        return os.path.isfile(os.path.join(item, "flake.nix"))
    return _SCHEME.match(item) is not None


def resolve(installables: Sequence[str], *, store_dir: str = STORE_DIR) -> list[str]:
    """Store paths for the given strings, in order, without duplicates. Flake references
    are built, all in one ``nix build``; their outputs stand where the first one was."""
    flakes = [item for item in installables if is_flake_ref(item, store_dir=store_dir)]
    out: list[str] = []
    for item in installables:
        if item in flakes:
            if item == flakes[0]:
                out += [p for p in build_flakes(flakes) if p not in out]
            continue
        target = item
        if not item.startswith(store_dir + "/") and os.path.lexists(item):
            target = os.path.realpath(item)
        if not target.startswith(store_dir + "/"):
            raise StowawayError(
                f"{item!r} is not a store path or a link to one",
                hint=f"pass a path under {store_dir}/, a ./result link, a flake reference "
                "such as .#app, or -f FILE.nix",
            )
        sp = parse_store_path(target, store_dir=store_dir, strict=False)
        if sp.path not in out:
            out.append(sp.path)
    return out


def _run_nix(cmd: Sequence[str], what: str) -> str:
    """Run a nix command; return its stdout. Its stderr (the build log) goes to ours as
    it comes; on failure the error carries nix's last error message."""
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        out_pipe, err_pipe = proc.stdout, proc.stderr
        assert out_pipe is not None and err_pipe is not None
        stdout: list[bytes] = []
        reader = threading.Thread(target=lambda: stdout.append(out_pipe.read()))
        reader.start()
        for raw in err_pipe:
            line = raw.decode(errors="replace")
            click.echo(line, err=True, nl=False)
            tail.append(line.rstrip("\n"))
        reader.join()
        code = proc.wait()
    if code != 0:
        starts = [i for i, line in enumerate(tail) if line.startswith("error:")]
        last = list(tail)[starts[-1] :] if starts else list(tail)[-10:]
        detail = "\n".join(last[:15]).removeprefix("error: ")
        raise StowawayError(f"{what} failed (exit {code}): {detail}")
    return b"".join(stdout).decode()


def build_flakes(refs: Sequence[str]) -> list[str]:
    """Build flake references with ``nix build --no-link --json``; return their outputs.
    (``--json`` works from Nix 2.4 on; ``--print-out-paths`` is missing in 2.8.)"""
    if shutil.which("nix") is None:
        raise StowawayError(
            f"cannot build {refs[0]}: nix is not installed",
            hint="install Nix ≥ 2.4 (Debian: apt-get install nix-bin) or pass store paths",
        )
    cmd = ["nix", *FLAKE_FEATURES, "build", "--no-link", "--json", "--print-build-logs", *refs]
    text = _run_nix(cmd, f"nix build {' '.join(refs)}")
    try:
        results = json.loads(text)
        paths: list[str] = []
        for r in results:
            if "outputs" in r:
                paths += r["outputs"].values()
            elif "path" in r:  # an output that is a plain store path, not a derivation
                paths.append(r["path"])
    except (ValueError, TypeError, AttributeError) as e:
        raise StowawayError(f"nix build {' '.join(refs)}: unexpected output {text[:200]!r}") from e
    return list(dict.fromkeys(paths))


def build_nix_file(
    file: str,
    attrs: Sequence[str],
    args: Sequence[tuple[str, str]] = (),
    argstrs: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """Build ``file`` (optionally attributes of it) with nix-build, with ``--arg NAME
    EXPR`` and ``--argstr NAME VALUE`` for its function arguments; return the outputs."""
    if shutil.which("nix-build") is None:
        raise StowawayError(
            f"cannot evaluate {file}: nix-build is not installed",
            hint="install nix (Debian: apt-get install nix-bin) or pass store paths instead",
        )
    if not os.path.exists(file):
        raise StowawayError(f"Nix file {file!r} does not exist")
    cmd = ["nix-build", file, "--no-out-link"]
    for a in attrs:
        cmd += ["-A", a]
    for name, expr in args:
        cmd += ["--arg", name, expr]
    for name, value in argstrs:
        cmd += ["--argstr", name, value]
    out = _run_nix(cmd, f"nix-build {file}")
    return [line for line in out.split() if line.startswith("/")]


def platform_images(
    platforms: Sequence[str],
    contents: Sequence[str],
    roots: Callable[[], list[str]],
    *,
    arguments: bool,
) -> tuple[list[Wanted], bool]:
    """The images ``build`` makes, and whether they form an index.

    ``--platform OS/ARCH=INSTALLABLE`` (repeatable; a platform named twice gets both
    installables) makes one image per platform and an index of them; then
    ``--contents OS/ARCH=PATH`` links PATH into that platform's image only, a plain
    ``--contents PATH`` into every one, and no installable ``arguments`` may be given.
    Otherwise one image of ``roots()``, for the one ``--platform OS/ARCH`` if given.
    """
    from stowaway.sinks.pipeline import Wanted  # the composer's imports: only for build

    pairs = [(value, *value.partition("=")) for value in platforms]
    if not any(sep for _, _, sep, _ in pairs):
        if len(pairs) > 1:
            raise StowawayError(
                f"--platform given {len(pairs)} times without installables",
                hint="one image has one platform; for an index name each platform's "
                "installable: --platform OS/ARCH=INSTALLABLE",
            )
        if any("=" in c for c in contents):
            raise StowawayError(
                "--contents OS/ARCH=PATH needs --platform OS/ARCH=INSTALLABLE",
                hint="without an index, give --contents PATH",
            )
        explicit = parse_platform(pairs[0][0]) if pairs else None
        return [Wanted(explicit, roots(), resolve(contents))], False
    if arguments:
        raise StowawayError(
            "installables given both as arguments and in --platform OS/ARCH=INSTALLABLE",
            hint="name each platform's installables in its --platform flag",
        )
    by_platform: dict[Platform, list[str]] = {}
    for value, plat, sep, item in pairs:
        if not sep or not item:
            raise StowawayError(
                f"--platform {value!r} names no installable, but others do",
                hint="with an index, every --platform is OS/ARCH=INSTALLABLE",
            )
        by_platform.setdefault(parse_platform(plat), []).append(item)
    shared: list[str] = []
    own: dict[Platform, list[str]] = {}
    for value in contents:
        plat, sep, item = value.partition("=")
        if not sep:
            shared.append(value)
            continue
        p = parse_platform(plat, "--contents")
        if p not in by_platform:
            raise StowawayError(
                f"--contents {value!r} is for {p}, which no --platform names",
                hint="platforms: " + ", ".join(str(x) for x in sorted(by_platform)),
            )
        own.setdefault(p, []).append(item)
    return [
        Wanted(p, resolve(items), resolve([*shared, *own.get(p, [])]))
        for p, items in sorted(by_platform.items())
    ], True
