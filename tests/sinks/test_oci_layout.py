"""The oci: sink and target parsing, checked with skopeo and umoci."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stowaway.image.digest import CorruptBlob
from stowaway.sinks import (
    DockerArchiveTarget,
    OciArchiveTarget,
    OciTarget,
    RegistryTarget,
    TargetError,
    parse_target,
    write_image,
)
from stowaway.sinks.oci_layout import LayoutError, write_oci_layout


def skopeo_inspect(ref: str, *extra: str) -> dict[str, object]:
    out = subprocess.run(["skopeo", "inspect", *extra, ref], check=True, capture_output=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def index_of(layout: Path) -> dict[str, object]:
    return json.loads((layout / "index.json").read_bytes())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oci:out", OciTarget("out")),
        ("oci:/tmp/x:v1.2", OciTarget("/tmp/x", "v1.2")),
        ("oci-archive:a.tar:latest", OciArchiveTarget("a.tar", "latest")),
        ("docker-archive:a.tar", DockerArchiveTarget("a.tar")),
        ("docker-archive:a.tar:app", DockerArchiveTarget("a.tar", "app:latest")),
        (
            "docker-archive:a.tar:localhost:5000/team/app:1",
            DockerArchiveTarget("a.tar", "localhost:5000/team/app:1"),
        ),
        (
            "docker://localhost:5000/team/app:1",
            RegistryTarget("localhost:5000", "team/app", "1"),
        ),
        ("docker://localhost:5000/app", RegistryTarget("localhost:5000", "app", "latest")),
        ("docker://busybox", RegistryTarget("docker.io", "library/busybox", "latest")),
        ("docker://docker.io/busybox", RegistryTarget("docker.io", "library/busybox", "latest")),
        (
            "docker://index.docker.io/library/busybox:1",
            RegistryTarget("docker.io", "library/busybox", "1"),
        ),
        ("docker://docker.io/me/app", RegistryTarget("docker.io", "me/app", "latest")),
        (
            "docker://reg.example/app@sha256:" + "a" * 64,
            RegistryTarget("reg.example", "app", None, "sha256:" + "a" * 64),
        ),
    ],
)
def test_parse_target_accepts_skopeo_forms(text: str, expected: object) -> None:
    assert parse_target(text) == expected


def test_docker_hub_api_host() -> None:
    """``docker.io`` names Docker Hub in references; its API is on registry-1."""
    hub = parse_target("docker://busybox")
    assert isinstance(hub, RegistryTarget) and hub.api_host == "registry-1.docker.io"
    other = parse_target("docker://localhost:5000/app")
    assert isinstance(other, RegistryTarget) and other.api_host == "localhost:5000"


@pytest.mark.parametrize(
    "text",
    [
        "out",
        "tar:x",
        "oci:",
        "oci:dir:bad tag",
        "docker-archive:a.tar:UPPER:1",
        "docker-archive:a.tar:app@sha256:" + "a" * 64,
        "docker:/host/app",
        "docker://localhost:5000/app:bad!tag",
        "docker://localhost:5000/app@sha256:zz",
        "oci:dir:latest\n",  # "$" alone would let a trailing newline through
        "docker://localhost:5000/app:v1\n",
        "docker://localhost:5000/app:v\u00e9",  # tags are ASCII
        "docker://localhost:5000/app@sha256:" + "a" * 64 + "\n",
    ],
)
def test_parse_target_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(TargetError) as err:
        parse_target(text)
    assert repr(text) in str(err.value)
    assert "docker-archive:FILE[:NAME[:TAG]]" in str(err.value)


def test_layout_is_readable_by_skopeo_and_links_cached_layers(
    demo_image: Any, tmp_path: Path
) -> None:
    image = demo_image.image
    layout = tmp_path / "layout"
    result = write_image(image, parse_target(f"oci:{layout}:v1"), tls_verify=False)
    info = skopeo_inspect(f"oci:{layout}:v1")
    assert info["Digest"] == image.manifest.digest
    assert info["Layers"] == [layer.digest for layer in image.layers]
    assert sorted(result.linked) == sorted(layer.digest for layer in image.layers)
    assert sorted(result.written) == sorted([image.config.digest, image.manifest.digest])
    for layer in image.layers:  # a hard link: same inode as the cache entry
        assert layer.path is not None
        blob = layout / "blobs/sha256" / layer.digest.removeprefix("sha256:")
        assert blob.stat().st_ino == layer.path.stat().st_ino
    assert json.loads((layout / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    again = write_oci_layout(image, layout, "v1")
    assert not again.written and not again.linked
    assert len(again.skipped) == len(image.layers) + 2


def test_umoci_unpack_gives_the_host_store_and_customisation(
    rootfs_matches_store: Callable[..., int], demo_image: Any, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(demo_image.image, layout, "app")
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:app", str(bundle)],
        check=True,
        capture_output=True,
    )
    rootfs = bundle / "rootfs"
    assert rootfs_matches_store(rootfs, demo_image.closure) > 10
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    passwd = (rootfs / "etc/passwd").read_text().splitlines()
    assert passwd[0].startswith("root:x:0:0:")
    assert "app:x:1000:1000::/tmp:/bin/sh" in passwd
    assert os.readlink(rootfs / "bin/sh") == f"{demo_image.busybox}/bin/sh"


def test_tags_replace_their_own_entry_and_keep_others(
    make_demo: Callable[..., Any], demo_app: str, demo_image: Any, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(demo_image.image, layout, "a")
    write_oci_layout(demo_image.image, layout, "b")
    other = make_demo(demo_app, tmp_path / "cache", user="1000:1000").image
    assert other.manifest.digest != demo_image.image.manifest.digest
    write_oci_layout(other, layout, "a")
    names = {
        m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
        for m in index_of(layout)["manifests"]  # type: ignore[attr-defined]
    }
    assert names == {"a": other.manifest.digest, "b": demo_image.image.manifest.digest}
    assert skopeo_inspect(f"oci:{layout}:a")["Digest"] == other.manifest.digest


def test_skopeo_copies_between_layouts(demo_image: Any, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_oci_layout(demo_image.image, src, "v1")
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{src}:v1", f"oci:{dst}:copy"],
        check=True,
        capture_output=True,
    )
    info = skopeo_inspect(f"oci:{dst}:copy")
    assert info["Digest"] == demo_image.image.manifest.digest


def test_docker_format_is_refused_by_oci_sinks(
    make_demo: Callable[..., Any], demo_app: str, tmp_path: Path
) -> None:
    image = make_demo(demo_app, tmp_path / "cache", format="docker").image
    for target in (f"oci:{tmp_path}/layout:d", f"oci-archive:{tmp_path}/a.tar:d"):
        with pytest.raises(LayoutError, match="use --format oci"):
            write_image(image, parse_target(target))
    assert not (tmp_path / "layout").exists()
    assert not (tmp_path / "a.tar").exists()


def test_corrupt_cache_entry_is_never_emitted(
    make_demo: Callable[..., Any], demo_app: str, tmp_path: Path
) -> None:
    composed = make_demo(demo_app, tmp_path / "cache")
    victim = composed.image.layers[0]
    assert victim.path is not None
    data = bytearray(victim.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.path.write_bytes(bytes(data))
    layout = tmp_path / "layout"
    with pytest.raises(CorruptBlob) as err:
        write_oci_layout(composed.image, layout, "v1")
    assert victim.digest in str(err.value)
    blob = layout / "blobs/sha256" / victim.digest.removeprefix("sha256:")
    assert not blob.exists()
    assert not (layout / "index.json").exists()
    assert not victim.path.exists(), "the damaged cache entry must be dropped"
    assert not [p for p in (layout / "blobs/sha256").iterdir() if p.name.startswith(".")]


def test_blobs_are_copied_with_verification_across_filesystems(
    demo_image: Any, tmp_path: Path
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the tmp dir")
    layout = shm / f"stowaway-test-{os.getpid()}"
    try:
        result = write_oci_layout(demo_image.image, layout, "v1")
        assert not result.linked
        assert len(result.written) == len(demo_image.image.layers) + 2
        assert skopeo_inspect(f"oci:{layout}:v1")["Digest"] == demo_image.image.manifest.digest
    finally:
        subprocess.run(["rm", "-rf", str(layout)], check=True)


def test_refuses_foreign_directories_and_broken_indexes(demo_image: Any, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(LayoutError, match="holds no oci-layout"):
        write_oci_layout(demo_image.image, foreign, "v1")
    layout = tmp_path / "layout"
    write_oci_layout(demo_image.image, layout, "v1")
    (layout / "index.json").write_text("{not json")
    with pytest.raises(LayoutError, match="index.json is not valid JSON"):
        write_oci_layout(demo_image.image, layout, "v2")


def test_layout_files_are_0644_linked_or_copied(
    make_demo: Callable[..., Any], demo_app: str, tmp_path: Path
) -> None:
    """Same modes whichever way a blob arrives, even under a strict umask and from a
    cache entry an older stowaway left at 0600."""
    old_umask = os.umask(0o077)
    try:
        composed = make_demo(demo_app, tmp_path / "cache")
        old_entry = composed.image.layers[0].path
        assert old_entry is not None
        old_entry.chmod(0o600)
        layout = tmp_path / "layout"
        result = write_oci_layout(composed.image, layout, "v1")
    finally:
        os.umask(old_umask)
    assert result.linked and result.written
    files = [p for p in layout.rglob("*") if p.is_file()]
    assert len(files) == len(composed.image.layers) + 4  # + config, manifest, index, marker
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        p.name: "0o644" for p in files
    }


def test_concurrent_builds_into_one_layout_keep_every_tag(demo_app: str, tmp_path: Path) -> None:
    """Writers to one layout merge their index entries (none is lost), and racing links
    of the same cached blob leave no temp files behind."""
    layout = tmp_path / "layout"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    cmd = [sys.executable, "-m", "stowaway", "build", demo_app, "--json"]
    subprocess.run([*cmd, "-o", f"oci:{layout}:warm"], check=True, capture_output=True, env=env)
    for blob in (layout / "blobs" / "sha256").iterdir():
        blob.unlink()  # every writer links the same cached blobs again, at once
    tags = [f"t{i}" for i in range(16)]
    procs = [
        subprocess.Popen([*cmd, "-o", f"oci:{layout}:{t}"], stdout=subprocess.DEVNULL, env=env)
        for t in tags
    ]
    assert [p.wait(timeout=300) for p in procs] == [0] * len(tags)
    names = {
        m["annotations"]["org.opencontainers.image.ref.name"]
        for m in index_of(layout)["manifests"]  # type: ignore[attr-defined]
    }
    assert names == {"warm", *tags}
    assert [p.name for p in (layout / "blobs" / "sha256").iterdir() if p.name.startswith(".")] == []
    assert (
        skopeo_inspect(f"oci:{layout}:t7")["Digest"]
        == skopeo_inspect(f"oci:{layout}:warm")["Digest"]
    )
