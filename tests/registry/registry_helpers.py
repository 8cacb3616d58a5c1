"""What several registry test modules share (a test module never imports another):
media types, blobs and manifests pushed over the harness, skopeo, OCI layouts on disk,
and the demo package index."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from registry_harness import Server

from stowaway.registry.package_index import Package, build_index, write_index

OCI = "application/vnd.oci.image.manifest.v1+json"
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stored_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


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
