"""The one exception family every face reports to users.

Each error says *what* is wrong and *where* (a path, an offset, a URL), and,
when there is one, what the user can do about it (``hint``).
"""

from __future__ import annotations


class StowawayError(Exception):
    """Base for all errors meant to be shown to a user."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class InvalidStorePath(StowawayError):
    """A string that is not a valid Nix store path (or basename)."""


class NarError(StowawayError):
    """A malformed NAR archive; the message names the byte offset."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"malformed NAR at byte {offset}: {message}")
        self.offset = offset


class NarinfoError(StowawayError):
    """A malformed .narinfo or nix-cache-info file."""


class SignatureError(StowawayError):
    """A store path whose narinfo carries no signature we trust."""


class PathNotFound(StowawayError):
    """A store path that no configured source can provide."""


class PlanError(StowawayError):
    """A layering request that cannot be satisfied (e.g. too many layers)."""


class RegistryError(StowawayError):
    """An error answered by (or about) an OCI registry."""
