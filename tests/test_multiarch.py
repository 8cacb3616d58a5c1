"""Multi-arch images end to end: a real aarch64-linux closure (built in Nix's sandbox by
Debian's arm64 busybox under qemu/binfmt, see scripts/setup.sh) and an x86_64-linux one
of the same recipe, composed into one image index, and real clients picking their
platform from it: skopeo --override-arch, podman pull --arch, ctr pull --platform (and
ctr run of the arm64 image under binfmt)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from daemons import Containerd, Registry
from nixtools import ARM_BUSYBOX, build_multiarch, closure_of
from stowaway_cli import STOWAWAY, build_json, run

BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")


@pytest.fixture(scope="module")
def arm_app(have_nix: None) -> str:
    if not ARM_BUSYBOX.is_file() or "flags:" not in _read(BINFMT):
        pytest.fail("no arm64 busybox or no qemu-aarch64 binfmt entry: run `make setup`")
    return build_multiarch("aarch64-linux")


@pytest.fixture(scope="module")
def amd_app(have_nix: None) -> str:
    return build_multiarch("x86_64-linux")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _skopeo(*args: str) -> str:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_fixture_is_a_real_arm64_build(arm_app: str) -> None:
    assert (Path(arm_app) / "built-on").read_text().strip() == "aarch64"
    out = subprocess.run([f"{arm_app}/bin/hello"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "hello from aarch64"  # under qemu, through binfmt


def test_platform_comes_from_the_derivation(arm_app: str, amd_app: str, tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    arm = build_json(arm_app, *cache, "-o", f"oci:{tmp_path}/arm:1")
    assert arm["platform"]["platform"] == "linux/arm64"
    assert arm["platform"]["origin"] == "derivations"
    assert arm["platform"]["systems"] == {arm_app: "aarch64-linux"}
    config = json.loads(_skopeo("inspect", "--config", f"oci:{tmp_path}/arm:1"))
    assert (config["os"], config["architecture"]) == ("linux", "arm64")
    plan = json.loads(run("plan", "--json", amd_app).stdout)
    assert plan["platform"]["platform"] == "linux/amd64"
    # --platform overrides; a root without a deriver (a builtins.path source) says nothing
    busybox = arm["layers"][0]["store_paths"][0]
    said = build_json(busybox, *cache, "--platform", "linux/arm/v7", "-o", f"oci:{tmp_path}/x:1")
    assert said["platform"] == {"platform": "linux/arm/v7", "origin": "flag", "systems": {}}
    config = json.loads(_skopeo("inspect", "--config", f"oci:{tmp_path}/x:1"))
    assert (config["architecture"], config["variant"]) == ("arm", "v7")
    host = build_json(busybox, *cache, "-o", f"oci:{tmp_path}/h:1")["platform"]
    assert (host["platform"], host["origin"]) == ("linux/amd64", "host")


def test_roots_of_two_platforms_are_refused(arm_app: str, amd_app: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [*STOWAWAY, "build", arm_app, amd_app, "-o", f"oci:{tmp_path}/o"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "built for different platforms" in proc.stderr
    assert "--platform" in proc.stderr.split("hint:")[1]
    # pairing an installable with the wrong platform is caught too
    proc = subprocess.run(
        [*STOWAWAY, "build", "--platform", f"linux/amd64={arm_app}", "-o", f"oci:{tmp_path}/o"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and f"{arm_app} was built for linux/arm64" in proc.stderr
    proc = subprocess.run(
        [*STOWAWAY, "build", "--platform", f"linux/arm64={arm_app}"]
        + ["-o", f"docker-archive:{tmp_path}/a.tar", "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "cannot hold an image index" in json.loads(proc.stdout)["error"]
    assert not (tmp_path / "a.tar").exists()


def _index_args(arm_app: str, amd_app: str, cache: Path) -> list[str]:
    return [
        "--platform", f"linux/amd64={amd_app}", "--platform", f"linux/arm64={arm_app}",
        "--entrypoint", "/bin/hello", "--contents", f"linux/arm64={arm_app}",
        "--contents", f"linux/amd64={amd_app}", "--cache-dir", str(cache),
    ]  # fmt: skip


def test_index_in_oci_layout_and_archive(arm_app: str, amd_app: str, tmp_path: Path) -> None:
    args = _index_args(arm_app, amd_app, tmp_path / "cache")
    out = build_json(*args, "-o", f"oci:{tmp_path}/layout:v1")
    assert out["media_type"] == "application/vnd.oci.image.index.v1+json"
    by_platform = {m["platform"]["platform"]: m for m in out["manifests"]}
    assert sorted(by_platform) == ["linux/amd64", "linux/arm64"]
    index_json = json.loads((tmp_path / "layout" / "index.json").read_text())
    (entry,) = index_json["manifests"]
    assert entry["digest"] == out["manifest_digest"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    # same images named in the other order, from a fresh cache: the same index
    swapped = [*args[2:4], *args[0:2], *args[4:-1], str(tmp_path / "cache2")]
    again = build_json(*swapped, "-o", f"oci-archive:{tmp_path}/a.tar:v1")
    assert again["manifest_digest"] == out["manifest_digest"]
    for arch, app in (("arm64", arm_app), ("amd64", amd_app)):
        for src in (f"oci:{tmp_path}/layout:v1", f"oci-archive:{tmp_path}/a.tar:v1"):
            raw = _skopeo("--override-arch", arch, "inspect", "--raw", src)
            assert json.loads(raw)["mediaType"] == "application/vnd.oci.image.index.v1+json"
            dest = tmp_path / f"copy-{arch}"
            _skopeo("--override-arch", arch, "copy", src, f"oci:{dest}:x")
            config = json.loads(_skopeo("inspect", "--config", f"oci:{dest}:x"))
            assert config["architecture"] == arch
            assert config["config"]["Entrypoint"] == ["/bin/hello"]
            manifest = json.loads(_skopeo("inspect", "--raw", f"oci:{dest}:x"))
            assert manifest["config"]["digest"] == by_platform[f"linux/{arch}"]["config_digest"]
        summary = json.loads(
            run(
                "inspect", "--json", f"oci:{tmp_path}/layout:v1", "--platform", f"linux/{arch}"
            ).stdout
        )
        assert summary["config"]["architecture"] == arch
        assert any(app in layer["store_paths"] for layer in summary["layers"])
    listed = json.loads(run("inspect", "--json", f"oci-archive:{tmp_path}/a.tar:v1").stdout)
    assert [p["platform"] for p in listed["platforms"]] == ["linux/amd64", "linux/arm64"]


def test_index_pushed_and_pulled_by_real_clients(
    arm_app: str, amd_app: str, tmp_path: Path
) -> None:
    args = _index_args(arm_app, amd_app, tmp_path / "cache")
    with Registry(tmp_path / "reg") as reg:
        ref = f"{reg.host}/multi/hello:1"
        push = ["--dest-tls-verify=false", "-o", f"docker://{ref}"]
        out = build_json(*args, *push)
        assert out["sink"]["manifest_digest"] == out["manifest_digest"]
        again = build_json(*args, *push)  # nothing new: every blob is there already
        assert again["manifest_digest"] == out["manifest_digest"]
        assert again["sink"]["written"] == [] and again["sink"]["linked"] == []
        digests = {m["platform"]["platform"]: m["manifest_digest"] for m in out["manifests"]}
        tls = "--tls-verify=false"
        for arch in ("arm64", "amd64"):
            got = _skopeo("--override-arch", arch, "inspect", tls, f"docker://{ref}")
            assert json.loads(got)["Architecture"] == arch
            assert json.loads(got)["Digest"] == out["manifest_digest"]  # skopeo: the index's
            by_digest = f"docker://{reg.host}/multi/hello@{digests[f'linux/{arch}']}"
            config = json.loads(_skopeo("inspect", "--config", tls, by_digest))
            assert config["architecture"] == arch
        listed = json.loads(run("inspect", "--json", f"docker://{ref}", tls).stdout)
        assert listed["manifest_digest"] == out["manifest_digest"]

        _podman_pull_arm64(ref, tmp_path)

        with Containerd(tmp_path / "ctrd") as ctrd:
            ctrd.ctr("image", "pull", "--plain-http", "--platform", "linux/arm64", ref)
            res = ctrd.ctr("run", "--rm", "--platform", "linux/arm64", ref, "multiarch-arm")
            assert res.stdout.strip() == "hello from aarch64"
            ctrd.ctr("image", "pull", "--plain-http", "--platform", "linux/amd64", ref)
            res = ctrd.ctr("run", "--rm", "--platform", "linux/amd64", ref, "multiarch-amd")
            assert res.stdout.strip() == "hello from x86_64"


def _podman_pull_arm64(ref: str, tmp_path: Path) -> None:
    """podman pull --arch arm64 into a private store (podman wants a short runroot)."""
    run_root = Path(tempfile.mkdtemp(prefix="pm-"))
    podman = ["podman", "--root", str(tmp_path / "podman"), "--runroot", str(run_root)]
    podman += ["--storage-driver", "vfs"]
    env = {**os.environ, "CONTAINERS_CONF": "/dev/null", "XDG_RUNTIME_DIR": str(run_root)}
    auth = tmp_path / "auth.json"  # no credentials (podman 4.3 insists on reading a file)
    auth.write_text('{"auths": {}}')
    try:
        pulled = subprocess.run(
            [*podman, "pull", "--authfile", str(auth), "--tls-verify=false", "--arch", "arm64",
             f"docker://{ref}"],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert pulled.returncode == 0, pulled.stderr
        seen = subprocess.run(
            [*podman, "image", "inspect", ref], capture_output=True, text=True, env=env
        )
        assert seen.returncode == 0, seen.stderr
        assert json.loads(seen.stdout)[0]["Architecture"] == "arm64"
    finally:
        shutil.rmtree(run_root, ignore_errors=True)


def test_docker_format_index_is_a_manifest_list(arm_app: str, amd_app: str, tmp_path: Path) -> None:
    args = _index_args(arm_app, amd_app, tmp_path / "cache")
    with Registry(tmp_path / "reg") as reg:
        ref = f"docker://{reg.host}/multi/docker:1"
        out = build_json(*args, "--format", "docker", "--dest-tls-verify=false", "-o", ref)
        raw = json.loads(_skopeo("inspect", "--raw", "--tls-verify=false", ref))
        assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.list.v2+json"
        assert [m["platform"]["architecture"] for m in raw["manifests"]] == ["amd64", "arm64"]
        got = _skopeo("--override-arch", "arm64", "inspect", "--tls-verify=false", ref)
        assert json.loads(got)["Architecture"] == "arm64"
        assert json.loads(got)["Digest"] == out["manifest_digest"]


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--platform", "linux/amd64", "--platform", "linux/arm64", "{amd}"], "given 2 times"),
        (["{amd}", "--platform", "linux/arm64={arm}"], "both as arguments and in --platform"),
        (["--platform", "linux/arm64={arm}", "--platform", "linux/amd64"], "names no installable"),
        (["{amd}", "--contents", "linux/amd64={amd}"], "needs --platform OS/ARCH=INSTALLABLE"),
        (["--platform", "linux/arm64={arm}", "--contents", "linux/s390x={arm}"], "no --platform"),
        (["--platform", "linux", "{amd}"], "is not a platform"),
    ],
)
def test_platform_flag_mistakes(
    flags: list[str], error: str, arm_app: str, amd_app: str, tmp_path: Path
) -> None:
    args = [f.format(arm=arm_app, amd=amd_app) for f in flags]
    proc = subprocess.run(
        [*STOWAWAY, "build", *args, "-o", f"oci:{tmp_path}/o", "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert error in doc["error"] and doc["hint"]
    assert not (tmp_path / "o").exists()


def test_index_layer_base_applies_to_the_images_holding_it(
    arm_app: str, amd_app: str, demo_app: str, tmp_path: Path
) -> None:
    """With an index, a --layer-base path is for one platform: each image plans apart
    the named bases in its own closure; a base in no image's closure is refused."""
    (arm_busybox,) = [p for p in closure_of(arm_app) if p != arm_app]
    args = _index_args(arm_app, amd_app, tmp_path / "cache")
    # the whole arm closure as the base: with --max-layers 3 the base gets one layer
    based = build_json(*args, "--layer-base", arm_app, "--max-layers", "3", "-o",
                       f"oci:{tmp_path}/based:v1")  # fmt: skip
    plain = build_json(*args, "--max-layers", "3", "-o", f"oci:{tmp_path}/plain:v1")

    def layers(out: dict[str, Any], arch: str) -> list[list[str]]:
        (image,) = [m for m in out["manifests"] if m["platform"]["platform"] == f"linux/{arch}"]
        return [x["store_paths"] for x in image["layers"][:-1]]

    assert layers(based, "arm64") == [sorted([arm_busybox, arm_app])]
    assert layers(plain, "arm64") == [[arm_busybox], [arm_app]]  # busybox > 1 MiB: alone
    assert layers(based, "amd64") == layers(plain, "amd64")
    proc = run(*["build", *args, "--layer-base", demo_app, "-o", f"oci:{tmp_path}/x:v1"], ok=False)
    assert proc.returncode == 1
    assert f"layer base {demo_app} is in no image's closure" in proc.stderr
