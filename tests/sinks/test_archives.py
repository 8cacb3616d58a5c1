"""oci-archive and docker-archive sinks, read back with skopeo (and tarfile)."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemons import wait_for
from stowaway.errors import StowawayError
from stowaway.image.digest import CorruptBlob
from stowaway.image.layers import LayerSettings
from stowaway.sinks import parse_target, write_image
from stowaway.sinks.archives import ArchiveError, write_docker_archive, write_oci_archive
from stowaway.sinks.inspect import read_image_summary

#: The 20.10 CLI that matches the daemon (a newer ``docker`` may come first on PATH).
DOCKER = "/usr/bin/docker"


def skopeo_inspect(ref: str, *extra: str) -> dict[str, Any]:
    out = subprocess.run(["skopeo", "inspect", *extra, ref], check=True, capture_output=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_oci_archive_is_readable_and_reproducible(demo_image: Any, tmp_path: Path) -> None:
    image = demo_image.image
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    result = write_image(image, parse_target(f"oci-archive:{first}:v1"), tls_verify=False)
    write_oci_archive(image, second, "v1")
    assert first.read_bytes() == second.read_bytes()
    info = skopeo_inspect(f"oci-archive:{first}:v1")
    assert info["Digest"] == image.manifest.digest
    assert info["Layers"] == [layer.digest for layer in image.layers]
    assert set(result.written) == {b.digest for b in [*image.blobs(), image.manifest]}
    with tarfile.open(first) as tar:
        names = tar.getnames()
        assert {m.mtime for m in tar.getmembers()} == {1}
    assert names[:2] == ["blobs", "blobs/sha256"]
    assert names[-2:] == ["index.json", "oci-layout"]
    assert names[2:-2] == sorted(names[2:-2])


def test_inspect_of_an_oci_archive_closes_it(demo_image: Any, tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    write_oci_archive(demo_image.image, archive, "v1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        summary = read_image_summary(f"oci-archive:{archive}:v1")
        gc.collect()  # an unclosed tarball's file warns when it is collected
    assert summary["manifest_digest"] == demo_image.image.manifest.digest
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def test_docker_archive_is_readable_by_skopeo(demo_image: Any, tmp_path: Path) -> None:
    image = demo_image.image
    file = tmp_path / "d.tar"
    write_image(image, parse_target(f"docker-archive:{file}:localhost:5000/demo/app:1"))
    info = skopeo_inspect(f"docker-archive:{file}")
    config = json.loads(image.config.data)
    assert info["Layers"] == config["rootfs"]["diff_ids"]  # skopeo lists uncompressed digests
    assert info["Architecture"] == "amd64"
    with tarfile.open(file) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        assert tar.extractfile(manifest[0]["Config"]).read() == image.config.data  # type: ignore[union-attr]
    assert manifest == [
        {
            "Config": "blobs/sha256/" + image.config.digest[7:],
            "RepoTags": ["localhost:5000/demo/app:1"],
            "Layers": ["blobs/sha256/" + layer.digest[7:] for layer in image.layers],
        }
    ]
    copy = tmp_path / "copy"
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"docker-archive:{file}", f"oci:{copy}:x"],
        check=True,
        capture_output=True,
    )
    assert skopeo_inspect(f"oci:{copy}:x")["Layers"]


def test_corrupt_blob_leaves_no_archive(
    make_demo: Callable[..., Any], demo_app: str, tmp_path: Path
) -> None:
    composed = make_demo(demo_app, tmp_path / "cache")
    victim = composed.image.layers[-1]
    data = victim.path.read_bytes()
    victim.path.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    for write in (write_oci_archive, write_docker_archive):
        target = tmp_path / f"{write.__name__}.tar"
        with pytest.raises(CorruptBlob):
            write(composed.image, target, None)
        assert list(tmp_path.glob("*.tar*")) == [] and not list(tmp_path.glob(".*"))
        assert not victim.path.exists()
        victim.path.write_bytes(b"x" * victim.size)  # damaged again for the next writer


def test_archive_errors_name_the_problem(
    make_demo: Callable[..., Any], demo_image: Any, demo_app: str, tmp_path: Path
) -> None:
    with pytest.raises(ArchiveError, match="is a directory"):
        write_oci_archive(demo_image.image, tmp_path, None)
    with pytest.raises(ArchiveError, match="does not exist"):
        write_docker_archive(demo_image.image, tmp_path / "missing" / "x.tar", None)
    zstd = make_demo(demo_app, tmp_path / "cache", settings=LayerSettings(compression="zstd"))
    with pytest.raises(ArchiveError, match="zstd"):
        write_docker_archive(zstd.image, tmp_path / "z.tar", "z:1")
    write_oci_archive(zstd.image, tmp_path / "z.tar", "z")
    assert skopeo_inspect(f"oci-archive:{tmp_path}/z.tar:z")["Digest"] == zstd.image.manifest.digest


@pytest.fixture()
def dockerd() -> Iterator[dict[str, str]]:
    """A private dockerd (no networking) on a socket in a short tmp dir (unix socket
    paths are limited to 108 bytes), stopped by pid; its data-root mount is undone."""
    root = Path(tempfile.mkdtemp(prefix="sw-dockerd-"))
    sock = root / "docker.sock"
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    with open(root / "log", "wb") as log:
        proc = subprocess.Popen(
            ["/usr/sbin/dockerd", "--data-root", str(root / "data"),
             "--exec-root", str(root / "exec"), "-H", f"unix://{sock}",
             "--pidfile", str(root / "pid"), "--bridge=none", "--iptables=false",
             "--ip-masq=false"],
            stdout=log, stderr=log,
        )  # fmt: skip
    try:

        def answers() -> bool:
            if proc.poll() is not None:
                pytest.fail("dockerd exited:\n" + (root / "log").read_text()[-2000:])
            version = subprocess.run([DOCKER, "version"], env=env, capture_output=True)
            return version.returncode == 0

        wait_for(answers, 30, f"dockerd to start (log {root / 'log'})", interval=0.2)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        data = root / "data"
        if data.is_mount():
            subprocess.run(["umount", str(data)], check=True)
        shutil.rmtree(root)


def test_docker_load_accepts_the_docker_archive(
    demo_image: Any, dockerd: dict[str, str], tmp_path: Path
) -> None:
    file = tmp_path / "d.tar"
    write_docker_archive(demo_image.image, file, "localhost:5000/demo:v1")
    out = subprocess.run(
        [DOCKER, "load", "-i", str(file)], env=dockerd, check=True, capture_output=True, text=True
    ).stdout
    assert "localhost:5000/demo:v1" in out
    inspect = subprocess.run(
        [DOCKER, "image", "inspect", "localhost:5000/demo:v1"],
        env=dockerd, check=True, capture_output=True,
    ).stdout  # fmt: skip
    info = json.loads(inspect)[0]
    assert info["Id"] == demo_image.image.config.digest
    config = json.loads(demo_image.image.config.data)
    assert info["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]
    assert info["Config"]["Entrypoint"] == config["config"]["Entrypoint"]


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ([], "not a valid OCI layout"),
        ({"manifests": [{"size": 1}]}, "not a valid OCI layout"),
        ({"manifests": [{"digest": "sha256:../../etc/passwd"}]}, "invalid digest"),
    ],
)
def test_inspect_of_a_malformed_layout_says_what_is_wrong(
    tmp_path: Path, index: object, message: str
) -> None:
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(StowawayError, match=message):
        read_image_summary(f"oci:{tmp_path}")
