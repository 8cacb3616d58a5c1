"""SBOMs and signatures attached to real images, checked by the real tools: `cosign
verify` against docker-registry 2.8, `oras discover` through the referrers tag schema
(docker-registry) and the referrers API (`stowaway serve`), and in an OCI layout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemons import Registry, free_port, wait_for
from stowaway_cli import STOWAWAY, run

PASSWORD = "s3cret"
SPDX = "application/spdx+json"


def tool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which(args[0]) is None:
        pytest.fail(f"{args[0]} is not installed: run scripts/setup.sh")
    env = {**os.environ, "COSIGN_PASSWORD": PASSWORD, "HOME": str(cwd or os.getcwd())}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two cosign key pairs: ours and someone else's."""
    out = {}
    for name in ("ours", "other"):
        d = tmp_path_factory.mktemp(name)
        proc = tool("cosign", "generate-key-pair", cwd=d)
        assert proc.returncode == 0, proc.stderr
        out[name], out[f"{name}.pub"] = d / "cosign.key", d / "cosign.pub"
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def build(demo_app: str, cache: Path, target: str, *extra: str) -> dict[str, Any]:
    args = ["build", "--json", demo_app, "--cache-dir", str(cache), "-o", target, *extra]
    out = run(*args, env={"COSIGN_PASSWORD": PASSWORD})
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def verify(ref: str, pub: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return tool("cosign", "verify", "--key", str(pub), "--insecure-ignore-tlog=true",
                "--allow-insecure-registry", *extra, ref)  # fmt: skip


def test_cosign_verifies_what_build_signs_and_nothing_else(
    demo_app: str, registry: Registry, keys: dict[str, Path], tmp_path: Path
) -> None:
    ref = f"{registry.host}/signed/demo:1"
    out = build(demo_app, tmp_path / "cache", f"docker://{ref}", "--dest-tls-verify=false",
                "--sign-key", str(keys["ours"]))  # fmt: skip
    digest = out["manifest_digest"]
    assert out["signature"]["signature_tag"] == f"sha256-{digest[7:]}.sig"
    good = verify(ref, keys["ours.pub"])
    assert good.returncode == 0, good.stderr
    payload = json.loads(good.stdout)[0]
    assert payload["critical"]["image"]["docker-manifest-digest"] == digest
    assert payload["critical"]["identity"]["docker-reference"] == f"{registry.host}/signed/demo"
    assert payload["critical"]["type"] == "cosign container image signature"
    assert verify(ref, keys["other.pub"]).returncode != 0  # someone else's key
    # the tag moved to another image: its digest has no signature
    build(demo_app, tmp_path / "cache", f"docker://{ref}", "--dest-tls-verify=false",
          "--env", "CHANGED=1")  # fmt: skip
    assert verify(ref, keys["ours.pub"]).returncode != 0
    assert verify(f"{registry.host}/signed/demo@{digest}", keys["ours.pub"]).returncode == 0


def test_sign_adds_to_the_signatures_already_there(
    demo_app: str, registry: Registry, keys: dict[str, Path], tmp_path: Path
) -> None:
    ref = f"{registry.host}/twice/demo:1"
    build(demo_app, tmp_path / "cache", f"docker://{ref}", "--dest-tls-verify=false")
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    done = []
    for key in ("ours", "other"):
        proc = run("sign", f"docker://{ref}", "--key", str(keys[key]), "--password-file",
                   str(pw), "--tls-verify=false", "--json")  # fmt: skip
        done.append(json.loads(proc.stdout))
    assert [d["signatures"] for d in done] == [1, 2]
    assert verify(ref, keys["ours.pub"]).returncode == 0
    assert verify(ref, keys["other.pub"]).returncode == 0
    sign_again = ["sign", f"docker://{ref}", "--key", str(keys["ours"]), "--password-file",
                  str(pw), "--tls-verify=false", "--json"]  # fmt: skip
    again = json.loads(run(*sign_again).stdout)
    assert again["signatures"] == 2 and again["already_signed"]  # the tag does not grow


def test_sign_refuses_a_wrong_password_and_a_file_target(
    demo_app: str, keys: dict[str, Path], tmp_path: Path
) -> None:
    proc = run("sign", "docker://127.0.0.1:1/x:1", "--key", str(keys["ours"]), "--json",
               ok=False, env={"COSIGN_PASSWORD": "wrong"})  # fmt: skip
    assert proc.returncode == 1 and "wrong password" in json.loads(proc.stdout)["error"]
    proc = run("sign", f"oci:{tmp_path}/x:1", "--key", str(keys["ours"]), ok=False)
    assert "cannot hold a cosign signature" in proc.stderr and "hint:" in proc.stderr
    # build refuses before any work: nothing is written
    proc = run("build", demo_app, "-o", f"oci:{tmp_path}/y:1", "--sign-key", str(keys["ours"]),
               "--cache-dir", str(tmp_path / "cache"), ok=False)  # fmt: skip
    assert "cannot hold a cosign signature" in proc.stderr and not (tmp_path / "y").exists()


def test_sbom_through_the_referrers_tag_schema_on_distribution(
    demo_app: str, registry: Registry, tmp_path: Path
) -> None:
    ref = f"{registry.host}/sbom/demo:1"
    out = build(demo_app, tmp_path / "cache", f"docker://{ref}", "--dest-tls-verify=false",
                "--sbom")  # fmt: skip
    assert out["sbom"]["mode"] == "referrers-tag"  # distribution 2.8 has no referrers API
    digest = out["manifest_digest"]
    found = tool("oras", "discover", "--plain-http", "--format", "json", ref, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    referrers = json.loads(found.stdout)["manifests"]
    assert [(m["artifactType"], m["digest"]) for m in referrers] == [
        (SPDX, out["sbom"]["manifest_digest"])
    ]
    with urllib.request.urlopen(
        urllib.request.Request(
            f"{registry.url}/v2/sbom/demo/manifests/{out['sbom']['manifest_digest']}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
    ) as r:
        artifact = json.load(r)
    assert artifact["subject"]["digest"] == digest
    assert artifact["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    with urllib.request.urlopen(
        f"{registry.url}/v2/sbom/demo/blobs/{artifact['layers'][0]['digest']}"
    ) as r:
        attached = r.read()
    # `stowaway sbom` of the pushed image gives the very bytes build attached
    again = run("sbom", f"docker://{ref}", "--tls-verify=false").stdout.encode()
    assert again == attached
    assert {p["packageFileName"] for p in json.loads(attached)["packages"]} >= {demo_app}
    # a second build of the same image lists its SBOM once
    build(demo_app, tmp_path / "cache", f"docker://{ref}", "--dest-tls-verify=false", "--sbom")
    found = tool("oras", "discover", "--plain-http", "--format", "json", ref, cwd=tmp_path)
    assert len(json.loads(found.stdout)["manifests"]) == 1


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = tmp / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [*STOWAWAY, "serve", "--listen", f"127.0.0.1:{port}", "--no-compose",
             "--storage", str(tmp / "root")],
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def up() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
            return bool(r.status == 200)

    try:
        wait_for(up, 20, f"stowaway serve (log {log})", ignore=(OSError,))
        yield f"127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(20)


def test_sbom_through_the_referrers_api_of_stowaway_serve(
    demo_app: str, serve: str, tmp_path: Path
) -> None:
    ref = f"{serve}/sbom/demo:1"
    out = build(demo_app, tmp_path / "cache", f"docker://{ref}", "--dest-tls-verify=false",
                "--sbom", "cyclonedx")  # fmt: skip
    assert out["sbom"]["mode"] == "referrers-api"
    found = tool("oras", "discover", "--plain-http", "--format", "json", ref, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    referrers = json.loads(found.stdout)["manifests"]
    assert [m["artifactType"] for m in referrers] == ["application/vnd.cyclonedx+json"]
    tags = json.load(urllib.request.urlopen(f"http://{serve}/v2/sbom/demo/tags/list"))["tags"]
    assert tags == ["1"]  # no referrers tag where the API exists


def test_sbom_in_an_oci_layout_and_beside_an_archive(demo_app: str, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    out = build(demo_app, tmp_path / "cache", f"oci:{layout}:v1", "--sbom")
    assert out["sbom"]["mode"] == "oci-layout"
    found = tool("oras", "discover", "--oci-layout", "--format", "json", f"{layout}:v1",
                 cwd=tmp_path)  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert [m["digest"] for m in json.loads(found.stdout)["manifests"]] == [
        out["sbom"]["manifest_digest"]
    ]
    sbom = run("sbom", f"oci:{layout}:v1").stdout
    # another image under the tag goes after the first one's SBOM
    rebuilt = build(demo_app, tmp_path / "cache", f"oci:{layout}:v1", "--sbom", "--env", "X=1")
    index = json.loads((layout / "index.json").read_text())["manifests"]
    assert [m.get("artifactType") for m in index] == [SPDX, None, SPDX]
    untagged = json.loads(run("inspect", f"oci:{layout}", "--json").stdout)
    assert untagged["manifest_digest"] == rebuilt["manifest_digest"]  # the SBOM is no image
    archive = tmp_path / "demo.tar"
    out = build(demo_app, tmp_path / "cache", f"oci-archive:{archive}:v1", "--sbom")
    beside = Path(out["sbom"]["path"])
    assert beside == tmp_path / "demo.tar.spdx.json"
    doc, from_layout = json.loads(beside.read_text()), json.loads(sbom)
    assert doc["packages"] == from_layout["packages"]  # the names differ: the targets do
    assert beside.read_text() == run("sbom", f"oci-archive:{archive}:v1").stdout
    # a docker archive keeps the store paths in its history comments
    docker = f"docker-archive:{tmp_path}/d.tar:demo:1"
    out = build(demo_app, tmp_path / "cache", docker, "--format", "docker", "--sbom")
    assert Path(out["sbom"]["path"]).read_text() == run("sbom", docker).stdout


def test_sbom_of_an_installable_and_of_an_unknown_path(demo_app: str, tmp_path: Path) -> None:
    out = run("sbom", demo_app, "--format", "cyclonedx", "-o", str(tmp_path / "x.json"), "--json")
    info = json.loads(out.stdout)
    assert info["packages"] >= 1 and json.loads((tmp_path / "x.json").read_text())["components"]
    layout = tmp_path / "layout"
    build(demo_app, tmp_path / "cache", f"oci:{layout}:v1")
    empty, cache = tmp_path / "empty-store", tmp_path / "empty-cache"
    empty.mkdir()
    cache.mkdir()
    (cache / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    proc = run("sbom", f"oci:{layout}:v1", "--store", str(empty), "--substituter",
               f"file://{cache}", "--no-require-sigs", "--json", ok=False)  # fmt: skip
    error = json.loads(proc.stdout)["error"]
    assert proc.returncode == 1 and "not found" in error and "/nix/store/" in error
    assert str(cache) in error  # where it looked


def _put(url: str, data: bytes, content_type: str, method: str = "PUT") -> Any:
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", content_type)
    return urllib.request.urlopen(req)


def _push_blob(registry: Registry, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with _put(f"{registry.url}/v2/{repo}/blobs/uploads/", b"", "text/plain", "POST") as r:
        location = r.headers["Location"]
    sep = "&" if "?" in location else "?"
    upload = urllib.parse.urljoin(registry.url, location) + f"{sep}digest={digest}"
    _put(upload, data, "application/octet-stream").close()
    return digest


def test_a_hostile_signature_tag_is_refused_not_extended(
    demo_app: str, registry: Registry, keys: dict[str, Path], tmp_path: Path
) -> None:
    repo = "hostile/demo"
    out = build(demo_app, tmp_path / "cache", f"docker://{registry.host}/{repo}:1",
                "--dest-tls-verify=false")  # fmt: skip
    config = _push_blob(registry, repo, b"{}")
    layer = _push_blob(registry, repo, b"not a signature")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": layer, "size": 15}],
    }  # fmt: skip
    tag = f"sha256-{out['manifest_digest'][7:]}.sig"
    _put(f"{registry.url}/v2/{repo}/manifests/{tag}", json.dumps(manifest).encode(),
         "application/vnd.oci.image.manifest.v1+json").close()  # fmt: skip
    proc = run("sign", f"docker://{registry.host}/{repo}:1", "--key", str(keys["ours"]),
               "--tls-verify=false", ok=False, env={"COSIGN_PASSWORD": PASSWORD})  # fmt: skip
    assert proc.returncode == 1 and f"{tag}: layer 0 is not a cosign signature" in proc.stderr
    with urllib.request.urlopen(
        urllib.request.Request(f"{registry.url}/v2/{repo}/manifests/{tag}",
                               headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    ) as r:  # fmt: skip
        assert json.load(r) == manifest  # left as it was


def test_signatures_cosign_made_are_kept_when_stowaway_signs(
    demo_app: str, registry: Registry, keys: dict[str, Path], tmp_path: Path
) -> None:
    ref = f"{registry.host}/mixed/demo:1"
    out = build(demo_app, tmp_path / "cache", f"docker://{ref}", "--dest-tls-verify=false")
    by_digest = f"{registry.host}/mixed/demo@{out['manifest_digest']}"
    made = tool("cosign", "sign", "--key", str(keys["other"]), "--tlog-upload=false",
                "--allow-insecure-registry", "-y", by_digest, cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    done = json.loads(
        run(
            "sign",
            f"docker://{by_digest}",
            "--key",
            str(keys["ours"]),
            "--tls-verify=false",
            "--json",
            env={"COSIGN_PASSWORD": PASSWORD},
        ).stdout  # fmt: skip
    )
    assert done["signatures"] == 2
    for key in ("ours.pub", "other.pub"):
        ok = verify(ref, keys[key])
        assert ok.returncode == 0, ok.stderr


def test_sbom_and_signature_on_a_registry_that_asks_for_credentials(
    demo_app: str, keys: dict[str, Path], tmp_path: Path
) -> None:
    with Registry(tmp_path / "reg", htpasswd={"alice": "pw1"}) as reg:
        ref = f"{reg.host}/private/demo:1"
        dest = [f"docker://{ref}", "--dest-tls-verify=false", "--dest-creds", "alice:pw1"]
        out = build(demo_app, tmp_path / "cache", *dest, "--sbom", "--sign-key", str(keys["ours"]))
        assert out["sbom"]["mode"] == "referrers-tag" and out["signature"]["signatures"] == 1
        login = ["--registry-username", "alice", "--registry-password", "pw1"]
        ok = verify(ref, keys["ours.pub"], *login)
        assert ok.returncode == 0, ok.stderr
        found = tool("oras", "discover", "--plain-http", "-u", "alice", "-p", "pw1",
                     "--format", "json", ref, cwd=tmp_path)  # fmt: skip
        assert found.returncode == 0, found.stderr
        assert [m["artifactType"] for m in json.loads(found.stdout)["manifests"]] == [SPDX]
        sign = ["sign", f"docker://{ref}", "--key", str(keys["ours"]), "--tls-verify=false"]
        denied = run(*sign, "--creds", "alice:wrong", ok=False, env={"COSIGN_PASSWORD": PASSWORD})
        assert denied.returncode == 1 and "error:" in denied.stderr, denied.stderr
        assert "alice" in denied.stderr or "unauthorized" in denied.stderr.lower(), denied.stderr
