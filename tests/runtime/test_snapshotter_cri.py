"""End to end with real containerd 1.6 + runc: CRI PullImage through the stowaway
snapshotter skips store-path blobs; `ctr run` composes the rootfs from the host store;
an ordinary image works; the snapshotter survives kill + restart."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

from runtime_helpers import (
    NS,
    SnapshotterDaemon,
    StowawayContainerd,
    blob_get_counts,
    blob_gets,
    busybox_oci,
    cri_pull,
    cri_remove,
    manifest_layers,
    store_layer_digests,
)

from daemons import Containerd, Registry, wait_for
from stowaway.image.annotations import PATHS_PREFIX


def wait_reconnected(containerd: Containerd, timeout: float = 15) -> None:
    """containerd's gRPC channel to a restarted proxy plugin reconnects with backoff."""

    def listed() -> bool:
        ls = ["snapshots", "--snapshotter", "stowaway", "ls"]
        return containerd.ctr(*ls, check=False, namespace=NS).returncode == 0

    wait_for(listed, timeout, "containerd to reach the restarted snapshotter", interval=0.2)


def tree_hash(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames.sort()
            for n in sorted(filenames):
                f = Path(dirpath, n)
                h.update(f"{f}\0".encode() + (b"" if f.is_symlink() else f.read_bytes()))
    return h.hexdigest()


def test_cri_pull_skips_store_layers_and_runs(
    containerd: Containerd,
    registry: Registry,
    demo_ref: str,
    demo_closure: list[str],
    demo_app: str,
    snapshotter: SnapshotterDaemon,
) -> None:
    layers = manifest_layers(registry, "demo", "v1")
    store_layers = store_layer_digests(layers)
    assert store_layers and len(store_layers) < len(layers)
    cri_pull(containerd, demo_ref)
    fetched = blob_gets(registry)
    assert not fetched & store_layers, "store-path layers were downloaded"
    assert {str(ly["digest"]) for ly in layers} - store_layers <= fetched

    before = tree_hash(demo_closure)
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    run = ["run", "--rm", "--snapshotter", "stowaway", demo_ref]
    out = containerd.ctr(*run, "demo1", namespace=NS).stdout
    assert "hello from stowaway" in out
    ls = containerd.ctr(*run, "ls1", f"{busybox}/bin/ls", "/nix/store", namespace=NS).stdout
    assert sorted(ls.split()) == sorted(os.path.basename(p) for p in demo_closure)
    script = f"echo tampered > {demo_app}/bin/demo; cat {demo_app}/bin/demo"
    out = containerd.ctr(*run, "w1", f"{busybox}/bin/sh", "-c", script, namespace=NS).stdout
    assert out.strip() == "tampered"
    assert tree_hash(demo_closure) == before  # the host store never changed

    # restart: a running container survives, a new one starts from the same image
    containerd.ctr(
        "run", "-d", "--snapshotter", "stowaway", demo_ref, "long",
        f"{busybox}/bin/busybox", "sleep", "60", namespace=NS,
    )  # fmt: skip
    snapshotter.kill()
    snapshotter.start()
    wait_reconnected(containerd)
    tasks = containerd.ctr("tasks", "ls", namespace=NS).stdout
    assert re.search(r"^long\s+\d+\s+RUNNING", tasks, re.M), tasks
    assert "hello from stowaway" in containerd.ctr(*run, "demo2", namespace=NS).stdout
    containerd.ctr("tasks", "kill", "-s", "SIGKILL", "long", namespace=NS)
    running = re.compile(r"^long\s+\d+\s+RUNNING", re.M)
    wait_for(
        lambda: not running.search(containerd.ctr("tasks", "ls", namespace=NS).stdout),
        10,
        "the killed task to stop",
    )
    containerd.ctr("tasks", "delete", "-f", "long", namespace=NS, check=False)


def test_ordinary_image_pull_and_run(
    containerd: Containerd, registry: Registry, tmp_path: Path
) -> None:
    layout = busybox_oci(tmp_path)
    ref = f"{registry.host}/bb:latest"
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:latest", f"docker://{ref}"],
        check=True,
        capture_output=True,
    )
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "stowaway", ref)
    out = containerd.ctr(
        "run", "--rm", "--snapshotter", "stowaway", ref, "bb1", "/bin/cat", "/hello.txt"
    ).stdout
    assert out == "ordinary layer\n"
    snaps = containerd.ctr("snapshots", "--snapshotter", "stowaway", "ls").stdout
    assert "Committed" in snaps


def test_cri_pull_with_paths_absent_downloads_and_runs(
    tmp_path: Path, registry: Registry, demo_ref: str
) -> None:
    """Store without the closure, no substituter: containerd downloads + unpacks every
    layer through the snapshotter's ordinary path, and the image still runs."""
    empty = tmp_path / "empty-store"
    empty.mkdir()
    before = blob_get_counts(registry)
    with SnapshotterDaemon(tmp_path, store=str(empty)) as snap:
        plugins = {"stowaway": {"type": "snapshot", "address": snap.socket}}
        StowawayContainerd.registry_host = registry.host
        with StowawayContainerd(tmp_path, cri=True, proxy_plugins=plugins) as ctrd:
            cri_pull(ctrd, demo_ref)
            out = ctrd.ctr("run", "--rm", "--snapshotter", "stowaway", demo_ref, "d", namespace=NS)
            assert "hello from stowaway" in out.stdout
    layers = {str(ly["digest"]) for ly in manifest_layers(registry, "demo", "v1")}
    fetched = blob_get_counts(registry) - before
    assert layers <= set(fetched), "every layer is downloaded when the store lacks the paths"


