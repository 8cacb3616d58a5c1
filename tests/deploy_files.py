"""The shipped files under deploy/, read the way the deployment tests need them.

The files name real host paths, the ones an operator copies. The tests run them on
private paths through one substitution, the mechanism docs/deploy.md documents: each
prefix in ``HOST_PATHS`` is replaced by a private path (longest prefix first), and
nothing else in a file changes; the program ``/usr/local/bin/stowaway`` of an
``ExecStart`` becomes this checkout's ``python -m stowaway``.
"""

from __future__ import annotations

import configparser
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SRC = ROOT / "src"
UNITS = DEPLOY / "systemd"
PROGRAM = "/usr/local/bin/stowaway"

#: the host paths deploy/ names, and what each is for (the substitution's keys)
HOST_PATHS = {
    "/run/stowaway": "sockets of the snapshotter and the CRI image service",
    "/var/lib/stowaway": "state: the snapshotter's --root, the registry's storage",
    "/var/cache/stowaway": "layer caches",
    "/nix/var/nix/gcroots/stowaway": "GC roots of the snapshotter (-cri: of the CRI service)",
    "/run/containerd/containerd.sock": "containerd's socket",
}


def substitute(text: str, paths: Mapping[str, str | Path]) -> str:
    """``text`` with every prefix in ``paths`` (keys of HOST_PATHS) replaced."""
    unknown = set(paths) - set(HOST_PATHS)
    assert not unknown, f"not a documented host path: {unknown}"
    for prefix in sorted(paths, key=len, reverse=True):
        text = text.replace(prefix, str(paths[prefix]))
    return text


def unit(name: str) -> configparser.ConfigParser:
    """A systemd unit file as sections of keys (repeated keys keep the last value)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def exec_start(name: str) -> list[str]:
    """The unit's ExecStart as argv (a single command line: no continuation lines)."""
    argv = shlex.split(unit(name)["Service"]["ExecStart"])
    assert argv[0] == PROGRAM, argv
    return argv


def flag(argv: list[str], name: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in argv."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def runnable(argv: list[str], paths: Mapping[str, str | Path]) -> list[str]:
    """argv with the documented substitution: private paths, this checkout's stowaway."""
    return [sys.executable, "-m", "stowaway", *(substitute(a, paths) for a in argv[1:])]
