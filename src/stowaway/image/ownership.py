"""Owners and modes of files in the image (``--chown``, ``--chmod``) and directories made
for the app (``--mkdir``).

A rule's REGEX must match the *whole* absolute path in the image (``re.fullmatch``:
``/nix/store/<hash>-app/var`` is matched by ``/nix/store/[^/]+-app/var(/.*)?``, never by
``var``), so a rule cannot reach further than written. For each file the first matching
``--chown`` rule sets its owner and the first matching ``--chmod`` rule its mode,
independently and in command-line order: put specific rules before general ones.
``--chmod`` never applies to symlinks (their mode means nothing); ``/nix`` and
``/nix/store`` themselves are never matched (every store layer holds them, so the
image's would depend on layer order). Modes are permission bits plus sticky; setuid and
setgid only with ``allow_setid`` (``--allow-setid``): an image for an unprivileged
user should not grow a way to become someone else by accident.

A rule *touches* a layer when it changes (or could change) at least one of its
members; only those rules enter the layer's cache key (``layers.py``), so unrelated
rules never rebuild it, and a layer no rule touches keeps its usual key and digest.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from stowaway.errors import StowawayError
from stowaway.image.model import TarEntry
from stowaway.store.model import STORE_DIR

__all__ = [
    "MAX_ID",
    "MkdirSpec",
    "OwnershipError",
    "Rule",
    "RuleSet",
    "parse_chmod",
    "parse_chown",
    "parse_mkdir",
]

#: Largest uid/gid accepted (the kernel's ids are unsigned 32-bit; -1 means "unchanged").
MAX_ID = 2**31 - 1
#: Longest REGEX accepted (a rule is one path pattern, not a program).
MAX_PATTERN = 1024
#: Longest --mkdir PATH (Linux's PATH_MAX less room for the layer's own prefix).
MAX_PATH = 4000
_SETID = 0o6000
_NEVER = frozenset((b"nix", STORE_DIR.lstrip("/").encode()))
_OCTAL = re.compile(r"0?[0-7]{3,4}")
_ID = re.compile(r"[0-9]{1,10}")


class OwnershipError(StowawayError):
    """A --chown/--chmod/--mkdir value that cannot be used."""


@dataclass(frozen=True)
class Rule:
    """One ``--chown`` (``uid``/``gid``) or ``--chmod`` (``mode``) rule."""

    kind: Literal["chown", "chmod"]
    pattern: str
    uid: int = 0
    gid: int = 0
    mode: int = 0
    regex: re.Pattern[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", _compile(self.pattern, f"--{self.kind}"))

    @property
    def value(self) -> str:
        return f"{self.uid}:{self.gid}" if self.kind == "chown" else f"{self.mode:04o}"

    def describe(self) -> str:
        """The rule as it would be written on the command line."""
        return f"--{self.kind} '{self.pattern}={self.value}'"


def _split(text: str, flag: str, what: str) -> tuple[str, str]:
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise OwnershipError(
            f"{flag} {text!r} must look like REGEX={what}",
            hint=f"e.g. {flag} '^/nix/store/[^/]+-app/var(/.*)?$={_EXAMPLE[flag]}'",
        )
    return pattern, value


_EXAMPLE = {"--chown": "1000:1000", "--chmod": "0755"}


def _compile(pattern: str, flag: str) -> re.Pattern[str]:
    if len(pattern) > MAX_PATTERN:
        raise OwnershipError(f"{flag}: REGEX is longer than {MAX_PATTERN} characters")
    if "\0" in pattern:
        raise OwnershipError(f"{flag}: REGEX {pattern!r} contains a NUL character")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise OwnershipError(
            f"{flag}: invalid regular expression {pattern!r}: {e}",
            hint="Python `re` syntax, matched against the whole absolute path "
            "(e.g. '^/nix/store/[^/]+-app/var(/.*)?$')",
        ) from None


def parse_id(text: str, what: str) -> int:
    """A numeric uid or gid in 0..MAX_ID."""
    if not (text.isascii() and _ID.fullmatch(text)) or int(text) > MAX_ID:
        raise OwnershipError(
            f"{what} {text!r} is not a number between 0 and {MAX_ID}",
            hint="give numeric ids (names mean nothing until the image's /etc/passwd is read)",
        )
    return int(text)


def parse_mode(text: str, what: str, *, allow_setid: bool = False) -> int:
    """An octal mode of 3 or 4 digits (``755``, ``0755``, ``1777``); setuid/setgid bits only
    with ``allow_setid``."""
    if not (text.isascii() and _OCTAL.fullmatch(text)):
        raise OwnershipError(
            f"{what} {text!r} is not an octal mode",
            hint="three or four octal digits, e.g. 0755, 0640 or 1777",
        )
    mode = int(text, 8)
    if mode & _SETID and not allow_setid:
        raise OwnershipError(
            f"{what} {text!r} sets the setuid/setgid bit",
            hint="pass --allow-setid if the image really needs it",
        )
    return mode


def parse_chown(text: str) -> Rule:
    """``REGEX=UID:GID`` (the last ``=`` separates; ids are numbers)."""
    pattern, value = _split(text, "--chown", "UID:GID")
    uid, sep, gid = value.partition(":")
    if not sep:
        raise OwnershipError(
            f"--chown {text!r}: owner {value!r} must be UID:GID",
            hint="e.g. --chown '^/nix/store/[^/]+-app/var(/.*)?$=1000:1000'",
        )
    return Rule(
        "chown",
        pattern,
        uid=parse_id(uid, f"--chown {text!r}: uid"),
        gid=parse_id(gid, f"--chown {text!r}: gid"),
    )


def parse_chmod(text: str, *, allow_setid: bool = False) -> Rule:
    """``REGEX=MODE`` with an octal MODE."""
    pattern, value = _split(text, "--chmod", "MODE")
    mode = parse_mode(value, f"--chmod {text!r}: mode", allow_setid=allow_setid)
    return Rule("chmod", pattern, mode=mode)


@dataclass(frozen=True)
class MkdirSpec:
    """A directory made in the customisation layer; ``uid``/``gid`` None: the image's
    ``--user`` (root without one); ``mode`` None: 0755, or the mode of a directory
    already there (``/tmp`` stays 1777)."""

    path: str
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None


def check_image_path(path: str, what: str) -> str:
    """``path`` as a normalised absolute path outside ``/nix``, or an error saying why."""
    hint = "an absolute, normalised path outside /nix, e.g. /var/lib/app"
    if not path.startswith("/") or path == "/":
        raise OwnershipError(f"{what}: {path!r} is not an absolute path below /", hint=hint)
    if "\0" in path or ":" in path or len(path.encode()) > MAX_PATH:
        raise OwnershipError(f"{what}: {path!r} contains ':' or NUL, or is too long", hint=hint)
    if posixpath.normpath(path) != path or path.startswith("//"):
        raise OwnershipError(
            f"{what}: {path!r} is not normalised (no '.', '..', '//' or trailing '/')",
            hint=f"write {posixpath.normpath(path)!r}" if ".." not in path else hint,
        )
    if path == "/nix" or path.startswith("/nix/"):
        raise OwnershipError(
            f"{what}: {path!r} is under /nix, which holds only the store",
            hint="store paths are read-only; make a directory elsewhere and point the app at it",
        )
    return path


def parse_mkdir(text: str, *, allow_setid: bool = False) -> MkdirSpec:
    """``PATH``, ``PATH:UID:GID`` or ``PATH:UID:GID:MODE``."""
    parts = text.split(":")
    if len(parts) not in (1, 3, 4):
        raise OwnershipError(
            f"--mkdir {text!r} must look like PATH, PATH:UID:GID or PATH:UID:GID:MODE",
            hint="e.g. --mkdir /var/lib/app:1000:1000:0750",
        )
    path = check_image_path(parts[0], f"--mkdir {text!r}")
    if len(parts) == 1:
        return MkdirSpec(path)
    uid = parse_id(parts[1], f"--mkdir {text!r}: uid")
    gid = parse_id(parts[2], f"--mkdir {text!r}: gid")
    if len(parts) == 3:
        return MkdirSpec(path, uid, gid)
    mode = parse_mode(parts[3], f"--mkdir {text!r}: mode", allow_setid=allow_setid)
    return MkdirSpec(path, uid, gid, mode)


class RuleSet:
    """The rules of one image, in command-line order; applied per tar entry."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules = tuple(rules)
        self._chown = [(i, r) for i, r in enumerate(self.rules) if r.kind == "chown"]
        self._chmod = [(i, r) for i, r in enumerate(self.rules) if r.kind == "chmod"]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def resolve(
        self, name: bytes, kind: str, mode: int, uid: int = 0, gid: int = 0
    ) -> tuple[int, int, int, set[int]]:
        """(mode, uid, gid) of the member ``name`` (relative, as in a tar) after the
        rules, and the indexes of the rules that decided them."""
        used: set[int] = set()
        if name in _NEVER:
            return mode, uid, gid, used
        path = "/" + name.decode("utf-8", "surrogateescape")
        for i, rule in self._chown:
            if rule.regex.fullmatch(path):
                uid, gid = rule.uid, rule.gid
                used.add(i)
                break
        if kind != "symlink":
            for i, rule in self._chmod:
                if rule.regex.fullmatch(path):
                    mode = rule.mode
                    used.add(i)
                    break
        return mode, uid, gid, used

    def apply(self, entries: Iterable[TarEntry], touched: set[int]) -> Iterator[TarEntry]:
        """``entries`` with the rules applied; the indexes of the rules used are added to
        ``touched`` as the entries go by."""
        for entry in entries:
            mode, uid, gid, used = self.resolve(
                entry.name, entry.kind, entry.mode, entry.uid, entry.gid
            )
            if used:
                touched |= used
                entry = replace(entry, mode=mode, uid=uid, gid=gid)
            yield entry

    def touching(self, entries: Iterable[TarEntry]) -> frozenset[int]:
        """The indexes of the rules that touch ``entries`` (read for names only)."""
        touched: set[int] = set()
        for _ in self.apply(entries, touched):
            pass
        return frozenset(touched)

    def key_doc(self, indexes: Iterable[int]) -> list[list[str]]:
        """The canonical form of the rules at ``indexes`` (command-line order), for
        cache keys: the same rules give the same key whatever else is on the line."""
        return [[self.rules[i].kind, self.rules[i].pattern, self.rules[i].value]
                for i in sorted(set(indexes))]  # fmt: skip

    def digest(self, indexes: Iterable[int]) -> str:
        """``sha256:<hex>`` of ``key_doc(indexes)``: what a layer's marker records."""
        text = json.dumps(self.key_doc(indexes), separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    def unused(self, touched: Iterable[int]) -> list[Rule]:
        """The rules whose index is not in ``touched``, in order."""
        seen = set(touched)
        return [r for i, r in enumerate(self.rules) if i not in seen]


def rules_from(chown: Sequence[str], chmod: Sequence[str], *, allow_setid: bool) -> list[Rule]:
    """Rules from ``--chown`` and ``--chmod`` values (chown rules first: each kind keeps
    its own order, and the kinds never compete)."""
    return [
        *(parse_chown(v) for v in chown),
        *(parse_chmod(v, allow_setid=allow_setid) for v in chmod),
    ]
