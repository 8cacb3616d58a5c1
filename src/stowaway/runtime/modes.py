"""Which rootfs mode the snapshotter uses, decided once at start-up and logged with why.

Why a pure decision table: the inputs (overlay probe result, containerd version, whether
store and state share a filesystem) are cheap facts gathered by the caller, so every
branch is unit-testable without a kernel or a containerd of each version.

Order (``auto``): ``overlay`` (one mount, works on containerd 1.6 and newer) when the
data-only overlay probe works; else ``bind`` (``Mount.target`` bind mounts of each store
path) when containerd ≥ 1.7; else ``hardlink`` when store and state share a filesystem;
else ``copy``. ``bind`` is refused on containerd < 1.7: 1.6 drops the unknown
``target`` field and would mount every store path *over the rootfs itself* — a broken
rootfs, never acceptable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from stowaway.errors import StowawayError
from stowaway.runtime.stub_trees import Mode

__all__ = [
    "BIND_MIN",
    "ModeFacts",
    "choose",
    "containerd_version",
    "parse_version",
]

#: The first containerd whose mount code honours ``Mount.target``.
BIND_MIN = (1, 7)
_DEFAULT_VERSION = (1, 6)
_FORCED: dict[str, Mode] = {
    "overlay": "overlay",
    "bind": "bind",
    "hardlink": "hardlink",
    "copy": "copy",
}


@dataclass(frozen=True)
class ModeFacts:
    """What the decision needs: the probe's failure reason (None = data-only overlay
    works), containerd's (major, minor), and whether every store dir shares ``--root``'s
    filesystem."""

    overlay_failure: str | None
    containerd: tuple[int, int]
    same_filesystem: bool


def parse_version(text: str, where: str) -> tuple[int, int]:
    """``X.Y`` (any suffix, e.g. ``1.7.2`` or ``1.6.20~ds1``) → (X, Y)."""
    m = re.search(r"\bv?(\d+)\.(\d+)", text)
    if m is None:
        raise StowawayError(f"{where}: no containerd version X.Y in {text!r}")
    return int(m.group(1)), int(m.group(2))


def containerd_version(flag: str | None) -> tuple[tuple[int, int], str]:
    """containerd's version and where it came from: ``--containerd-version`` if given,
    else ``containerd --version`` on PATH, else 1.6 (a proxy plugin cannot ask
    containerd; assuming the oldest supported version never yields a broken rootfs)."""
    if flag is not None:
        return parse_version(flag, "--containerd-version"), f"--containerd-version {flag}"
    exe = shutil.which("containerd")
    if exe is None:
        return _DEFAULT_VERSION, "no containerd on PATH, assuming 1.6"
    try:
        out = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return _DEFAULT_VERSION, f"`{exe} --version` failed ({e}), assuming 1.6"
    # "containerd github.com/containerd/containerd 1.6.20~ds1 <revision>"
    words = out.split()
    text = words[2] if len(words) > 2 else out
    return parse_version(text, f"`{exe} --version`"), out.strip()


def _v(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def choose(requested: str, facts: ModeFacts) -> tuple[Mode, str]:
    """The mode for ``requested`` (``auto`` or a mode name) and the reason to log.

    Raises StowawayError for ``bind`` on containerd < 1.7 (targets would be ignored) and
    for ``hardlink`` across filesystems (every link would fail with EXDEV at pull time).
    """
    old = facts.containerd < BIND_MIN
    if requested == "bind" and old:
        raise StowawayError(
            f"--mode bind needs containerd >= {_v(BIND_MIN)} (Mount.target); containerd "
            f"{_v(facts.containerd)} ignores targets and would mount every store path over "
            "the rootfs. Use --mode auto, overlay, hardlink or copy, or pass "
            "--containerd-version if the probe is wrong"
        )
    if requested == "hardlink" and not facts.same_filesystem:
        raise StowawayError(
            "--mode hardlink needs the store (and --local-store) on the filesystem of "
            "--root: hard links cannot cross filesystems (EXDEV)",
            hint="use --mode copy, or put --root on the store's filesystem",
        )
    if requested in _FORCED:
        return _FORCED[requested], "forced by configuration"
    if requested != "auto":
        raise StowawayError(f"--mode {requested!r}: expected auto, overlay, bind, hardlink or copy")
    if facts.overlay_failure is None:
        return "overlay", "data-only overlay with metacopy works on this kernel"
    why = facts.overlay_failure
    if not old:
        return "bind", f"{why}; containerd {_v(facts.containerd)} honours Mount.target"
    why += f"; containerd {_v(facts.containerd)} has no Mount.target"
    if facts.same_filesystem:
        return "hardlink", f"{why}; store and state share a filesystem"
    return "copy", f"{why}; store on another filesystem, copying files"
