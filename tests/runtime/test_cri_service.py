"""The CRI image service against a real containerd 1.6 with its CRI plugin, runc and CNI
(bridge + host-local): a Python gRPC client plays kubelet.

One containerd (overlayfs snapshotter for CRI) serves the module; its ``sandbox_image`` is
a ``nix:0`` reference the service pre-loads, so the pod's pause container comes from the
Nix store too. The service runs in-process on a private socket.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from daemons import Containerd, Registry, _short_dir, wait_for
from nixtools import nix_build
from stowaway.image.compose import compose
from stowaway.image.config import ImageOptions
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings
from stowaway.runtime.cri.cli_cri import make_service
from stowaway.runtime.cri.image_service import serve
from stowaway.runtime.proto.cri import api_pb2 as cri
from stowaway.runtime.proto.cri import api_pb2_grpc as cri_grpc
from stowaway.sinks.oci_layout import write_oci_layout
from stowaway.store.local import LocalStore

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
NS = "k8s.io"
BRIDGE = "stwcri0"


class CriContainerd(Containerd):
    """containerd with CRI: sandbox image from nix:0, plain-HTTP registry mirror, and the
    OOM score of pods not below containerd's own (this VM may not lower it)."""

    sandbox_image = ""
    registry_host = ""

    def _config(self, cri: bool, *args: object) -> str:
        text = super()._config(cri, *args)  # type: ignore[arg-type]
        table = '[plugins."io.containerd.grpc.v1.cri"]\n'
        extra = f'  sandbox_image = "{self.sandbox_image}"\n  restrict_oom_score_adj = true\n'
        text = text.replace(table, table + extra)
        h = self.registry_host
        return text + (
            f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{h}"]\n'
            f'  endpoint = ["http://{h}"]\n'
        )


def cni_conf(directory: Path, state: Path) -> None:
    conf = {
        "cniVersion": "0.4.0",
        "name": "stowaway-cri-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.88.77.0/24"}]],
                    "dataDir": str(state),
                },
            },
            {"type": "loopback"},
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "10-stowaway.conflist").write_text(json.dumps(conf))


