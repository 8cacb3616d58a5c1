"""containerd's Snapshotter contract in Python: kinds, infos, usage, mounts and errors.

Why a separate abstract class: the gRPC servicer (``snapshots_service``) adapts *any*
implementation to containerd's snapshots v1 API, mapping the four error classes below
to status codes, so the engine never imports gRPC and tests can drive it directly.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from stowaway.errors import StowawayError

__all__ = [
    "AlreadyExists",
    "FailedPrecondition",
    "Info",
    "InvalidArgument",
    "Kind",
    "Mount",
    "NotFound",
    "SnapshotError",
    "Snapshotter",
    "Usage",
]


class SnapshotError(StowawayError):
    """Base of the errors a snapshotter answers; subclasses map to gRPC codes."""


class NotFound(SnapshotError):
    """The named snapshot (or parent) does not exist."""


class AlreadyExists(SnapshotError):
    """The key is taken, or (for a stowaway layer) the target is already committed."""


class FailedPrecondition(SnapshotError):
    """The snapshot is in the wrong state (e.g. removing a parent, committing a view)."""


class InvalidArgument(SnapshotError):
    """A request that can never succeed as written (bad labels, bad filter, bad key)."""


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as in containerd's snapshots v1 ``Kind`` enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class Info:
    """What Stat/List report. Times are nanoseconds since the epoch (UTC)."""

    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    """Disk used by a snapshot's own directory (not its parents)."""

    size: int
    inodes: int


@dataclass(frozen=True)
class Mount:
    """One mount(2) call as containerd performs it: type, source, fstab-style options;
    ``target`` (containerd ≥ 1.7) mounts at that path inside the rootfs, after the
    mounts before it, instead of on the rootfs itself."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


class Snapshotter(ABC):
    """containerd's snapshotter methods; keys and names are opaque strings."""

    @abstractmethod
    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """Create an active (writable) snapshot on top of committed ``parent``."""

    @abstractmethod
    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """Create a read-only view of committed ``parent``."""

    @abstractmethod
    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active snapshot or view."""

    @abstractmethod
    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        """Turn active ``key`` into committed ``name`` (``key`` disappears)."""

    @abstractmethod
    def remove(self, key: str) -> None:
        """Remove a snapshot without children."""

    @abstractmethod
    def stat(self, key: str) -> Info:
        """Info of one snapshot."""

    @abstractmethod
    def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        """Update mutable fields (labels); empty ``fieldpaths`` means all of them."""

    @abstractmethod
    def walk(self, filters: Sequence[str]) -> Iterator[Info]:
        """Snapshots matching any of ``filters`` (all when empty)."""

    @abstractmethod
    def usage(self, key: str) -> Usage:
        """Disk usage of one snapshot."""

    @abstractmethod
    def cleanup(self) -> None:
        """Remove on-disk leftovers no snapshot refers to."""