def test_cri_pull_substitutes_absent_paths_and_gc_frees_them(
    tmp_path: Path,
    registry: Registry,
    demo_ref: str,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
) -> None:
    """Store without the closure, a signed binary cache: the store layers' paths are
    substituted into --local-store instead of downloaded, and the image runs. CRI
    RemoveImage lets containerd's GC remove the snapshots and then call Cleanup, which
    deletes the substituted paths no snapshot uses any more."""
    empty, local = tmp_path / "empty-store", tmp_path / "local"
    empty.mkdir()
    layers = manifest_layers(registry, "demo", "v1")
    store_layers = store_layer_digests(layers)
    before = blob_get_counts(registry)
    args = ["--local-store", str(local), "--substituter", signed_caches["zstd"],
            "--trusted-public-key", cache_keys["good"]]  # fmt: skip
    with SnapshotterDaemon(tmp_path, *args, store=str(empty)) as snap:
        plugins = {"stowaway": {"type": "snapshot", "address": snap.socket}}
        StowawayContainerd.registry_host = registry.host
        with StowawayContainerd(tmp_path, cri=True, proxy_plugins=plugins) as ctrd:
            image_id = cri_pull(ctrd, demo_ref)
            fetched = set(blob_get_counts(registry) - before)
            assert not fetched & store_layers, "store-path layers were downloaded"
            assert {str(ly["digest"]) for ly in layers} - store_layers <= fetched
            assert sorted(os.listdir(local)) == sorted(os.path.basename(p) for p in demo_closure)
            out = ctrd.ctr("run", "--rm", "--snapshotter", "stowaway", demo_ref, "s", namespace=NS)
            assert "hello from stowaway" in out.stdout

            cri_remove(ctrd, image_id)
            wait_for(lambda: os.listdir(local) == [], 30, "Cleanup to delete the substituted paths")
            snaps = ctrd.ctr("snapshots", "--snapshotter", "stowaway", "ls", namespace=NS)
            assert "stowaway/" not in snaps.stdout


def test_a_layer_claiming_host_paths_it_does_not_hold_is_downloaded(
    containerd: Containerd,
    registry: Registry,
    demo_ref: str,
    demo_closure: list[str],
    tmp_path: Path,
) -> None:
    """A hostile image: one layer's annotations name a host store path (a "secret"
    outside the image) instead of what the layer holds. The claim does not make the
    chain ID containerd asks for, so the layer is downloaded and unpacked like any other:
    the container sees the image's bytes and never the secret."""
    secret_file = tmp_path / "stowaway-test-secret"
    secret_file.write_text(f"another tenant's secret {tmp_path}\n")
    secret = subprocess.run(
        ["nix-store", "--add", str(secret_file)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        subprocess.run(
            ["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false",
             f"docker://{demo_ref}", f"docker://{registry.host}/hostile:base"],
            check=True, capture_output=True,
        )  # fmt: skip
        oci = "application/vnd.oci.image.manifest.v1+json"
        get = urllib.request.Request(
            f"{registry.url}/v2/hostile/manifests/base", headers={"Accept": oci}
        )
        with urllib.request.urlopen(get) as r:
            manifest = json.load(r)
        greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
        (lying,) = [
            ly
            for ly in manifest["layers"]
            if os.path.basename(greeting)
            in (ly.get("annotations") or {}).get(PATHS_PREFIX + "0", "")
        ]
        lying["annotations"] = {PATHS_PREFIX + "0": os.path.basename(secret)}
        put = urllib.request.Request(
            f"{registry.url}/v2/hostile/manifests/evil",
            data=json.dumps(manifest).encode(),
            method="PUT",
            headers={"Content-Type": oci},
        )
        urllib.request.urlopen(put).close()
        ref = f"{registry.host}/hostile:evil"

        before = blob_get_counts(registry)
        cri_pull(containerd, ref)
        fetched = set(blob_get_counts(registry) - before)
        assert lying["digest"] in fetched, "the lying layer must be downloaded"
        # the honest store layers below it are still skipped (containerd fetches every
        # layer from the first one it must unpack on, whatever the snapshotter says)
        below = manifest["layers"][: manifest["layers"].index(lying)]
        honest = store_layer_digests(below)
        assert honest and not fetched & honest

        busybox = next(p for p in demo_closure if p.endswith("-busybox"))
        run = ["run", "--rm", "--snapshotter", "stowaway", ref]
        ls = containerd.ctr(*run, "h1", f"{busybox}/bin/ls", "/nix/store", namespace=NS).stdout
        assert os.path.basename(secret) not in ls.split()
        assert sorted(ls.split()) == sorted(os.path.basename(p) for p in demo_closure)
        out = containerd.ctr(*run, "h2", namespace=NS).stdout
        assert "hello from stowaway" in out  # the greeting, from the downloaded layer
    finally:
        subprocess.run(["nix-store", "--delete", secret], capture_output=True)
