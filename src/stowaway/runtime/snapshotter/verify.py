"""Proof that a store layer is what its annotations claim, before it is committed
without a download.

A layer's ``stowaway.paths`` annotations are written by whoever built the image: any
image could name any host store path (another tenant's closure on a shared node) and,
were the claim trusted, read it. What is not the image author's to choose is the layer
containerd asks for: ``containerd.io/snapshot.ref`` is the chain ID of the layer's
diff_id, which the image config binds (and the registry's digests bind the config). So
the snapshotter rebuilds the layer's deterministic tar from the claimed paths on this
node (``image.tar``: the composer's own writer, hashed, never compressed or stored),
derives the chain ID from the parent's, and commits from the store only when it equals
the ref. Anything else (a wrong claim, an unknown tar setting, a parent that is no
chain ID) is an ordinary unpack: the image's own bytes, never the host's.

Hashing reads every file of the layer once; the result is remembered per node in the
snapshotter's database, keyed by (basenames, mtime): store paths on one node never
change, so each layer is hashed once, ever.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from stowaway.image.digest import chain_id
from stowaway.image.tar import store_path_entries, write_tar
from stowaway.runtime.metadata import MetaStore
from stowaway.store.model import STORE_DIR, NarEntry, PathInfo
from stowaway.store.nar import walk_path

__all__ = ["LayerProof", "is_digest", "layer_diff_id"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class _Located:
    """The store source the tar writer reads: each logical path from where it was found
    (the store or the local store)."""

    name = "located store paths"

    def __init__(self, located: Sequence[tuple[str, Path]]) -> None:
        self._dirs = dict(located)

    def query(self, path: str) -> PathInfo | None:  # the protocol's; never asked here
        return None

    def entries(self, path: str) -> Iterator[NarEntry]:
        return walk_path(self._dirs[path.rsplit("/", 1)[-1]])


def layer_diff_id(located: Sequence[tuple[str, Path]], mtime: int) -> str:
    """The diff_id of the layer the composer builds from these store paths."""
    sha = hashlib.sha256()
    paths = [f"{STORE_DIR}/{base}" for base, _ in located]
    for piece in write_tar(store_path_entries(_Located(located), paths), mtime=mtime):
        sha.update(piece)
    return "sha256:" + sha.hexdigest()


class LayerProof:
    """Checks claims against refs, hashing each (paths, mtime) once per node."""

    def __init__(self, meta: MetaStore) -> None:
        self.meta = meta
        #: layers hashed by this process (tests and logs tell first sight from memo)
        self.hashed = 0

    def diff_id(self, located: Sequence[tuple[str, Path]], mtime: int) -> str:
        key = hashlib.sha256(
            "\n".join([str(mtime), *sorted(base for base, _ in located)]).encode()
        ).hexdigest()
        known = self.meta.verified_diff_id(key)
        if known is not None:
            return known
        diff_id = layer_diff_id(located, mtime)
        self.hashed += 1
        self.meta.remember_diff_id(key, diff_id)
        return diff_id

    def holds(
        self, target: str, parent_chain: str | None, located: Sequence[tuple[str, Path]], mtime: int
    ) -> bool:
        """Whether the tar of ``located`` on top of the chain ``parent_chain`` ("" for a
        base layer, None when unknown) is the chain ``target``."""
        if parent_chain is None or not is_digest(target):
            return False  # nothing to prove the claim against
        if parent_chain and not is_digest(parent_chain):
            return False
        return chain_id(parent_chain, self.diff_id(located, mtime)) == target


def is_digest(text: str) -> bool:
    """``sha256:<64 lower-case hex>``, as chain IDs are written."""
    return _DIGEST.fullmatch(text) is not None
