"""Unpack an image's layers into a containerd snapshotter the way containerd's unpacker
(and CRI's PullImage) does, so a remote snapshotter can skip layers.

For each layer, bottom to top: ``Stat(chainID)``; else ``Prepare`` with the layer's
``containerd.io/snapshot/*`` annotations plus ``containerd.io/snapshot.ref=<chainID>``;
ALREADY_EXISTS means the snapshotter committed the layer itself (the stowaway
snapshotter does so from the Nix store) and its blob is never needed; otherwise the
blob is fetched into the content store only now, ``Apply``-ed and committed. Shared by
the CRI image service (``nix:0`` images) and ``stowaway pull``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

from stowaway.image.annotations import REF_LABEL, SNAPSHOT_LABEL_PREFIX
from stowaway.image.digest import chain_ids
from stowaway.image.model import Layer
from stowaway.runtime.containerd_client import ContainerdClient, ContainerdError

__all__ = ["unpack_layers"]


def unpack_layers(
    client: ContainerdClient,
    snapshotter: str,
    layers: Sequence[Layer],
    fetch: Callable[[Layer], object],
) -> tuple[str, list[Layer]]:
    """Unpack ``layers``; ``fetch(layer)`` must put a layer's blob into containerd's
    content store and is called only for layers that have to be applied.

    Returns the top chain ID and the layers that were fetched and applied."""
    chains = chain_ids([layer.diff_id for layer in layers])
    parent = ""
    applied: list[Layer] = []
    for layer, chain in zip(layers, chains, strict=True):
        if not client.snapshot_exists(snapshotter, chain):
            labels = {
                k: v for k, v in layer.annotations.items() if k.startswith(SNAPSHOT_LABEL_PREFIX)
            }
            labels[REF_LABEL] = chain
            key = f"extract-{uuid.uuid4().hex} {chain}"
            mounts = client.prepare(snapshotter, key, parent, labels)
            if mounts is None:  # the snapshotter had the layer already
                if not client.snapshot_exists(snapshotter, chain):
                    raise ContainerdError(
                        f"snapshotter {snapshotter} answered ALREADY_EXISTS for {chain} "
                        "but has no such snapshot"
                    )
            else:
                try:
                    fetch(layer)
                    got = client.apply(layer.descriptor(), mounts)
                    if got != layer.diff_id:
                        raise ContainerdError(
                            f"layer {layer.digest} unpacked to {got}, the image config "
                            f"says {layer.diff_id}"
                        )
                    client.commit(snapshotter, chain, key, labels)
                    applied.append(layer)
                finally:
                    client.remove_snapshot(snapshotter, key)  # gone after commit; else cleanup
        parent = chain
    return parent, applied
