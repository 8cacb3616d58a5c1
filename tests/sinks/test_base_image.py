"""`stowaway build --from`: the Nix layers on top of a real Debian minbase image
(debootstrap, made into an OCI layout by umoci), run by real containerd + runc, pushed
to a real registry (distribution) with the base's blobs mounted, not uploaded."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemons import Containerd, Registry
from stowaway.image.config import default_architecture
from stowaway.sinks.inspect import InspectError, pick_platform
from stowaway_cli import build_json, run

pytestmark = pytest.mark.slow  # debootstraps Debian once per machine

REPO = Path(__file__).resolve().parents[2]
PATHS_KEY = "containerd.io/snapshot/stowaway.paths.0"
INDEX = "application/vnd.oci.image.index.v1+json"
#: This machine's architecture (the Debian base's, and the build's) and another one.
HOST = default_architecture()
OTHER = "s390x" if HOST != "s390x" else "arm64"


def tool(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    """A Debian minbase root filesystem tarball of this machine's release, made by
    debootstrap once per machine (cached in /var/cache/stowaway by the script)."""
    out = subprocess.run(
        ["bash", str(REPO / "scripts/debian-base.sh")], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.fail(f"scripts/debian-base.sh failed (debootstrap needs the mirror):\n{out.stderr}")
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def debian(tmp_path_factory: pytest.TempPathFactory, debian_rootfs: Path) -> Path:
    """An OCI layout, tag 12, of the Debian rootfs as one gzip layer, written by umoci
    (not by us), with a config of its own: Env, Cmd and a label."""
    layout = tmp_path_factory.mktemp("debian") / "base"
    tool("umoci", "init", "--layout", str(layout))
    tool("umoci", "new", "--image", f"{layout}:12")
    tool("umoci", "raw", "add-layer", "--image", f"{layout}:12", str(debian_rootfs))
    tool(
        "umoci", "config", "--image", f"{layout}:12",
        "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--config.env", "LANG=C.UTF-8", "--config.cmd", "bash",
        "--config.label", "org.example.base=debian",
    )  # fmt: skip
    return layout


def manifest_of(layout: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )
    manifest = json.loads(blob(layout, desc["digest"]))
    return manifest, json.loads(blob(layout, manifest["config"]["digest"]))


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs/sha256" / digest.removeprefix("sha256:")).read_bytes()


def test_nix_layers_on_debian_run_in_containerd_and_are_reproducible(
    debian: Path, demo_app: str, tmp_path: Path
) -> None:
    base_manifest, _ = manifest_of(debian, "12")
    args = [demo_app, "--from", f"oci:{debian}:12", "--env", "LANG=C", "--user", "app"]
    out = build_json(*args, "--cache-dir", str(tmp_path / "c1"), "-o", f"oci:{tmp_path}/img:app")
    manifest, config = manifest_of(tmp_path / "img", "app")
    # the base layer is listed as the base lists it: same blob, no annotations
    (base_layer,) = base_manifest["layers"]
    assert manifest["layers"][0] == base_layer
    assert [row["base"] for row in out["layers"]] == [True] + [False] * (len(out["layers"]) - 1)
    assert all(PATHS_KEY in layer.get("annotations", {}) for layer in manifest["layers"][1:-1])
    assert "annotations" not in manifest["layers"][-1]  # the customisation layer
    # configs merged: the base's Env (ours by key; the root's bin dir leads the base's
    # PATH) and Cmd; ours appended to its history
    run_conf = config["config"]
    assert run_conf["Env"] == [
        f"PATH={demo_app}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG=C",
    ]
    assert (run_conf["Cmd"], run_conf["User"]) == (["bash"], "app")
    assert run_conf["Labels"] == {"org.example.base": "debian"}
    assert config["history"][0]["created_by"] == "umoci raw add-layer"
    assert config["history"][-1]["comment"] == "stowaway customisation layer"
    assert config["rootfs"]["diff_ids"][0] == manifest_of(debian, "12")[1]["rootfs"]["diff_ids"][0]
    # the same base and closure give the same image: fresh cache, archive base, archive out
    shutil.rmtree(tmp_path / "c1")
    tool("skopeo", "copy", f"oci:{debian}:12", f"oci-archive:{tmp_path}/base.tar:12")
    archive = tmp_path / "app.tar"
    again = build_json(
        demo_app, "--from", f"oci-archive:{tmp_path}/base.tar:12", "--env", "LANG=C",
        "--user", "app", "--cache-dir", str(tmp_path / "c2"), "-o", f"oci-archive:{archive}:app",
    )  # fmt: skip
    assert again["manifest_digest"] == out["manifest_digest"]
    with Containerd(tmp_path / "ctrd") as ctrd:
        ctrd.ctr("image", "import", "--base-name", "docker.io/library/app", str(archive))
        ref = ctrd.ctr("image", "ls", "-q").stdout.split()[0]
        debian_side = ctrd.ctr(
            "run", "--rm", ref, "deb", "sh", "-c",
            "id -un; dpkg-query -W -f='${Package}\\n' base-files; grep -c '^_apt:' /etc/passwd",
        ).stdout  # fmt: skip
        nix_side = ctrd.ctr("run", "--rm", ref, "nix", f"{demo_app}/bin/demo").stdout
    # runs as the new user, added to Debian's accounts (not replacing them)
    assert debian_side.split() == ["app", "base-files", "1"]
    assert nix_side.splitlines()[0] == "hello from stowaway"


def test_push_on_a_registry_base_mounts_its_blobs(
    debian: Path, demo_app: str, tmp_path: Path
) -> None:
    base_manifest, _ = manifest_of(debian, "12")
    base_digest = base_manifest["layers"][0]["digest"]
    cache = tmp_path / "cache"
    with Registry(tmp_path / "reg") as reg:
        tool(
            "skopeo", "copy", "--dest-tls-verify=false",
            f"oci:{debian}:12", f"docker://{reg.host}/library/debian:12",
        )  # fmt: skip
        stored = reg.blob_bytes()
        src = ["--from", f"docker://{reg.host}/library/debian:12", "--src-tls-verify=false"]
        out = build_json(
            demo_app, *src, "--cache-dir", str(cache), "--dest-tls-verify=false",
            "-o", f"docker://{reg.host}/team/app:1",
        )  # fmt: skip
        assert out["layers"][0]["digest"] == base_digest
        assert out["layers"][0]["destination"] == "linked"  # mounted from library/debian
        assert base_digest in out["sink"]["linked"] and base_digest not in out["sink"]["written"]
        assert reg.blob_bytes() - stored < base_manifest["layers"][0]["size"] // 10
        # never needed, never fetched
        assert not (cache / "blobs/sha256" / base_digest.removeprefix("sha256:")).exists()
        info = json.loads(tool("skopeo", "inspect", "--tls-verify=false",
                               f"docker://{reg.host}/team/app:1"))  # fmt: skip
        assert info["Layers"][0] == base_digest
        assert info["Env"][0].startswith(f"PATH={demo_app}/bin:/usr/local")
        assert info["Digest"] == out["manifest_digest"]
        # a destination that needs the bytes gets them, fetched into the cache and verified
        local = build_json(demo_app, *src, "--cache-dir", str(cache), "-o", f"oci:{tmp_path}/out:1")
    assert local["manifest_digest"] == out["manifest_digest"]
    assert (cache / "blobs/sha256" / base_digest.removeprefix("sha256:")).is_file()
    tool("skopeo", "copy", f"oci:{tmp_path}/out:1", f"dir:{tmp_path}/dir")  # skopeo verifies


def copy_layout(debian: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the Debian layout whose manifest ``edit`` changed (re-hashed)."""
    import hashlib

    layout = tmp_path / "bad"
    shutil.copytree(debian, layout)
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(layout, index["manifests"][0]["digest"]))
    edit(manifest)
    data = json.dumps(manifest).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest.removeprefix("sha256:")).write_bytes(data)
    index["manifests"][0].update(digest=digest, size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def indexed(
    debian: Path, tmp_path: Path, name: str, arches: list[str], host_digest: str | None = None
) -> Path:
    """A copy of the Debian layout whose tag names an image index: ``HOST`` entries are
    the real manifest (or ``host_digest``), other architectures one that is not there."""
    import hashlib

    layout = tmp_path / name
    shutil.copytree(debian, layout)
    index = json.loads((layout / "index.json").read_text())
    real = index["manifests"][0]
    entries = [
        {
            "mediaType": real["mediaType"],
            "digest": (host_digest or real["digest"]) if arch == HOST else "sha256:" + "e" * 64,
            "size": real["size"],
            "platform": {"os": "linux", "architecture": arch},
        }
        for arch in arches
    ]
    doc = {"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}
    data = json.dumps(doc).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest[7:]).write_bytes(data)
    index["manifests"][0] = {"mediaType": INDEX, "digest": digest, "size": len(data),
                             "annotations": real["annotations"]}  # fmt: skip
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def test_an_index_base_gives_the_manifest_of_the_build_platform(
    debian: Path, demo_app: str, tmp_path: Path
) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    direct = build_json(demo_app, *cache, "--from", f"oci:{debian}:12", "-o", f"oci:{tmp_path}/a")
    multi = indexed(debian, tmp_path, "multi", [OTHER, HOST, "riscv64"])
    via_index = build_json(demo_app, *cache, "--from", f"oci:{multi}:12", "-o", f"oci:{tmp_path}/b")
    assert via_index["manifest_digest"] == direct["manifest_digest"]


def failure(*args: str) -> tuple[str, str]:
    proc = run("build", "--json", *args, ok=False)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    return doc["error"], doc["hint"] or ""


def test_bad_bases_give_clear_errors(debian: Path, demo_app: str, tmp_path: Path) -> None:
    common = [demo_app, "--cache-dir", str(tmp_path / "cache"), "-o", f"oci:{tmp_path}/out"]
    # another platform
    arm = tmp_path / "arm"
    shutil.copytree(debian, arm)
    tool("umoci", "config", "--image", f"{arm}:12", "--architecture", OTHER)
    error, hint = failure(*common, "--from", f"oci:{arm}:12")
    assert f"is a linux/{OTHER} image; this image is for linux/{HOST}" in error
    assert "platform" in hint

    error, hint = failure(*common, "--from", f"oci:{indexed(debian, tmp_path, 'i', [OTHER])}:12")
    assert f"no linux/{HOST} image in the index" in error and f"linux/{OTHER}" in hint
    escape = indexed(debian, tmp_path, "esc", [HOST], host_digest="sha256:../../../etc/passwd")
    error, _ = failure(*common, "--from", f"oci:{escape}:12")
    assert "index entry: invalid digest 'sha256:../../../etc/passwd'" in error

    # a media type we cannot use
    def bzip2(m: dict[str, Any]) -> None:
        m["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+bzip2"

    error, hint = failure(*common, "--from", f"oci:{copy_layout(debian, tmp_path, bzip2)}")
    assert "tar+bzip2', which stowaway cannot use" in error and "gzip" in hint
    # a damaged layer blob: found when copied, and the base's file is left alone
    broken = tmp_path / "broken"
    shutil.copytree(debian, broken)
    layer = broken / "blobs/sha256" / manifest_of(debian, "12")[0]["layers"][0]["digest"][7:]
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    error, hint = failure(*common, "--from", f"oci:{broken}:12")
    assert error.startswith("corrupt blob") and str(layer) in hint and layer.exists()
    # no such layout, not an image reference at all, and a docker archive
    error, hint = failure(*common, "--from", f"oci:{tmp_path}/none:12")
    assert error.startswith("base image oci:") and "has no index.json" in error and hint
    assert "invalid base image" in failure(*common, "--from", "nope")[0]
    assert "docker archive cannot be a base" in failure(*common, "--from", "docker-archive:x")[0]


def test_a_private_registry_base_takes_its_own_credentials(
    debian: Path, demo_app: str, tmp_path: Path
) -> None:
    """--src-creds or the login files (here --authfile) for the base's registry; the
    destination's --creds are never sent there."""
    import base64

    with Registry(tmp_path / "reg", htpasswd={"alice": "s3cret"}) as reg:
        base = f"docker://{reg.host}/private/debian:12"
        tool("skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", "alice:s3cret",
             f"oci:{debian}:12", base)  # fmt: skip
        empty, login = tmp_path / "empty.json", tmp_path / "auth.json"
        empty.write_text("{}")
        token = base64.b64encode(b"alice:s3cret").decode()
        login.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
        common = [demo_app, "--from", base, "--src-tls-verify=false"]
        out = ["--cache-dir", str(tmp_path / "cache"), "-o", f"oci:{tmp_path}/out"]
        error, hint = failure(*common, "--creds", "alice:s3cret", "--authfile", str(empty), *out)
        assert "401" in error or "unauthorized" in error.lower(), error
        assert hint
        with_flag = build_json(
            *common, "--src-creds", "alice:s3cret", "--authfile", str(empty), *out
        )
        from_file = build_json(*common, "--authfile", str(login), *out)
    assert with_flag["manifest_digest"] == from_file["manifest_digest"]


def test_index_entries_of_any_shape_are_passed_over_when_picking_a_platform() -> None:
    """An index is outside input: entries that are no objects, platforms that are no
    objects, entries without digests are skipped, never a traceback; the match's listed
    media type comes back with its digest (a base's manifest may not name its own)."""
    digest = "sha256:" + "a" * 64
    index = {
        "manifests": [
            "not an entry",
            {"platform": "linux/amd64"},
            {"digest": "sha256:" + "b" * 64, "platform": {"os": "linux", "architecture": "s390x"}},
            {
                "digest": digest,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "platform": {"os": "linux", "architecture": "amd64"},
            },
        ]
    }
    assert pick_platform("idx", index, ("linux", "amd64", None)) == (
        digest,
        "application/vnd.oci.image.manifest.v1+json",
    )
    with pytest.raises(InspectError, match="no linux/arm64 image") as info:
        pick_platform("idx", index, ("linux", "arm64", None))
    assert "linux/s390x" in (info.value.hint or "")
