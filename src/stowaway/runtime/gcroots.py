"""GC roots for the store paths snapshots use, in Nix's own layout.

Nix treats every symlink below ``/nix/var/nix/gcroots`` that points at a store path as
a root, so ``<dir>/<basename> -> <store>/<basename>`` keeps ``nix-collect-garbage``
away from paths a container may read. The snapshotter owns ``<dir>`` outright: at
start-up it is reconciled with the metadata (roots added or dropped), so a crash
between a metadata change and a root change heals itself.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path

from stowaway.store.paths import is_basename

__all__ = ["GcRoots"]


class GcRoots:
    """Symlinks ``<dir>/<basename>`` pointing at ``<store_dir>/<basename>``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def add(self, target: Path) -> None:
        """Root ``target`` (a store path on disk); atomic: a new root is one symlink
        call, a root to replace is a symlink to a temp name renamed over it.

        The temp name is unique per call (pid, thread, random token): threads rooting
        the same path at once each rename their own link; the last one wins, same target.
        """
        link = self.dir / target.name
        try:
            if os.readlink(link) == str(target):
                return
        except FileNotFoundError:
            try:
                os.symlink(target, link)
                return
            except FileExistsError:  # another thread's root, maybe elsewhere: replace
                pass
        except OSError:
            pass
        token = f"{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
        tmp = self.dir / f".tmp-{token}-{target.name}"
        os.symlink(target, tmp)
        try:
            os.replace(tmp, link)
        except BaseException:
            os.unlink(tmp)
            raise

    def remove(self, basename: str) -> None:
        try:
            os.unlink(self.dir / basename)
        except FileNotFoundError:
            pass

    def rooted(self) -> set[str]:
        """Basenames rooted now (anything else in the directory is not ours to keep)."""
        return {p.name for p in self.dir.iterdir() if p.is_symlink() and is_basename(p.name)}

    def reconcile(self, wanted: Iterable[Path]) -> None:
        """Make the directory hold exactly the roots for ``wanted`` (store paths on disk)."""
        want = {p.name: p for p in wanted}
        for entry in self.dir.iterdir():
            if entry.name not in want and (entry.is_symlink() or entry.is_file()):
                entry.unlink()
        for p in want.values():
            self.add(p)