@pytest.fixture(scope="module")
def pause_path(have_nix: None) -> str:
    return nix_build(FIXTURES / "runtime" / "pause.nix")


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, pause_path: str, registry: Registry
) -> Iterator[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("cri")
    cni_conf(tmp / "cni", tmp / "ipam")
    CriContainerd.sandbox_image = f"nix:0{pause_path}"
    CriContainerd.registry_host = registry.host
    sockdir = _short_dir("cri-")
    try:
        with CriContainerd(tmp, cri=True, cni_conf_dir=str(tmp / "cni")) as ctrd:
            proxy = make_service(
                ctrd.address,
                snapshotter="overlayfs",
                gcroots=tmp / "gcroots",
                cache_dir=tmp / "layer-cache",
            )
            sock = str(sockdir / "img.sock")
            server = serve(proxy, sock)
            try:
                yield {"containerd": ctrd, "socket": sock, "gcroots": tmp / "gcroots", "tmp": tmp}
            finally:
                server.stop(None)
                proxy.nix.client.close()
    finally:
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        subprocess.run(["rm", "-rf", str(sockdir)])


@pytest.fixture(scope="module")
def images(env: dict[str, object]) -> Iterator[cri_grpc.ImageServiceStub]:
    with grpc.insecure_channel(f"unix:{env['socket']}") as ch:
        yield cri_grpc.ImageServiceStub(ch)


@pytest.fixture(scope="module")
def containerd_cri(env: dict[str, object]) -> Iterator[grpc.Channel]:
    ctrd = env["containerd"]
    assert isinstance(ctrd, Containerd)
    with grpc.insecure_channel(f"unix:{ctrd.address}") as ch:
        yield ch


def spec(ref: str) -> cri.ImageSpec:
    return cri.ImageSpec(image=ref)


def pull(stub: cri_grpc.ImageServiceStub, ref: str) -> str:
    return str(stub.PullImage(cri.PullImageRequest(image=spec(ref)), timeout=120).image_ref)


def status(stub: cri_grpc.ImageServiceStub, ref: str) -> cri.Image | None:
    resp = stub.ImageStatus(cri.ImageStatusRequest(image=spec(ref)), timeout=30)
    return resp.image if resp.HasField("image") else None


def test_registry_reference_is_proxied(
    images: cri_grpc.ImageServiceStub, containerd_cri: grpc.Channel, demo_ref: str
) -> None:
    image_id = pull(images, demo_ref)
    assert image_id.startswith("sha256:")
    ours = status(images, demo_ref)
    assert ours is not None and ours.id == image_id and demo_ref in ours.repo_tags
    # containerd's CRI itself pulled it: it answers the same
    theirs = status(cri_grpc.ImageServiceStub(containerd_cri), demo_ref)
    assert theirs == ours
    listed = images.ListImages(cri.ListImagesRequest(), timeout=30).images
    assert any(i.id == image_id and demo_ref in i.repo_tags for i in listed)
    fs = images.ImageFsInfo(cri.ImageFsInfoRequest(), timeout=30).image_filesystems
    assert fs and "overlayfs" in fs[0].fs_id.mountpoint


def test_nix_pull_status_list_and_gc_root(
    images: cri_grpc.ImageServiceStub,
    containerd_cri: grpc.Channel,
    env: dict[str, object],
    demo_app: str,
) -> None:
    ref = f"nix:0{demo_app}"
    image_id = pull(images, ref)
    assert pull(images, ref) == image_id  # idempotent, same bytes
    img = status(images, ref)
    assert img is not None and img.id == image_id and ref in img.repo_tags and img.size > 0
    assert status(images, f"{ref}:latest") == img  # kubelet's default tag
    listed = images.ListImages(cri.ListImagesRequest(), timeout=30).images
    assert [i.id for i in listed if ref in i.repo_tags] == [image_id]
    only = images.ListImages(
        cri.ListImagesRequest(filter=cri.ImageFilter(image=spec(ref))), timeout=30
    ).images
    assert [i.id for i in only] == [image_id]
    # containerd's CRI knows the image by ID (what kubelet hands to CreateContainer)
    theirs = status(cri_grpc.ImageServiceStub(containerd_cri), image_id)
    assert theirs is not None and theirs.id == image_id
    root = Path(str(env["gcroots"])) / demo_app.rsplit("/", 1)[-1]
    assert os.readlink(root) == demo_app
    ctrd = env["containerd"]
    assert isinstance(ctrd, Containerd)
    names = ctrd.ctr("images", "ls", "-q", namespace=NS).stdout.split()
    assert {ref, f"{ref}:latest", image_id} <= set(names)


def test_bad_references_are_invalid_argument(images: cri_grpc.ImageServiceStub) -> None:
    bad = {
        "nix:0/etc/passwd": "not inside the store directory",
        "nix:0/nix/store/../../etc/passwd": "not normalised",
        "nix:0/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x": "not 32 Nix base-32",
        "nix:0/nix/store/00000000000000000000000000000000-x/bin/sh": "points below a store path",
    }
    calls = [
        (images.PullImage, cri.PullImageRequest),
        (images.ImageStatus, cri.ImageStatusRequest),
        (images.RemoveImage, cri.RemoveImageRequest),
    ]
    for ref, why in bad.items():
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as info:
                method(request(image=spec(ref)), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ref
            assert why in info.value.details() and ref in info.value.details()


def test_missing_store_path_fails_clearly(images: cri_grpc.ImageServiceStub) -> None:
    ref = "nix:0/nix/store/00000000000000000000000000000000-not-there"
    with pytest.raises(grpc.RpcError) as info:
        pull(images, ref)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "00000000000000000000000000000000-not-there" in info.value.details()
    assert status(images, ref) is None


def test_store_path_holding_an_oci_layout_is_used_as_is(
    images: cri_grpc.ImageServiceStub, demo_app: str, tmp_path: Path, local_store: LocalStore
) -> None:
    store = local_store
    closure = store.closure_infos([demo_app])
    result = compose(
        store,
        [demo_app],
        ImageOptions(entrypoint=[f"{demo_app}/bin/demo"], env=["MARK=layout"]),
        closure=closure,
        settings=LayerSettings(),
        cache=LayerCache(tmp_path / "cache"),
    )
    write_oci_layout(result.image, tmp_path / "img", "latest")
    added = subprocess.run(
        ["nix-store", "--add", str(tmp_path / "img")], check=True, capture_output=True, text=True
    ).stdout.strip()
    image_id = pull(images, f"nix:0{added}")
    assert image_id == result.image.config.digest


def test_pod_runs_nix_image_and_remove_drops_root(
    images: cri_grpc.ImageServiceStub,
    containerd_cri: grpc.Channel,
    env: dict[str, object],
    demo_app: str,
    pause_path: str,
) -> None:
    rt = cri_grpc.RuntimeServiceStub(containerd_cri)
    pull(images, f"nix:0{pause_path}")  # the sandbox image, pre-loaded like kubelet would
    ref = f"nix:0{demo_app}"
    image_id = pull(images, ref)
    logs = Path(str(env["tmp"])) / "pod-logs"
    logs.mkdir(exist_ok=True)
    pod = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="demo", uid="uid-demo", namespace="default"),
        hostname="demo",
        log_directory=str(logs),
    )
    sandbox = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
    try:
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="app"),
            image=spec(image_id),
            log_path="app.log",
        )
        cid = rt.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=sandbox, config=config, sandbox_config=pod),
            timeout=60,
        ).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=60)

        def exited() -> cri.ContainerStatusResponse | None:
            st = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=30)
            return st if st.status.state == cri.CONTAINER_EXITED else None

        st = wait_for(exited, 30, "the container to exit")
        assert st.status.exit_code == 0
        assert st.status.image_ref == image_id
        log = (logs / "app.log").read_text()
        assert " stdout F hello from stowaway\n" in log
        rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=5), timeout=30)
        rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=30)
    finally:
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox), timeout=60)
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox), timeout=60)
    root = Path(str(env["gcroots"])) / demo_app.rsplit("/", 1)[-1]
    assert os.path.islink(root)
    images.RemoveImage(cri.RemoveImageRequest(image=spec(ref)), timeout=30)
    assert not os.path.lexists(root)
    assert status(images, ref) is None
    images.RemoveImage(cri.RemoveImageRequest(image=spec(ref)), timeout=30)  # idempotent
    containerd_images = cri_grpc.ImageServiceStub(containerd_cri)
    wait_for(  # containerd's CRI drops the image on the delete event
        lambda: status(containerd_images, image_id) is None, 10, "containerd's CRI to drop it"
    )
    # the pause image is still there, and still rooted
    assert (Path(str(env["gcroots"])) / pause_path.rsplit("/", 1)[-1]).is_symlink()


