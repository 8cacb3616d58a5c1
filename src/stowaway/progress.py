"""A tiny progress protocol so library code can report long work without
depending on a terminal library; the CLI binds it to rich progress bars."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, key: str, description: str, total: int | None) -> None: ...
    def advance(self, key: str, amount: int) -> None: ...
    def finish(self, key: str) -> None: ...


class NoProgress:
    """The default: report nothing."""

    def start(self, key: str, description: str, total: int | None) -> None:
        pass

    def advance(self, key: str, amount: int) -> None:
        pass

    def finish(self, key: str) -> None:
        pass
