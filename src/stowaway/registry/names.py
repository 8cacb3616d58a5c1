"""What a repository name and tag ask for, Nixery-style (pure functions).

``shell/git/htop:latest`` asks for the packages ``git`` and ``htop`` plus the
meta-package ``shell`` from the package set ``latest``; components are sorted
and de-duplicated, so ``htop/git`` is the same image. ``store/<hash>[/<hash>…]``
asks for store paths by their 32-character hash part.

Package names are matched case-sensitively against the index after the name
passed the distribution grammar (lower-case only); indexes carry a lower-case
alias table so ``bashInteractive`` is reachable as ``bashinteractive`` and
``python3Packages.requests`` as ``python3packages.requests``. A component that
is a meta-package name expands to its members (meta wins over an index key of
the same name); members and always-included names are index keys themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from stowaway.distribution.errors import ErrorCode, RegistryApiError
from stowaway.store.nixbase32 import ALPHABET
from stowaway.store.paths import HASH_LEN

STORE_PREFIX = "store"
DEFAULT_TAG = "latest"
_NIX32 = frozenset(ALPHABET)
T = TypeVar("T")


@dataclass(frozen=True)
class ImageName:
    """A parsed repository name: package names or store hash parts, sorted, unique."""

    packages: tuple[str, ...] = ()
    store_hashes: tuple[str, ...] = ()

    @property
    def is_store(self) -> bool:
        return bool(self.store_hashes)


def parse_image_name(name: str) -> ImageName:
    """Split a (grammar-checked) repository name into what it asks for."""
    parts = name.split("/")
    if parts[0] != STORE_PREFIX:
        return ImageName(packages=tuple(sorted(set(parts))))
    hashes = parts[1:]
    if not hashes:
        raise RegistryApiError.of(
            ErrorCode.NAME_INVALID, f"{name!r}: store/ needs at least one store path hash part"
        )
    for h in hashes:
        if len(h) != HASH_LEN or not set(h) <= _NIX32:
            raise RegistryApiError.of(
                ErrorCode.NAME_INVALID,
                f"{name!r}: {h!r} is not a store path hash part "
                f"({HASH_LEN} characters of {ALPHABET})",
            )
    return ImageName(store_hashes=tuple(sorted(set(hashes))))


def expand_packages(
    requested: Iterable[str], meta: Mapping[str, Sequence[str]], always: Sequence[str]
) -> tuple[str, ...]:
    """Requested names with meta-packages replaced by their members, plus the
    always-included names; sorted and unique (one level: members are not meta)."""
    out: set[str] = set(always)
    for name in requested:
        out.update(meta.get(name, (name,)))
    return tuple(sorted(out))


def resolve_packages(
    names: Sequence[str], lookup: Callable[[str], T | None], where: str
) -> dict[str, T]:
    """``name -> store path`` for every name, or MANIFEST_UNKNOWN naming all the
    names ``lookup`` does not know (``where`` says which image and package set)."""
    found: dict[str, T] = {}
    unknown: list[str] = []
    for name in names:
        path = lookup(name)
        if path is None:
            unknown.append(name)
        else:
            found[name] = path
    if unknown:
        raise RegistryApiError.of(
            ErrorCode.MANIFEST_UNKNOWN,
            f"{where}: unknown package{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
        )
    return found


def select_package_set(tag: str, sets: Mapping[str, T], name: str) -> T:
    """The package set a tag selects, or MANIFEST_UNKNOWN naming the known tags."""
    try:
        return sets[tag]
    except KeyError:
        known = ", ".join(sorted(sets)) or "none"
        raise RegistryApiError.of(
            ErrorCode.MANIFEST_UNKNOWN,
            f"{name}:{tag}: no package set is called {tag!r} (known tags: {known})",
        ) from None
