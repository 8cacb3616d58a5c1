"""Real clients: skopeo pushes into, pulls from and inspects the registry."""

from __future__ import annotations

import json
from pathlib import Path

import bcrypt
import pytest
from registry_harness import Server
from registry_helpers import DOCKER, OCI, layout_manifest, skopeo


def test_push_pull_round_trip_oci(server: Server, oci_layout: Path, tmp_path: Path) -> None:
    src = layout_manifest(oci_layout)
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        f"oci:{oci_layout}:t",
        f"docker://{server.host}/demo/busybox:1",
    )
    raw = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{server.host}/demo/busybox:1")
    manifest = json.loads(raw)
    r = server.request("GET", "/v2/demo/busybox/manifests/1")
    assert r.headers["Content-Type"] == OCI and r.body == raw.encode()
    # the layers pushed are the layout's layers, byte for byte (same digests)
    assert [x["digest"] for x in manifest["layers"]] == [
        x["digest"]
        for x in src["manifest"]["layers"]  # type: ignore[index]
    ]
    info = json.loads(
        skopeo("inspect", "--tls-verify=false", f"docker://{server.host}/demo/busybox:1")
    )
    assert info["Digest"] == src["digest"]
    assert info["Layers"] == manifest_layers(manifest)
    out = tmp_path / "pulled"
    skopeo(
        "copy", "--src-tls-verify=false", f"docker://{server.host}/demo/busybox:1", f"oci:{out}:p"
    )
    pulled = layout_manifest(out, "p")
    assert pulled["digest"] == src["digest"]
    for layer in manifest["layers"]:
        blob = out / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        assert blob.stat().st_size == layer["size"]
    tags = skopeo("list-tags", "--tls-verify=false", f"docker://{server.host}/demo/busybox")
    assert json.loads(tags)["Tags"] == ["1"]


def manifest_layers(manifest: dict[str, list[dict[str, str]]]) -> list[str]:
    return [x["digest"] for x in manifest["layers"]]


def test_docker_schema2_push_and_negotiation(server: Server, oci_layout: Path) -> None:
    skopeo(
        "copy", "--dest-tls-verify=false", "--format", "v2s2",
        f"oci:{oci_layout}:t", f"docker://{server.host}/demo/docker:v2s2",
    )  # fmt: skip
    raw = json.loads(
        skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{server.host}/demo/docker:v2s2")
    )
    assert raw["mediaType"] == DOCKER
    assert raw["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    # a client that accepts only Docker schema 2 gets it
    r = server.request("GET", "/v2/demo/docker/manifests/v2s2", headers={"Accept": DOCKER})
    assert r.status == 200 and r.headers["Content-Type"] == DOCKER
    # the second push of the same layers mounts/skips them: blob count unchanged
    blobs = Path(server.config.storage) / "blobs" / "sha256"
    before = sorted(p.name for p in blobs.iterdir())
    skopeo(
        "copy", "--dest-tls-verify=false", "--format", "v2s2",
        f"oci:{oci_layout}:t", f"docker://{server.host}/other/repo:x",
    )  # fmt: skip
    assert sorted(p.name for p in blobs.iterdir()) == before


@pytest.fixture()
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"hunter2", bcrypt.gensalt(rounds=4)).decode()
    path.write_text("alice:$2y$" + hashed[4:] + "\n")
    return path


def test_auth_push_needs_credentials_pull_anonymous(
    make_server: object, htpasswd: Path, oci_layout: Path
) -> None:
    server: Server = make_server(htpasswd=htpasswd, anonymous_read=True)  # type: ignore[operator]
    dest = f"docker://{server.host}/secure/busybox:1"
    with pytest.raises(AssertionError, match="unauthorized|authentication required"):
        skopeo("copy", "--dest-tls-verify=false", f"oci:{oci_layout}:t", dest)
    with pytest.raises(AssertionError):
        skopeo("copy", "--dest-tls-verify=false", "--dest-creds", "alice:wrong",
               f"oci:{oci_layout}:t", dest)  # fmt: skip
    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", "alice:hunter2",
           f"oci:{oci_layout}:t", dest)  # fmt: skip
    info = json.loads(skopeo("inspect", "--tls-verify=false", dest))  # anonymous read
    assert info["Digest"] == layout_manifest(oci_layout)["digest"]
