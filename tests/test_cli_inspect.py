"""`stowaway inspect` reads back every destination `build` writes (oci:, oci-archive:,
docker-archive:, docker:// on docker-registry 2.8), images skopeo copied (not only our
own writer), image indexes, and says which annotation is malformed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from daemons import Registry
from stowaway.cli import main
from stowaway.distribution.client import RegistryClient
from stowaway.image.config import DEFAULT_PATH, default_architecture
from stowaway.image.digest import sha256_digest
from stowaway_cli import run

NOTLS = "--tls-verify=false"


def inspect_json(*args: str) -> dict[str, Any]:
    return json.loads(run("inspect", "--json", *args).stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with Registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


CONFIG_FLAGS = [
    "--cmd", "-v", "--env", "A=1", "--workdir", "/srv", "--user", "1000",
    "--expose", "8080", "--label", "org.example=yes", "--created", "1000",
]  # fmt: skip


def build(demo_app: str, cache: Path, target: str, *extra: str) -> dict[str, Any]:
    args = [demo_app, "--entrypoint", f"{demo_app}/bin/demo", *CONFIG_FLAGS, *extra]
    out = run("build", "--json", "--cache-dir", str(cache), "-o", target, *args).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def check_config(summary: dict[str, Any], demo_app: str) -> None:
    assert summary["config"] == {
        "entrypoint": [f"{demo_app}/bin/demo"],
        "cmd": ["-v"],
        "user": "1000:1000",  # numeric uid:gid (kubelet's runAsNonRoot)
        "env": [f"PATH={demo_app}/bin:{DEFAULT_PATH}", "A=1"],  # no --contents: roots' bin
        "workdir": "/srv",
        "exposed_ports": ["8080/tcp"],
        "labels": {"org.example": "yes"},
        "os": "linux",
        "architecture": default_architecture(),
        "variant": None,
        "created": "1970-01-01T00:16:40Z",
    }


def check_layers(summary: dict[str, Any], built: dict[str, Any], media: str) -> None:
    assert [x["digest"] for x in summary["layers"]] == [x["digest"] for x in built["layers"]]
    assert [x["size"] for x in summary["layers"]] == [x["size"] for x in built["layers"]]
    assert [x["store_paths"] for x in summary["layers"]] == [
        x["store_paths"] for x in built["layers"]
    ]
    assert {x["media_type"] for x in summary["layers"]} == {media}


OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@pytest.mark.parametrize(
    ("form", "fmt", "media"),
    [
        ("oci:{dir}/img:t", "oci", OCI_GZIP),
        ("oci-archive:{dir}/img.tar:t", "oci", OCI_GZIP),
        ("docker-archive:{dir}/d.tar:demo/app:1", "docker", DOCKER_GZIP),
        ("docker://{reg}/inspect/oci:1", "oci", OCI_GZIP),
        ("docker://{reg}/inspect/docker:1", "docker", DOCKER_GZIP),
    ],
)
def test_inspect_reads_what_build_wrote(
    demo_app: str, registry: Registry, tmp_path: Path, form: str, fmt: str, media: str
) -> None:
    target = form.format(dir=tmp_path, reg=registry.host)
    extra = ["--dest-tls-verify=false"] if target.startswith("docker:") else []
    built = build(demo_app, tmp_path / "cache", target, "--format", fmt, *extra)
    flags = [NOTLS] if target.startswith("docker:") else []
    summary = inspect_json(target, *flags)
    assert summary["index"] is False
    check_config(summary, demo_app)
    check_layers(summary, built, media)
    assert summary["config_digest"] == built["config_digest"]
    if form.startswith("docker-archive"):
        assert summary["manifest_digest"] is None and summary["repo_tags"] == ["demo/app:1"]
    else:
        assert summary["manifest_digest"] == built["manifest_digest"]
    table = run("inspect", target, *flags).stdout  # for people: the config, then layers
    assert f'entrypoint  ["{demo_app}/bin/demo"]' in table
    assert "ports       8080/tcp" in table
    assert "stowaway-demo-app" in table and "(customisation)" in table


def test_inspect_by_digest(demo_app: str, registry: Registry, tmp_path: Path) -> None:
    target = f"docker://{registry.host}/inspect/bydigest:1"
    built = build(demo_app, tmp_path / "cache", target, "--dest-tls-verify=false")
    by_digest = f"docker://{registry.host}/inspect/bydigest@{built['manifest_digest']}"
    assert inspect_json(by_digest, NOTLS)["manifest_digest"] == built["manifest_digest"]


@pytest.mark.parametrize("fmt", ["oci", "v2s2"])
def test_inspect_reads_images_skopeo_copied(
    demo_app: str, registry: Registry, tmp_path: Path, fmt: str
) -> None:
    """skopeo writes the registry's manifest itself (as v2s2: converted, without our
    annotations); the config and layers are still read."""
    built = build(demo_app, tmp_path / "cache", f"oci:{tmp_path}/img:t")
    dest = f"docker://{registry.host}/copied/{fmt}:1"
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", "--format", fmt,
         f"oci:{tmp_path}/img:t", dest],
        check=True, capture_output=True,
    )  # fmt: skip
    summary = inspect_json(dest, NOTLS)
    check_config(summary, demo_app)
    assert [x["digest"] for x in summary["layers"]] == [x["digest"] for x in built["layers"]]
    if fmt == "oci":
        assert summary["media_type"] == "application/vnd.oci.image.manifest.v1+json"
        check_layers(summary, built, OCI_GZIP)
    else:
        assert summary["media_type"] == "application/vnd.docker.distribution.manifest.v2+json"
    # and skopeo's own docker-archive (not our writer's layout)
    archive = tmp_path / "skopeo.tar"
    subprocess.run(
        ["skopeo", "copy", f"oci:{tmp_path}/img:t", f"docker-archive:{archive}:demo/app:2"],
        check=True, capture_output=True,
    )  # fmt: skip
    from_archive = inspect_json(f"docker-archive:{archive}:demo/app:2")
    check_config(from_archive, demo_app)
    assert [x["store_paths"] for x in from_archive["layers"]] == [
        x["store_paths"] for x in built["layers"]
    ]


def test_inspect_of_an_index_lists_platforms_or_picks_one(
    demo_app: str, registry: Registry, tmp_path: Path
) -> None:
    target = f"docker://{registry.host}/inspect/multi:single"
    built = build(demo_app, tmp_path / "cache", target, "--dest-tls-verify=false")
    manifest = built["manifest_digest"]
    size = len(
        subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", target],
            check=True, capture_output=True,
        ).stdout
    )  # fmt: skip
    arch = default_architecture()
    other = "s390x" if arch != "s390x" else "arm64"
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest,
             "size": size}  # fmt: skip
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {**entry, "platform": {"os": "linux", "architecture": other}},
                {**entry, "platform": {"os": "linux", "architecture": arch}},
            ],
        }
    ).encode()
    client = RegistryClient(registry.host, tls_verify=False)
    client.ping()
    client.request(
        "PUT",
        client.url("/v2/inspect/multi/manifests/multi"),
        ok={201},
        headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
        body=index,
    )
    client.close()
    multi = f"docker://{registry.host}/inspect/multi:multi"
    listed = inspect_json(multi, NOTLS)
    assert listed["index"] is True and listed["manifest_digest"] == sha256_digest(index)
    assert [p["platform"] for p in listed["platforms"]] == [f"linux/{other}", f"linux/{arch}"]
    assert "pick one with --platform" in run("inspect", multi, NOTLS).stdout
    for flag in (["--platform"], ["--platform", f"linux/{arch}"]):  # alone: this host's
        picked = inspect_json(multi, NOTLS, *flag)
        assert picked["manifest_digest"] == manifest
        assert picked["index_digest"] == sha256_digest(index)
        check_config(picked, demo_app)
    missing = run("inspect", multi, NOTLS, "--platform", "windows/amd64", ok=False)
    assert missing.returncode == 1
    assert "no windows/amd64 image in the index" in missing.stderr
    assert f"linux/{other}, linux/{arch}" in missing.stderr


def test_a_malformed_paths_annotation_is_an_error_naming_it(demo_app: str, tmp_path: Path) -> None:
    layout = tmp_path / "img"
    build(demo_app, tmp_path / "cache", f"oci:{layout}:t")
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    blob = layout / "blobs" / "sha256" / desc["digest"].removeprefix("sha256:")
    manifest = json.loads(blob.read_bytes())
    key = "containerd.io/snapshot/stowaway.paths.0"
    manifest["layers"][1]["annotations"][key] = "not-a-store-path"
    data = json.dumps(manifest).encode()
    (layout / "blobs" / "sha256" / sha256_digest(data).removeprefix("sha256:")).write_bytes(data)
    desc.update(digest=sha256_digest(data), size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    result = CliRunner().invoke(main, ["inspect", f"oci:{layout}:t", "--json"])
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert "layer 1" in error and repr(key) in error, error
    assert "Traceback" not in result.output


def test_inspect_with_credentials(demo_app: str, tmp_path: Path) -> None:
    with Registry(tmp_path / "reg", htpasswd={"alice": "s3cret"}) as reg:
        target = f"docker://{reg.host}/private/app:1"
        build(
            demo_app, tmp_path / "cache", target, "--dest-tls-verify=false",
            "--dest-creds", "alice:s3cret",
        )  # fmt: skip
        empty = tmp_path / "auth.json"
        empty.write_text("{}")
        denied = run("inspect", target, NOTLS, "--authfile", str(empty), ok=False)
        assert denied.returncode == 1 and "Traceback" not in denied.stderr
        summary = inspect_json(target, NOTLS, "--creds", "alice:s3cret")
        check_config(summary, demo_app)