def test_remove_by_image_id_through_proxy_drops_root(
    images: cri_grpc.ImageServiceStub, env: dict[str, object], pause_path: str
) -> None:
    image_id = pull(images, f"nix:0{pause_path}")
    root = Path(str(env["gcroots"])) / pause_path.rsplit("/", 1)[-1]
    assert root.is_symlink()
    # kubelet's image GC removes by ID; containerd's CRI deletes every name of the image
    images.RemoveImage(cri.RemoveImageRequest(image=spec(image_id)), timeout=30)
    assert not os.path.lexists(root)
    assert status(images, f"nix:0{pause_path}") is None


def _second_service(env: dict[str, object], name: str, **kwargs: object) -> tuple[grpc.Server, str]:
    ctrd = env["containerd"]
    assert isinstance(ctrd, Containerd)
    proxy = make_service(ctrd.address, snapshotter="overlayfs", **kwargs)  # type: ignore[arg-type]
    sock = str(ctrd.sockdir / f"{name}.sock")
    return serve(proxy, sock), sock


def test_paths_substituted_from_signed_cache_give_the_same_image(
    images: cri_grpc.ImageServiceStub,
    env: dict[str, object],
    demo_app: str,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    tmp_path: Path,
    local_store: LocalStore,
) -> None:
    from stowaway.store.nar import nar_hash_and_size

    expected = pull(images, f"nix:0{demo_app}")  # from /nix/store
    store = tmp_path / "store"
    store.mkdir()
    for key, want in (("other", "no valid signature"), ("good", None)):
        server, sock = _second_service(
            env,
            f"sub-{key}",
            store=store,
            substituters=(signed_caches["zstd"],),
            keys=(cache_keys[key],),
            gcroots=tmp_path / "gcroots",
            cache_dir=tmp_path / f"cache-{key}",
        )
        try:
            with grpc.insecure_channel(f"unix:{sock}") as ch:
                stub = cri_grpc.ImageServiceStub(ch)
                if want:
                    with pytest.raises(grpc.RpcError) as info:
                        pull(stub, f"nix:0{demo_app}")
                    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                    assert want in info.value.details()
                    assert not any(store.iterdir())
                else:
                    assert pull(stub, f"nix:0{demo_app}") == expected
        finally:
            server.stop(None)
    for p in demo_closure:
        path_info = local_store.query(p)
        assert path_info is not None
        got = nar_hash_and_size(store / p.rsplit("/", 1)[-1])
        assert got == (path_info.nar_hash, path_info.nar_size)
    assert sorted(os.listdir(tmp_path / "gcroots")) == [demo_app.rsplit("/", 1)[-1]]
