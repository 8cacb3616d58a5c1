"""Names resolved Nixery's way, with ``nix-build EXPR -A NAME``, fenced: only attribute
paths the configuration allows (``attr_pattern_regex``), results and failures remembered
in bounded caches (failures with an expiry), one flight per name. Kept apart from the
package index, which only reads files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stowaway.errors import InvalidStorePath, StowawayError
from stowaway.registry.lru import BoundedCache
from stowaway.store.paths import parse_basename

#: entries at most in each per-name cache of ``NixBuild`` (names are chosen by clients)
NAME_CACHE_SIZE = 4096


class NixBuildError(StowawayError):
    """A ``nix-build`` that failed (also when answered from the failure cache)."""


class Miss:
    """Not in ``NixBuild``'s caches: nix-build has to run."""


MISS = Miss()


@dataclass(frozen=True)
class _Failure:
    message: str | None  # None: the expression has no such attribute


def attr_pattern_regex(pattern: str) -> str:
    """A ``nix_build_allow`` pattern as a regular expression over attribute paths:
    ``*`` matches within one segment, a ``**`` segment one or more whole segments,
    anything else literally (``python3packages.*``, ``pkgs.**``)."""
    segments = pattern.split(".")
    if not pattern or any(not seg for seg in segments):
        raise ValueError(f"{pattern!r}: empty attribute-path segment")
    out = []
    for seg in segments:
        if seg == "**":
            out.append(r"[^.]+(?:\.[^.]+)*")
        elif "**" in seg:
            raise ValueError(f"{pattern!r}: ** must be a whole segment")
        else:
            out.append("[^.]*".join(re.escape(part) for part in seg.split("*")))
    return r"\.".join(out)


class NixBuild:
    """Resolve a name by ``nix-build EXPR -A NAME``; outputs are kept alive by
    out-links under ``roots_dir`` (GC roots, one per name).

    Names are chosen by clients, so: ``permits`` says whether the attribute path is
    one ``allow`` lets them build (default: top-level attributes only); results are
    kept in an LRU of ``cache_size`` names; failures ("no such attribute" and any
    other nix-build error) in another one for ``failure_ttl`` seconds, answered from
    there without running nix again. Both are forgotten when the expression file
    changes. ``build`` blocks (callers bound how many run at once).
    """

    def __init__(
        self,
        expr: str,
        roots_dir: Path,
        extra_args: Sequence[str] = (),
        timeout: float = 600.0,
        *,
        failure_ttl: float = 60.0,
        allow: Sequence[str] = ("*",),
        cache_size: int = NAME_CACHE_SIZE,
    ) -> None:
        self.expr = expr
        self.roots_dir = Path(roots_dir)
        self.extra_args = list(extra_args)
        self.timeout = timeout
        self.allow = tuple(allow)
        self._allow = re.compile("|".join(f"(?:{attr_pattern_regex(p)})" for p in allow) or "(?!)")
        self._known: BoundedCache[str, tuple[str, ...]] = BoundedCache(cache_size)
        self._failed: BoundedCache[str, _Failure] = BoundedCache(cache_size, failure_ttl)
        self._stamp: int | None = None
        self._lock = threading.Lock()
        #: nix-build processes actually started (tests and metrics)
        self.runs = 0

    def permits(self, name: str) -> bool:
        """Whether ``allow`` lets clients have attribute path ``name`` built."""
        return self._allow.fullmatch(name) is not None

    def _expr_stamp(self) -> int | None:
        """mtime of the expression file (None for ``<nixpkgs>``-style lookups)."""
        try:
            return os.stat(self.expr).st_mtime_ns
        except OSError:
            return None

    def cached(self, name: str) -> tuple[str, ...] | None | Miss:
        """What ``build`` would answer from memory: the output paths, None for a
        remembered "no such attribute", ``MISS``; a remembered failure is raised."""
        stamp = self._expr_stamp()
        with self._lock:
            if stamp != self._stamp:  # the expression changed: forget what it gave
                self._known.clear()
                self._failed.clear()
                self._stamp = stamp
        known = self._known.get(name)
        if known is not None:
            return known
        failure = self._failed.get(name)
        if failure is None:
            return MISS
        if failure.message is None:
            return None
        raise NixBuildError(failure.message)

    def build(self, name: str) -> tuple[str, ...] | None:
        """The output paths of attribute ``name``; None when the expression has no
        such attribute; any other nix-build failure raises with its message."""
        hit = self.cached(name)
        if not isinstance(hit, Miss):
            return hit
        try:
            result = self._run(name)
        except NixBuildError as err:
            self._failed.put(name, _Failure(err.message))
            raise
        if result is None:
            self._failed.put(name, _Failure(None))
        else:
            self._known.put(name, result)
        return result

    def _run(self, name: str) -> tuple[str, ...] | None:
        if shutil.which("nix-build") is None:
            raise StowawayError("nix_build is on but nix-build is not installed")
        self.roots_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["nix-build", self.expr, "-A", name, "-o", str(self.roots_dir / name)]
        with self._lock:
            self.runs += 1
        try:
            proc = subprocess.run(
                [*cmd, *self.extra_args], capture_output=True, text=True, timeout=self.timeout
            )
        except subprocess.TimeoutExpired:
            raise NixBuildError(f"`{' '.join(cmd)}` took longer than {self.timeout:.0f}s") from None
        if proc.returncode != 0:
            if re.search(r"attribute '.*' in selection path '.*' not found", proc.stderr):
                return None
            tail = proc.stderr.strip().splitlines()[-5:]
            raise NixBuildError(f"`{' '.join(cmd)}` failed: " + " / ".join(tail))
        paths = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
        try:
            return tuple(parse_basename(p.rsplit("/", 1)[-1]).path for p in paths)
        except InvalidStorePath as err:
            raise NixBuildError(f"`{' '.join(cmd)}` printed {paths}: {err.message}") from None
