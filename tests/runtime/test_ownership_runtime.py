"""End to end with real containerd + runc through the stowaway snapshotter: a layer whose
owners were changed by --chown is downloaded and unpacked (the host store's files are
not its files) and shows the new owner in a running container; a --mkdir directory is
writable by the image's --user (nobody: 65534); layers no rule touches still come from
the host store without a download."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_helpers import (
    NS,
    SnapshotterDaemon,
    blob_gets,
    cri_pull,
    layer_labels,
    manifest_layers,
)

from daemons import Containerd, Registry
from stowaway.image.annotations import PATHS_PREFIX, REF_LABEL, RULES_LABEL
from stowaway.image.compose import compose
from stowaway.image.config import ImageOptions
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings, build_layers
from stowaway.image.ownership import RuleSet, parse_mkdir, rules_from
from stowaway.layering.model import PlannedLayer
from stowaway.runtime.snapshotter.contract import AlreadyExists, Kind
from stowaway.runtime.snapshotter.state import SnapshotterConfig
from stowaway.runtime.snapshotter.store_snapshotter import StoreSnapshotter
from stowaway.sinks.registry import push
from stowaway.store.local import LocalStore

GREETING = "/nix/store/[^/]+-greeting-data/share/greeting(/.*)?"


@pytest.fixture()
def ruled_ref(demo_app: str, registry: Registry, tmp_path: Path, local_store: LocalStore) -> str:
    closure = local_store.closure_infos([demo_app])
    busybox = next(p for p in closure if p.endswith("-busybox"))
    options = ImageOptions(
        entrypoint=[f"{demo_app}/bin/demo"],
        contents=[busybox],
        user="nobody",
        rules=rules_from(
            [f"{GREETING}=1234:2345"], [f"{GREETING[:-6]}/message=0640"], allow_setid=False
        ),  # fmt: skip
        mkdirs=[parse_mkdir("/var/lib/app")],
    )
    result = compose(
        local_store, [demo_app], options, closure=closure, settings=LayerSettings(),
        cache=LayerCache(tmp_path / "cache"),
    )  # fmt: skip
    push(result.image, registry.host, "ruled", "v1", tls_verify=False)
    return f"{registry.host}/ruled:v1"


def test_ruled_layer_is_unpacked_with_its_owners_and_others_come_from_the_store(
    containerd: Containerd,
    registry: Registry,
    ruled_ref: str,
    demo_closure: list[str],
    snapshotter: SnapshotterDaemon,
) -> None:
    layers = manifest_layers(registry, "ruled", "v1")
    notes = [dict(ly.get("annotations") or {}) for ly in layers]  # type: ignore[call-overload]
    ruled = {str(ly["digest"]) for ly, n in zip(layers, notes, strict=True) if RULES_LABEL in n}
    plain = {
        str(ly["digest"])
        for ly, n in zip(layers, notes, strict=True)
        if RULES_LABEL not in n and any(k.startswith(PATHS_PREFIX) for k in n)
    }
    assert len(ruled) == 1 and len(plain) == 2
    cri_pull(containerd, ruled_ref)
    fetched = blob_gets(registry)
    assert ruled <= fetched, "the ruled layer must be downloaded and unpacked"
    assert not fetched & plain, "untouched store layers must come from the host store"
    log = snapshotter.log_text()
    assert "owners/modes changed by rules; containerd will unpack it" in log
    assert log.count(": committed stowaway/") == 2, log  # the plain ones, from the store

    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    bb = f"{busybox}/bin/busybox"
    script = "; ".join(
        [
            f"{bb} id -u",
            f"{bb} stat -c '%u:%g %a' {greeting}/share/greeting/message",
            f"{bb} stat -c '%u:%g %a' {greeting}/share",
            f"{bb} stat -c '%u:%g %a' /var/lib/app",
            f"{bb} touch /var/lib/app/written && echo writable",
            f"{bb} stat -c '%u:%g' {busybox}/bin/busybox",
        ]
    )
    run = ["run", "--rm", "--snapshotter", "stowaway", ruled_ref, "own1"]
    out = containerd.ctr(*run, bb, "sh", "-c", script, namespace=NS).stdout.split("\n")
    assert out[:6] == [
        "65534",  # the image's User: nobody
        "1234:2345 640",  # --chown and --chmod, in the unpacked layer
        "0:0 555",  # untouched parent in the same layer
        "65534:65534 755",  # --mkdir, owned by --user
        "writable",
        "0:0",  # from the host store, as the store has it
    ], out


@pytest.fixture()
def snap(tmp_path: Path) -> Iterator[StoreSnapshotter]:
    s = StoreSnapshotter(SnapshotterConfig(root=tmp_path / "root", gcroots=tmp_path / "gc"))
    yield s
    s.close()


def test_marked_layers_unpack_without_a_proof_and_unmarked_ones_fail_it(
    snap: StoreSnapshotter,
    demo_closure: list[str],
    local_store: LocalStore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The marker only saves the node a hash: a ruled layer whose marker was stripped
    still names store paths, but their tar is not the layer, so it is unpacked too."""
    caplog.set_level(logging.INFO)
    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    rules = RuleSet(rules_from([f"{GREETING}=1234:2345"], [], allow_setid=False))
    (layer,) = build_layers(
        local_store, [PlannedLayer((greeting,), 0)], local_store.closure_infos([greeting]),
        LayerSettings(), LayerCache(tmp_path / "cache"), rules=rules,
    )  # fmt: skip
    marked = {**layer.annotations, REF_LABEL: layer.diff_id}  # a base layer: chain = diff_id
    assert marked.keys() == {*layer_labels([greeting]), RULES_LABEL}
    snap.prepare("marked", "", marked)
    assert snap.stat("marked").kind == Kind.ACTIVE and snap.proof.hashed == 0
    assert "owners/modes changed by rules" in caplog.text
    stripped = {k: v for k, v in marked.items() if k != RULES_LABEL}
    snap.prepare("stripped", "", stripped)
    assert snap.stat("stripped").kind == Kind.ACTIVE and snap.proof.hashed == 1
    assert "do not make that layer" in caplog.text
    assert not [i for i in snap.walk([]) if i.name.startswith("stowaway/")]
    with pytest.raises(AlreadyExists):  # the plain layer of the same path: from the store
        snap.prepare("plain", "", layer_labels([greeting]))
