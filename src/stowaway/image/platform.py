"""The platform an image is for (OCI ``os``/``architecture``/``variant``) and where the
composer learns it: the Nix ``system`` of the derivations that built the roots.

A closure built for aarch64-linux labelled amd64 would be pulled by the wrong machines
and fail with ``exec format error``, so ``build`` reads each root's deriver (a ``.drv``
in the store, when it is still there) rather than assuming this machine's architecture;
only when no root has a readable deriver does this machine's architecture stand in.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from stowaway.errors import StowawayError
from stowaway.image.config import OCI_ARCHITECTURES, ImageOptions, default_architecture
from stowaway.store.drv import parse_drv
from stowaway.store.model import PathInfo, StoreSource

__all__ = [
    "NIX_SYSTEMS",
    "ClosurePlatform",
    "Platform",
    "PlatformError",
    "closure_platform",
    "host_platform",
    "parse_platform",
    "platform_of_system",
    "with_platform",
]

#: A .drv read to learn its system is at most this large (real ones are kilobytes).
DRV_LIMIT = 16 << 20
_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")


class PlatformError(StowawayError):
    """A platform that cannot be parsed, or roots that disagree on theirs."""


@functools.total_ordering
@dataclass(frozen=True)
class Platform:
    """An OCI platform: ``linux/arm64``, ``linux/arm/v7``."""

    os: str
    architecture: str
    variant: str | None = None

    def __lt__(self, other: Platform) -> bool:
        """By os, architecture, variant (none first): an index lists its images in one
        order (a generated order would compare None with a variant and fail)."""
        mine = (self.os, self.architecture, self.variant or "")
        return mine < (other.os, other.architecture, other.variant or "")

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    def to_json(self) -> dict[str, str]:
        """The ``platform`` object of an index entry (and the config's fields)."""
        doc = {"architecture": self.architecture, "os": self.os}
        return doc | ({"variant": self.variant} if self.variant else {})

    def matches(self, other: Platform) -> bool:
        """Same os and architecture, and the same variant unless one of them names none."""
        return (self.os, self.architecture) == (other.os, other.architecture) and (
            self.variant is None or other.variant is None or self.variant == other.variant
        )


#: Nix systems → the platform their binaries run on (Linux only: no other OS runs
#: Linux containers' binaries).
NIX_SYSTEMS = {
    "x86_64-linux": Platform("linux", "amd64"),
    "aarch64-linux": Platform("linux", "arm64"),
    "i686-linux": Platform("linux", "386"),
    "armv7l-linux": Platform("linux", "arm", "v7"),
    "armv6l-linux": Platform("linux", "arm", "v6"),
    "powerpc64le-linux": Platform("linux", "ppc64le"),
    "riscv64-linux": Platform("linux", "riscv64"),
    "s390x-linux": Platform("linux", "s390x"),
}
#: Systems of derivations that run on no machine of their own (``builtin:fetchurl``):
#: they say nothing about the image's platform.
NEUTRAL_SYSTEMS = frozenset({"builtin"})


def platform_of_system(system: str) -> Platform | None:
    """The platform of a Nix system, or None for one no Linux container runs."""
    return NIX_SYSTEMS.get(system)


def host_platform() -> Platform:
    """``linux/<this machine's architecture>``."""
    return Platform("linux", default_architecture())


def parse_platform(value: str, what: str = "--platform") -> Platform:
    """``OS/ARCH[/VARIANT]``; CPU names are normalised as containerd does (``x86_64`` →
    ``amd64``, ``aarch64`` → ``arm64``)."""
    parts = value.lower().split("/")
    if len(parts) not in (2, 3) or not all(_PART.fullmatch(p) for p in parts):
        raise PlatformError(
            f"{what} {value!r} is not a platform",
            hint="write OS/ARCH[/VARIANT], e.g. linux/amd64, linux/arm64 or linux/arm/v7",
        )
    arch = OCI_ARCHITECTURES.get(parts[1], parts[1])
    return Platform(parts[0], arch, parts[2] if len(parts) == 3 else None)


def with_platform(options: ImageOptions, platform: Platform) -> ImageOptions:
    """``options`` for an image of ``platform``."""
    return dataclasses.replace(
        options, os=platform.os, architecture=platform.architecture, variant=platform.variant
    )


@dataclass(frozen=True)
class ClosurePlatform:
    """The platform of a closure and where it came from: the roots' ``derivations``,
    the ``host`` (no root had a readable deriver) or the ``flag``."""

    platform: Platform
    origin: Literal["derivations", "host", "flag"]
    #: root → Nix system, for the roots whose deriver was read
    systems: Mapping[str, str]

    def to_json(self) -> dict[str, object]:
        return {"platform": str(self.platform), "origin": self.origin, "systems": self.systems}


def closure_platform(
    source: StoreSource,
    roots: Sequence[str],
    closure: Mapping[str, PathInfo],
    *,
    explicit: Platform | None = None,
    check_explicit: bool = False,
) -> ClosurePlatform:
    """The platform of the image of ``roots``: ``explicit`` when given (checked against
    the derivations only with ``check_explicit``), else the one platform the roots'
    derivations are for, else this machine's. Roots built for different platforms, or
    for a system no Linux container runs, are a PlatformError."""
    if explicit is not None and not check_explicit:
        return ClosurePlatform(explicit, "flag", {})
    systems = {r: s for r in roots if (s := _root_system(source, closure.get(r))) is not None}
    found: dict[Platform, list[str]] = {}
    for root, system in systems.items():
        if system in NEUTRAL_SYSTEMS:
            continue
        plat = platform_of_system(system)
        if plat is None:
            raise PlatformError(
                f"{root} was built for Nix system {system!r}, which no Linux container runs",
                hint="build it for a *-linux system, or say the platform with --platform OS/ARCH",
            )
        found.setdefault(plat, []).append(root)
    if len(found) > 1:
        said = "; ".join(f"{p}: {', '.join(rs)}" for p, rs in sorted(found.items()))
        raise PlatformError(
            f"the roots were built for different platforms ({said})",
            hint="give each platform its own image: --platform OS/ARCH=INSTALLABLE per "
            "platform (an image index), or say which one this image is with --platform",
        )
    if explicit is not None:
        for plat, built in found.items():
            if not explicit.matches(plat):
                raise PlatformError(
                    f"--platform {explicit}: {', '.join(built)} was built for {plat}",
                    hint=f"pair it with --platform {plat}=…, or pass the {explicit} build",
                )
        return ClosurePlatform(explicit, "flag", systems)
    if found:
        return ClosurePlatform(next(iter(found)), "derivations", systems)
    return ClosurePlatform(host_platform(), "host", systems)


def _root_system(source: StoreSource, info: PathInfo | None) -> str | None:
    """The ``system`` of the derivation that built ``info``, or None when it has no
    deriver or the .drv is not in ``source`` (garbage-collected, or a binary cache)."""
    if info is None or not info.deriver or not info.deriver.endswith(".drv"):
        return None
    data = bytearray()
    try:
        if source.query(info.deriver) is None:
            return None
        for entry in source.entries(info.deriver):
            if entry.kind != "regular" or entry.path or entry.size > DRV_LIMIT:
                return None  # not a .drv file: it cannot tell
            for chunk in entry.chunks:
                data += chunk
    except StowawayError:  # a cache that is down or untrusted, a path gone: no answer
        return None
    return parse_drv(bytes(data), info.deriver).system
