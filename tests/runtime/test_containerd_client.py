"""ContainerdClient against a real containerd: leases are per thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import Containerd
from stowaway.runtime.containerd_client import ContainerdClient, mount_from_pb, mount_to_pb
from stowaway.runtime.snapshotter.contract import Mount


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[ContainerdClient]:
    with Containerd(tmp_path) as ctrd:
        c = ContainerdClient(ctrd.address, namespace="leasetest")
        try:
            yield c
        finally:
            c.close()


def _lease_of(c: ContainerdClient) -> str | None:
    return dict(c._md()).get("containerd-lease")


def test_concurrent_leases_stay_with_their_thread(client: ContainerdClient) -> None:
    """Pull A takes a lease, pull B takes one, A finishes first: B's calls keep B's lease
    (a shared attribute would have left B with none, or with A's deleted one)."""
    step = threading.Barrier(2)
    seen: dict[str, list[str | None]] = {"a": [], "b": []}

    def pull(me: str) -> None:
        if me == "b":
            step.wait()  # 1: A holds its lease
        with client.lease() as lid:
            seen[me].append(lid)
            if me == "a":
                step.wait()  # 1
                step.wait()  # 2: B holds its lease
            else:
                step.wait()  # 2
                step.wait()  # 3: A has left its lease
            seen[me].append(_lease_of(client))
        if me == "a":
            step.wait()  # 3
        seen[me].append(_lease_of(client))

    threads = [threading.Thread(target=pull, args=(m,)) for m in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    a, b = seen["a"], seen["b"]
    assert a[0] != b[0] and a[0] and b[0]
    assert a == [a[0], a[0], None] and b == [b[0], b[0], None]
    assert _lease_of(client) is None  # the main thread never held one


def test_mounts_keep_their_target_both_ways() -> None:
    """Bind mode (containerd >= 1.7) mounts each store path at a ``target`` inside the
    rootfs; a client that dropped it would bind them over the rootfs itself."""
    m = Mount("bind", "/nix/store/x", ("ro", "rbind"), "/nix/store/x")
    wire = mount_to_pb(m).SerializeToString()
    assert mount_from_pb(type(mount_to_pb(m)).FromString(wire)) == m
