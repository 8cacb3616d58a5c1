"""What several registry test modules share (a test module never imports another):
media types, blobs and manifests pushed over the harness, skopeo, OCI layouts on disk,
and the demo package index."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from registry_harness import Server

from stowaway.registry.nix_resolver import NixResolver
from stowaway.registry.package_index import Package, build_index, write_index
from stowaway.registry.s3 import S3Storage

OCI = "application/vnd.oci.image.manifest.v1+json"
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stored_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def stored(server: Server, sub: str = "") -> list[str]:
    """What ``server``'s storage holds below ``sub``, filesystem or S3 (same key layout)."""
    storage = server.storage
    if isinstance(storage, S3Storage):
        prefix = storage._key(sub) + "/" if storage._key(sub) else ""
        pages = storage._s3.get_paginator("list_objects_v2").paginate(
            Bucket=storage.bucket, Prefix=prefix
        )
        return sorted(o["Key"][len(prefix) :] for page in pages for o in page.get("Contents", []))
    return stored_files(Path(server.config.storage) / sub)


def push_blob(server: Server, name: str, data: bytes) -> str:
    d = digest(data)
    r = server.request("POST", f"/v2/{name}/blobs/uploads/?digest={d}", data)
    assert r.status == 201, r.body
    return d


def image_manifest(server: Server, name: str, media_type: str = OCI) -> bytes:
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    layer = b"layer bytes " * 100
    cd, ld = push_blob(server, name, config), push_blob(server, name, layer)
    config_type = "application/vnd.oci.image.config.v1+json"
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": config_type, "digest": cd, "size": len(config)},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": 1200}
            ],
        }
    ).encode()


def skopeo(*args: str) -> str:
    out = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed: {out.stderr}")
    return out.stdout


def layout_manifest(layout: Path, tag: str = "t") -> dict[str, object]:
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )
    data = (layout / "blobs" / "sha256" / desc["digest"].removeprefix("sha256:")).read_bytes()
    return {"digest": desc["digest"], "manifest": json.loads(data)}


def demo_packages(demo_closure: list[str]) -> dict[str, str]:
    """demo → the app, busybox, greeting → greeting-data (from the real closure)."""
    by_name = {p.split("-", 1)[1]: p for p in demo_closure}
    return {
        "demo": by_name["stowaway-demo-app"],
        "busybox": by_name["busybox"],
        "greeting": by_name["greeting-data"],
    }


def write_demo_index(path: Path, packages: dict[str, str]) -> Path:
    write_index(path, build_index({k: Package(v) for k, v in packages.items()}))
    return path


def hash_of(path: str) -> str:
    return path.rsplit("/", 1)[1][:32]


def check_blobs_are_scoped(server: Server, replica: Server) -> None:
    """A blob is served only under names it was pushed or mounted to, or that a
    manifest references it from; the links are in storage (``replica`` shares it)."""
    secret = push_blob(server, "team/a", b"team a's layer")
    for method in ("GET", "HEAD"):
        assert server.request(method, f"/v2/team/a/blobs/{secret}").status == 200
        r = server.request(method, f"/v2/other/blobs/{secret}")
        assert r.status == 404, (method, r.status)
    assert server.request("GET", f"/v2/other/blobs/{secret}").code == "BLOB_UNKNOWN"
    # a mount from a repository that does not hold the blob is an upload session
    r = server.request("POST", f"/v2/other/blobs/uploads/?mount={secret}&from=elsewhere")
    assert r.status == 202 and "Docker-Upload-UUID" in r.headers
    r = server.request("POST", f"/v2/other/blobs/uploads/?mount={secret}")  # no from=
    assert r.status == 202
    assert server.request("GET", f"/v2/other/blobs/{secret}").status == 404
    # nor can a manifest reach it by digest
    body = json.loads(image_manifest(server, "other"))
    body["layers"][0].update(digest=secret, size=len(b"team a's layer"))
    r = server.request(
        "PUT", "/v2/other/manifests/x", json.dumps(body).encode(), {"Content-Type": OCI}
    )
    assert r.status == 400 and r.code == "MANIFEST_BLOB_UNKNOWN" and "other" in r.body.decode()
    # mounted from where it is visible: then it is visible here too, and stays stored once
    r = server.request("POST", f"/v2/team/b/blobs/uploads/?mount={secret}&from=team/a")
    assert r.status == 201 and r.headers["Location"] == f"/v2/team/b/blobs/{secret}"
    assert server.request("GET", f"/v2/team/b/blobs/{secret}").body == b"team a's layer"
    # a manifest's blobs are visible under its name, on every replica
    manifest = image_manifest(server, "app")
    r = server.request("PUT", "/v2/app/manifests/v1", manifest, {"Content-Type": OCI})
    assert r.status == 201, r.body
    for d in [json.loads(manifest)["config"]["digest"], secret]:
        assert (
            replica.request("HEAD", f"/v2/{'app' if d != secret else 'team/b'}/blobs/{d}").status
            == 200
        )
        assert replica.request("HEAD", f"/v2/nobody/blobs/{d}").status == 404


INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"


def artifact(server: Server, name: str, subject: str, **fields: object) -> bytes:
    """An OCI 1.1 artifact manifest (empty config, no layers) referring to ``subject``."""
    config = {"mediaType": EMPTY, "digest": push_blob(server, name, b"{}"), "size": 2}
    doc = {"schemaVersion": 2, "mediaType": OCI, "config": config, "layers": []}
    doc["subject"] = {"mediaType": OCI, "digest": subject, "size": 123}
    return json.dumps({**doc, **fields}).encode()


def check_referrers(server: Server, replica: Server) -> None:
    """OCI 1.1 referrers: listed per repository and subject (which need not exist),
    filtered by artifactType, unlisted when deleted; kept in storage (``replica``)."""
    subject = digest(b"an image pushed later, or never")
    sbom = artifact(server, "app", subject, artifactType="application/spdx+json",
                    annotations={"org.example.kind": "sbom"})  # fmt: skip
    sig = json.loads(artifact(server, "app", subject))
    sig["config"]["mediaType"] = "application/vnd.example.sig"
    sig_body = json.dumps(sig).encode()
    for body in (sbom, sig_body):
        r = server.request("PUT", f"/v2/app/manifests/{digest(body)}", body, {"Content-Type": OCI})
        assert r.status == 201 and r.headers["OCI-Subject"] == subject, r.body
    plain = image_manifest(server, "app")
    r = server.request("PUT", "/v2/app/manifests/v1", plain, {"Content-Type": OCI})
    assert r.status == 201 and "OCI-Subject" not in r.headers
    r = replica.request("GET", f"/v2/app/referrers/{subject}")
    assert r.status == 200 and r.headers["Content-Type"] == INDEX
    assert "OCI-Filters-Applied" not in r.headers
    index = json.loads(r.body)
    assert index["schemaVersion"] == 2 and index["mediaType"] == INDEX
    expected = {
        digest(sbom): {"mediaType": OCI, "digest": digest(sbom), "size": len(sbom),
                       "artifactType": "application/spdx+json",
                       "annotations": {"org.example.kind": "sbom"}},
        digest(sig_body): {"mediaType": OCI, "digest": digest(sig_body), "size": len(sig_body),
                           "artifactType": "application/vnd.example.sig"},
    }  # fmt: skip
    assert {d["digest"]: d for d in index["manifests"]} == expected
    r = server.request("GET", f"/v2/app/referrers/{subject}?artifactType=application/spdx%2Bjson")
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    assert json.loads(r.body)["manifests"] == [expected[digest(sbom)]]
    for path in (f"/v2/other/referrers/{subject}", f"/v2/app/referrers/{digest(plain)}"):
        r = server.request("GET", path)
        assert r.status == 200 and json.loads(r.body)["manifests"] == [], path
    assert server.request("GET", "/v2/app/referrers/sha256:nope").code == "DIGEST_INVALID"
    assert server.request("DELETE", f"/v2/app/manifests/{digest(sbom)}").status == 202
    r = replica.request("GET", f"/v2/app/referrers/{subject}")
    assert json.loads(r.body)["manifests"] == [expected[digest(sig_body)]]
    bad = json.loads(sbom) | {"subject": {"digest": "sha256:x"}}
    r = server.request(
        "PUT", "/v2/app/manifests/bad", json.dumps(bad).encode(), {"Content-Type": OCI}
    )
    assert r.status == 400 and r.code == "MANIFEST_INVALID" and "subject" in r.body.decode()


#: ``make_nix(storage=None, **nix_options)`` → a server and its NixResolver (conftest).
MakeNix = Callable[..., tuple[Server, NixResolver]]
