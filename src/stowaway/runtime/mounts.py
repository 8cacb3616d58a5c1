"""The pure function from a snapshot record to the mounts containerd performs.

Ordinary chains get exactly what containerd's overlayfs snapshotter returns (a bind
mount for a parentless active snapshot or a one-parent view, else one overlay).
A chain holding a stowaway layer in ``overlay`` mode is always one overlay whose lower
layers end with the store directories as *data-only* layers (``…::STORE``) and which
turns on ``metacopy`` and ``redirect_dir`` — never a bind of a stub tree, whose files
are empty stubs without the data layer. One mount, no mount tree: containerd 1.6
unmounts temporary rootfs mounts non-recursively.

In ``bind`` mode (containerd ≥ 1.7 only) a chain holding store layers gets the ordinary
mounts (its store layers' snapshots hold just mount points) followed by one read-only
bind per store path with ``target=/nix/store/<basename>``, as nix-snapshotter does
(``ro``, ``rbind``); containerd mounts each onto the rootfs in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stowaway.runtime.metadata import Record
from stowaway.runtime.snapshotter.contract import Kind, Mount
from stowaway.runtime.stub_trees import Mode

__all__ = ["Layout", "mounts", "store_binds"]


@dataclass(frozen=True)
class Layout:
    """Where snapshot directories live and how store paths reach the rootfs."""

    snapshots_dir: Path
    mode: Mode
    data_dirs: tuple[Path, ...] = ()
    index_off: bool = True  # as containerd: the kernel knows `index`, so turn it off
    #: Short symlinks ``<link_dir>/<id>`` to each ``fs`` dir, used in ``lowerdir``: the
    #: options must fit in one page, and containerd 1.6 cannot shorten (by chdir) a
    #: lowerdir holding ``::``. ~25 bytes a layer instead of ~60: > 120 layers fit.
    link_dir: Path | None = None

    def fs(self, sid: int) -> Path:
        return self.snapshots_dir / str(sid) / "fs"

    def lower(self, sid: int) -> Path:
        return self.link_dir / str(sid) if self.link_dir else self.fs(sid)

    def work(self, sid: int) -> Path:
        return self.snapshots_dir / str(sid) / "work"


def _bind(source: Path, rw: bool) -> list[Mount]:
    return [Mount("bind", str(source), ("rw" if rw else "ro", "rbind"))]


def store_binds(paths: Sequence[Path]) -> list[Mount]:
    """Read-only binds of store paths (on disk) onto ``/nix/store/<basename>`` in the
    rootfs; one per basename, sorted so the same chain gives the same mounts."""
    by_base = {p.name: p for p in paths}
    return [
        Mount("bind", str(by_base[b]), ("ro", "rbind"), target=f"/nix/store/{b}")
        for b in sorted(by_base)
    ]


def mounts(rec: Record, layout: Layout, bind_paths: Sequence[Path] = ()) -> list[Mount]:
    """Mounts for an active snapshot or view ``rec`` (parent chain in ``rec.chain``);
    in ``bind`` mode ``bind_paths`` are the chain's store paths that need a bind (not
    symlinks: those are in the stub tree as they are)."""
    if layout.mode == "bind":
        return _ordinary(rec, layout, False) + store_binds(bind_paths)
    return _ordinary(rec, layout, layout.mode == "overlay" and (rec.nix or any(rec.chain_nix)))


def _ordinary(rec: Record, layout: Layout, data_only: bool) -> list[Mount]:
    """containerd's overlayfs snapshotter's mounts; with the store as data-only lower
    layers when ``data_only``."""
    active = rec.kind == Kind.ACTIVE
    if not rec.chain:
        return _bind(layout.fs(rec.id), active)
    if not active and len(rec.chain) == 1 and not data_only:
        return _bind(layout.fs(rec.chain[0]), False)
    options: list[str] = []
    if layout.index_off:
        options.append("index=off")
    if active:
        options += [f"workdir={layout.work(rec.id)}", f"upperdir={layout.fs(rec.id)}"]
    lower = ":".join(str(layout.lower(p)) for p in rec.chain)
    if data_only:
        lower += "".join(f"::{d}" for d in layout.data_dirs)
    options.append(f"lowerdir={lower}")
    if data_only:
        options += ["metacopy=on", "redirect_dir=on"]
    return [Mount("overlay", "overlay", tuple(options))]
