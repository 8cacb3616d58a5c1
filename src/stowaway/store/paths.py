"""Store path parsing and validation.

A store path is ``<store_dir>/<32 nix32 chars>-<name>``; every face that accepts
a path from a user or a remote (CLI, narinfo, registry names) goes through here so
bad input is refused with the rule it breaks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stowaway.errors import InvalidStorePath
from stowaway.store.model import STORE_DIR

__all__ = ["HASH_LEN", "StorePath", "is_basename", "parse_basename", "parse_store_path"]

HASH_LEN = 32
MAX_NAME_LEN = 211
_HASH_RE = re.compile(r"[0-9a-df-np-sv-z]{32}")
_NAME_RE = re.compile(r"[0-9a-zA-Z+\-._?=]+")


@dataclass(frozen=True)
class StorePath:
    """A parsed store path; ``path`` is the logical full path."""

    hash_part: str
    name: str
    store_dir: str = STORE_DIR

    @property
    def basename(self) -> str:
        return f"{self.hash_part}-{self.name}"

    @property
    def path(self) -> str:
        return f"{self.store_dir}/{self.basename}"

    def __str__(self) -> str:
        return self.path


def _check_name(name: str, whole: str) -> None:
    if not name:
        raise InvalidStorePath(f"store path {whole!r}: name is empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidStorePath(
            f"store path {whole!r}: name is {len(name)} characters, at most {MAX_NAME_LEN} allowed"
        )
    if not _NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _NAME_RE.fullmatch(c))
        raise InvalidStorePath(
            f"store path {whole!r}: name contains {bad!r}; allowed are [0-9a-zA-Z+-._?=]"
        )
    if name in (".", "..") or name.startswith((".-", "..-")):
        raise InvalidStorePath(f"store path {whole!r}: name must not be '.', '..' or start '.-'")


def parse_basename(basename: str, store_dir: str = STORE_DIR) -> StorePath:
    """Parse ``<hash>-<name>`` (no directory part)."""
    hash_part, sep, name = basename[:HASH_LEN], basename[HASH_LEN : HASH_LEN + 1], basename[33:]
    if len(basename) < HASH_LEN + 2 or sep != "-":
        raise InvalidStorePath(
            f"store path {basename!r}: expected '<32-char hash>-<name>' as the base name"
        )
    if not _HASH_RE.fullmatch(hash_part):
        raise InvalidStorePath(
            f"store path {basename!r}: hash part {hash_part!r} is not 32 Nix base-32 characters "
            "(alphabet 0-9 a-z without e o u t)"
        )
    _check_name(name, basename)
    return StorePath(hash_part, name, store_dir)


def is_basename(name: str) -> bool:
    """Whether ``name`` is a valid ``<hash>-<name>`` (a directory entry worth keeping)."""
    try:
        parse_basename(name)
    except InvalidStorePath:
        return False
    return True


def parse_store_path(s: str, store_dir: str = STORE_DIR, *, strict: bool = True) -> StorePath:
    """Parse a full store path. With ``strict=False`` a path below a store path
    (``/nix/store/x-y/bin/sh``) yields the store path itself."""
    store_dir = store_dir.rstrip("/") or "/"
    prefix = store_dir + "/"
    if not s.startswith(prefix):
        raise InvalidStorePath(f"store path {s!r}: not inside the store directory {store_dir}")
    rest = s[len(prefix) :]
    basename, slash, _sub = rest.partition("/")
    if slash and strict:
        raise InvalidStorePath(
            f"store path {s!r}: points below a store path; use {prefix}{basename}"
        )
    try:
        return parse_basename(basename, store_dir)
    except InvalidStorePath as e:
        raise InvalidStorePath(e.message.replace(repr(basename), repr(s), 1)) from None
