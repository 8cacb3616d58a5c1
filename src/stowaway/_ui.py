"""Terminal presentation for the CLI: rich progress bars and summary tables.

Kept apart from the library so importing stowaway never imports rich; the CLI
imports this module only when it draws something.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

# Every string printed may come from the user (targets, image names, store path names):
# never read as rich markup or emoji codes (`-o oci:two:1` printed as "oci2️⃣1"), and no
# highlighting. Off a terminal nothing is wrapped, so digests stay whole for scripts.
console = Console(stderr=True, markup=False, emoji=False, highlight=False)
out = Console(
    markup=False,
    emoji=False,
    highlight=False,
    soft_wrap=not sys.stdout.isatty(),
    width=None if sys.stdout.isatty() else 1000,
)


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class _OverallProgress(Progress):
    """One overall bar and, under it, what is being worked on right now."""

    working: tuple[str, ...] = ()

    def get_renderables(self) -> Iterator[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.working:
            yield Text("  " + " · ".join(self.working), no_wrap=True, overflow="ellipsis")


class RichProgress:
    """Adapter from stowaway.progress.Progress to one overall rich bar: every key's
    bytes add to it, and the descriptions of the keys under way (the names of the store
    paths being tarred, compressed or sent) are listed below it. ``phase`` starts the
    next stage with its own total (None: the sum of what its keys announce)."""

    def __init__(self, progress: _OverallProgress) -> None:
        self._p = progress
        self._lock = threading.Lock()
        self._active: dict[str, str] = {}
        self._total: int | None = None
        self._announced = 0
        self._task = progress.add_task("", total=None)

    def phase(self, description: str, total: int | None = None) -> None:
        with self._lock:
            self._active.clear()
            self._p.working = ()
            self._total, self._announced = total, 0
        self._p.reset(self._task, description=description, total=total, completed=0)

    def start(self, key: str, description: str, total: int | None) -> None:
        with self._lock:
            self._active[key] = description
            self._p.working = tuple(self._active.values())
            self._announced += total or 0
            grown = max(self._total or 0, self._announced)
        self._p.update(self._task, total=grown)

    def advance(self, key: str, amount: int) -> None:
        if key in self._active:
            self._p.advance(self._task, amount)

    def finish(self, key: str) -> None:
        with self._lock:
            if self._active.pop(key, None) is not None:
                self._p.working = tuple(self._active.values())


@contextmanager
def progress_display(enabled: bool) -> Iterator[RichProgress | None]:
    """A live progress display on a terminal; nothing when output is not a TTY."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    with _OverallProgress(
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as p:
        yield RichProgress(p)


def short_paths(paths: list[str], limit: int = 2) -> str:
    names = [p.rsplit("/", 1)[-1].split("-", 1)[-1] for p in paths]
    if len(names) <= limit:
        return " ".join(names) or "(customisation)"
    return " ".join(names[:limit]) + f" +{len(names) - limit} more"


def layer_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Print one row per layer: index, size, digest, reused, store paths."""
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("size", justify="right")
    table.add_column("digest")
    table.add_column("reused")
    table.add_column("store paths")
    for i, row in enumerate(rows):
        table.add_row(
            str(i),
            human(int(row["size"])),
            str(row.get("digest", ""))[7:19],
            "yes" if row.get("reused") else "",
            "(base image)" if row.get("base") else short_paths(list(row.get("store_paths", []))),
        )
    out.print(table)


def table(title: str, columns: list[str], rows: list[list[str]], *, right: int = 0) -> None:
    """Print a table of ready-made cells; the first ``right`` columns are right-aligned
    (numbers). For commands whose rows have other columns than ``layer_table``'s."""
    t = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        t.add_column(name, justify="right" if i < right else "left")
    for row in rows:
        t.add_row(*row)
    out.print(t)


def key_values(pairs: list[tuple[str, str]]) -> None:
    """Print ``name  value`` lines, names padded to one width (empty values skipped)."""
    pairs = [(k, v) for k, v in pairs if v]
    width = max((len(k) for k, _ in pairs), default=0)
    for k, v in pairs:
        out.print(f"{k.ljust(width)}  {v}")
