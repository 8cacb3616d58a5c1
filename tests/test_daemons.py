"""Smoke tests for the daemon harness: each real daemon starts privately and does its job."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from daemons import Containerd, DaemonError, Dockerd, Registry


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout (tag `t`) holding a one-layer image with the static busybox."""
    d = tmp_path_factory.mktemp("bbox")
    layout = d / "layout"
    rootfs = d / "rootfs" / "bin"
    rootfs.mkdir(parents=True)
    (rootfs / "busybox").write_bytes(Path("/bin/busybox").read_bytes())
    os.chmod(rootfs / "busybox", 0o755)
    os.symlink("busybox", rootfs / "sh")
    sh("umoci", "init", "--layout", str(layout))
    sh("umoci", "new", "--image", f"{layout}:t")
    sh("umoci", "insert", "--image", f"{layout}:t", str(rootfs), "/bin")
    sh(
        "umoci", "config", "--image", f"{layout}:t",
        "--config.cmd", "/bin/sh", "--config.cmd=-c", "--config.cmd=echo hello from busybox",
    )  # fmt: skip
    return layout


def test_containerd_imports_and_runs_oci_archive(tmp_path: Path, busybox_layout: Path) -> None:
    archive = tmp_path / "bbox.tar"
    sh("skopeo", "copy", "-q", f"oci:{busybox_layout}:t", f"oci-archive:{archive}:localhost/bbox:t")
    with Containerd(tmp_path) as ctrd:
        ctrd.ctr("images", "import", str(archive))
        assert "localhost/bbox:t" in ctrd.ctr("images", "ls", "-q").stdout
        out = ctrd.ctr("run", "--rm", "localhost/bbox:t", f"smoke-{os.getpid()}").stdout
        assert out.strip() == "hello from busybox"
        # the private instance keeps its state under our tmpdir, not the system's
        assert (ctrd.root / "io.containerd.content.v1.content" / "blobs").is_dir()
        pid = ctrd.proc.pid if ctrd.proc else 0
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped
    assert not os.path.exists(ctrd.address)


def test_containerd_stop_kills_running_tasks(tmp_path: Path, busybox_layout: Path) -> None:
    archive = tmp_path / "bbox.tar"
    sh("skopeo", "copy", "-q", f"oci:{busybox_layout}:t", f"oci-archive:{archive}:localhost/bbox:t")
    with Containerd(tmp_path) as ctrd:
        ctrd.ctr("images", "import", str(archive))
        ctrd.ctr(
            "run", "-d", "localhost/bbox:t", f"left-{os.getpid()}", "/bin/sh", "-c", "sleep 600"
        )
        assert "RUNNING" in ctrd.ctr("tasks", "ls").stdout
        assert ctrd._shim_pids()
    assert ctrd._shim_pids() == []
    with open("/proc/self/mountinfo") as f:
        assert str(ctrd.dir) not in f.read()


def test_containerd_config_has_proxy_plugin_and_cri_off(tmp_path: Path) -> None:
    ctrd = Containerd(tmp_path, proxy_plugins={"stowaway": {"type": "snapshot", "address": "/x"}})
    cfg = ctrd.config_path.read_text()
    assert '[proxy_plugins."stowaway"]' in cfg
    assert 'address = "/x"' in cfg and 'type = "snapshot"' in cfg
    assert 'disabled_plugins = ["io.containerd.grpc.v1.cri"]' in cfg
    ctrd.stop()  # never started: only removes its socket dir
    assert not ctrd.sockdir.exists()


def test_containerd_start_failure_shows_log_tail(tmp_path: Path) -> None:
    ctrd = Containerd(tmp_path)
    ctrd.config_path.write_text("this is = = not toml\n")
    with pytest.raises(DaemonError, match="containerd exited") as info:
        ctrd.start(timeout=10)
    assert "toml" in str(info.value).lower() or "config" in str(info.value).lower()
    assert not ctrd.sockdir.exists()


def test_registry_answers_and_skopeo_round_trips(tmp_path: Path, busybox_layout: Path) -> None:
    with Registry(tmp_path) as reg:
        with urllib.request.urlopen(f"{reg.url}/v2/") as r:
            assert r.status == 200
        ref = f"docker://{reg.host}/smoke/bbox:t"
        sh("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{busybox_layout}:t", ref)
        pulled = tmp_path / "pulled"
        sh("skopeo", "copy", "-q", "--src-tls-verify=false", ref, f"oci:{pulled}:t")
        want = json.loads((busybox_layout / "index.json").read_text())["manifests"][0]["digest"]
        got = json.loads((pulled / "index.json").read_text())["manifests"][0]["digest"]
        assert got == want
        assert reg.blob_bytes() > 1_000_000  # busybox layer + config + manifest
        assert "PUT /v2/smoke/bbox/manifests/t" in reg.log_text()


def test_registry_with_htpasswd_requires_credentials(tmp_path: Path) -> None:
    with Registry(tmp_path, htpasswd={"alice": "s3cret"}) as reg:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{reg.url}/v2/")
        info.value.close()
        assert info.value.code == 401
        req = urllib.request.Request(f"{reg.url}/v2/")
        req.add_header("Authorization", "Basic YWxpY2U6czNjcmV0")  # alice:s3cret
        with urllib.request.urlopen(req) as r:
            assert r.status == 200


def test_dockerd_answers_and_loads_archive(tmp_path: Path, busybox_layout: Path) -> None:
    archive = tmp_path / "bbox-docker.tar"
    sh("skopeo", "copy", "-q", f"oci:{busybox_layout}:t", f"docker-archive:{archive}:bbox:t")
    with Containerd(tmp_path) as ctrd, Dockerd(tmp_path, containerd=ctrd) as dockerd:
        version = json.loads(dockerd.docker("version", "--format", "{{json .Server}}").stdout)
        assert version["Version"].startswith(("20.10.", "26.1."))  # Debian 12, Debian 13
        dockerd.docker("load", "-i", str(archive))
        images = dockerd.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
        assert b"bbox:t" in images.split()
