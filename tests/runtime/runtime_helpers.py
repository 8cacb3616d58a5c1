"""Helpers shared by the runtime tests: the snapshotter as a real process, a containerd
wired to it (CRI pulling through it), CRI pulls and registry log readers.

A uniquely named module (not ``conftest``), so ``from runtime_helpers import …`` still
resolves when several test directories with their own conftest.py run in one pytest call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc

from daemons import Containerd, Daemon, Registry, _short_dir
from stowaway.image.annotations import PATHS_PREFIX, REF_LABEL
from stowaway.image.tar import store_path_entries, write_tar
from stowaway.runtime.proto.cri import api_pb2 as cri
from stowaway.runtime.proto.cri import api_pb2_grpc as cri_grpc
from stowaway.store.local import LocalStore

T = TypeVar("T")

SRC = Path(__file__).resolve().parents[2] / "src"


@functools.lru_cache
def _diff_id(paths: tuple[str, ...]) -> str:
    """The diff_id of the layer the composer builds from ``paths`` (its own tar writer)."""
    with LocalStore() as store:
        sha = hashlib.sha256()
        for piece in write_tar(store_path_entries(store, list(paths)), mtime=1):
            sha.update(piece)
    return "sha256:" + sha.hexdigest()


def ref_of(paths: list[str], parent_chain: str = "") -> str:
    """The chain ID containerd asks for when that layer sits on ``parent_chain``."""
    diff_id = _diff_id(tuple(sorted(paths)))
    if not parent_chain:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent_chain} {diff_id}".encode()).hexdigest()


def layer_labels(
    paths: list[str], parent_chain: str = "", ref: str | None = None
) -> dict[str, str]:
    """What CRI passes to Prepare for a stowaway layer of ``paths`` (``ref``: another
    chain ID than the layer's, as a lying or broken image would make containerd ask)."""
    return {
        REF_LABEL: ref or ref_of(paths, parent_chain),
        f"{PATHS_PREFIX}0": " ".join(os.path.basename(p) for p in paths),
    }


def unpacked_name(n: int) -> str:
    """A backend name like the one containerd's metadata layer gives an unpacked layer
    (``<namespace>/<n>/<chain ID>``)."""
    return f"default/{n}/sha256:{hashlib.sha256(str(n).encode()).hexdigest()}"


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_MS_RDONLY = 1


def mount_like_containerd(type_: str, source: str, options: Sequence[str], target: Path) -> None:
    """One mount(2) call, as containerd applies a snapshotter's (non-bind) mount: its
    data string must fit one page. (util-linux >= 2.39's `mount` uses the new mount API,
    which caps each option value at 256 bytes: a long lowerdir would fail there while
    containerd mounts it fine.)"""
    flags = _MS_RDONLY if "ro" in options else 0
    data = ",".join(o for o in options if o not in ("ro", "rw"))
    rc = _LIBC.mount(source.encode(), str(target).encode(), type_.encode(), flags, data.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {type_} {source} -o {data} {target}: {os.strerror(err)}")


class SnapshotterDaemon(Daemon):
    """`stowaway snapshotter` in its own process (so tests can kill and restart it)."""

    name = "snapshotter"

    def __init__(self, tmpdir: Path, *args: str, store: str = "/nix/store") -> None:
        super().__init__(tmpdir)
        self.sockdir = _short_dir("snap-")
        self.socket = str(self.sockdir / "s.sock")
        self.root = self.dir / "root"
        self.args = ["--store", store, "--root", str(self.root), *args]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(SRC)}

    def argv(self) -> list[str]:
        self.sockdir.mkdir(mode=0o700, exist_ok=True)  # removed by cleanup() on stop
        if os.path.exists(self.socket):  # stale socket of a killed run: not ready yet
            os.unlink(self.socket)
        code = "from stowaway.runtime.cli_snapshotter import snapshotter_command as c; c()"
        return [sys.executable, "-c", code, "--socket", self.socket, *self.args]

    def ready(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(self.socket)
            except OSError:
                return False
        return True

    def cleanup(self) -> None:
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, no cleanup: what a crash looks like."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None


class StowawayContainerd(Containerd):
    """containerd whose CRI plugin pulls through the stowaway proxy snapshotter (with
    snapshot annotations on) and reaches ``registry_host`` over plain HTTP."""

    registry_host = ""
    cri_snapshotter = "stowaway"  # the benchmark's baseline sets "overlayfs"

    def _config(self, cri: bool, *args: object) -> str:
        text = super()._config(cri, *args)  # type: ignore[arg-type]
        text = text.replace(
            'snapshotter = "overlayfs"',
            f'snapshotter = "{self.cri_snapshotter}"\n  disable_snapshot_annotations = false',
        )
        if self.registry_host:
            h = self.registry_host
            text += (
                f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{h}"]\n'
                f'  endpoint = ["http://{h}"]\n'
            )
        return text


def busybox_oci(dest: Path) -> Path:
    """An ordinary (non-stowaway) image made with umoci from busybox-static: oci layout."""
    layout = dest / "bb"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:latest"], check=True)
    bundle = dest / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)], check=True)
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir()
    subprocess.run(["cp", "/bin/busybox", str(rootfs / "bin/busybox")], check=True)
    for tool in ("sh", "cat", "echo", "ls"):
        os.symlink("busybox", rootfs / "bin" / tool)
    (rootfs / "hello.txt").write_text("ordinary layer\n")
    subprocess.run(["umoci", "repack", "--image", f"{layout}:latest", str(bundle)], check=True)
    subprocess.run(
        ["umoci", "config", "--image", f"{layout}:latest", "--config.entrypoint", "/bin/sh"],
        check=True,
    )
    return layout


NS = "k8s.io"


def cri_pull(containerd: Containerd, ref: str) -> str:
    with grpc.insecure_channel(f"unix:{containerd.address}") as ch:
        stub = cri_grpc.ImageServiceStub(ch)
        resp = stub.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)), timeout=120)
    return str(resp.image_ref)


def cri_remove(containerd: Containerd, image_id: str) -> None:
    """CRI RemoveImage, as kubelet's image GC calls it: every name of the image goes."""
    with grpc.insecure_channel(f"unix:{containerd.address}") as ch:
        stub = cri_grpc.ImageServiceStub(ch)
        stub.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image_id)), timeout=60)


def manifest_layers(registry: Registry, repo: str, tag: str) -> list[dict[str, object]]:
    req = urllib.request.Request(
        f"{registry.url}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(req) as r:
        return list(json.load(r)["layers"])


def blob_get_counts(registry: Registry) -> Counter[str]:
    """How often each blob was fetched, from the registry's access log."""
    return Counter(re.findall(r'"GET /v2/[^ ]*/blobs/(sha256:[0-9a-f]{64})', registry.log_text()))


def blob_gets(registry: Registry) -> set[str]:
    return set(blob_get_counts(registry))


def store_layer_digests(layers: list[dict[str, object]]) -> set[str]:
    """Digests of the layers carrying stowaway store-path annotations."""
    return {
        str(ly["digest"])
        for ly in layers
        if any(k.startswith(PATHS_PREFIX) for k in dict(ly.get("annotations") or {}))  # type: ignore[call-overload]
    }


def all_at_once(work: Callable[[], T], n: int) -> tuple[list[T], list[BaseException]]:
    """Run ``work`` in ``n`` threads released together; what they returned and raised."""
    barrier = threading.Barrier(n)
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(work())
        except BaseException as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors
