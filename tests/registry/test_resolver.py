"""The on-demand hook: a resolver producing manifests from real files."""

from __future__ import annotations

import asyncio
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from registry_harness import Server

from stowaway.distribution.errors import ErrorCode, RegistryApiError
from stowaway.registry import verified
from stowaway.registry.resolver import ResolvedManifest

OCI = "application/vnd.oci.image.manifest.v1+json"
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FileResolver:
    """Composes a one-layer image per name from files on disk, slowly, counting calls."""

    def __init__(self, workdir: Path, rewrite: bool = True, seconds: float = 0.2) -> None:
        self.workdir = workdir
        self.rewrite = rewrite  # False: files written once, like a layer cache's
        self.seconds = seconds  # how long "composing" takes
        self.calls = 0

    async def resolve(
        self, name: str, reference: str, accept: frozenset[str]
    ) -> ResolvedManifest | None:
        self.calls += 1
        if name.startswith("unknown"):
            raise RegistryApiError.of(ErrorCode.MANIFEST_UNKNOWN, f"unknown packages: {name}")
        if reference != "latest":
            return None
        await asyncio.sleep(self.seconds)  # "composing"
        media_type = OCI if not accept or OCI in accept else DOCKER
        layer = self.workdir / f"layer-{name.replace('/', '_')}"
        config = self.workdir / "config"
        if self.rewrite or not layer.exists():
            layer.write_bytes(f"layer of {name}".encode() * 1000)
            config.write_bytes(b'{"os":"linux"}')
        blobs = {digest(p.read_bytes()): p for p in (layer, config)}
        manifest = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": "x", "digest": digest(config.read_bytes()), "size": 14},
            "layers": [{"mediaType": "y", "digest": digest(layer.read_bytes()), "size": 0}],
        }
        return ResolvedManifest(json.dumps(manifest).encode(), media_type, blobs)


def test_hundred_concurrent_first_pulls_compose_once(make_server: object, tmp_path: Path) -> None:
    # composing outlasts the arrival of all hundred requests even on a loaded machine
    resolver = FileResolver(tmp_path, seconds=2.0)
    server: Server = make_server(resolver=resolver)  # type: ignore[operator]
    with ThreadPoolExecutor(100) as pool:
        replies = list(
            pool.map(lambda _: server.request("GET", "/v2/shell/git/manifests/latest"), range(100))
        )
    assert {r.status for r in replies} == {200}
    assert len({r.body for r in replies}) == 1
    assert resolver.calls == 1
    manifest = json.loads(replies[0].body)
    assert replies[0].headers["Content-Type"] == OCI
    md = replies[0].headers["Docker-Content-Digest"]
    assert md == digest(replies[0].body)
    # blobs were ingested into storage and are served; the manifest by digest too
    layer = manifest["layers"][0]["digest"]
    r = server.request("GET", f"/v2/shell/git/blobs/{layer}")
    assert r.status == 200 and r.body == b"layer of shell/git" * 1000
    assert server.request("GET", f"/v2/shell/git/manifests/{md}").status == 200
    # composed for shell/git: not served under a name that never composed it
    assert server.request("GET", f"/v2/shell/htop/blobs/{layer}").code == "BLOB_UNKNOWN"
    assert "stowaway_registry_builds_total 1" in server.request("GET", "/metrics").body.decode()
    # tags of resolved names are not stored: the next pull asks the resolver again
    server.request("GET", "/v2/shell/git/manifests/latest")
    assert resolver.calls == 2


def test_resolver_answers_docker_only_clients_and_errors(
    make_server: object, tmp_path: Path
) -> None:
    resolver = FileResolver(tmp_path)
    server: Server = make_server(resolver=resolver)  # type: ignore[operator]
    r = server.request("GET", "/v2/htop/manifests/latest", headers={"Accept": DOCKER})
    assert r.status == 200 and r.headers["Content-Type"] == DOCKER
    r = server.request("GET", "/v2/unknown/pkg/manifests/latest")
    assert r.status == 404 and r.code == "MANIFEST_UNKNOWN"
    assert "unknown packages: unknown/pkg" in r.body.decode()
    r = server.request("GET", "/v2/htop/manifests/other")
    assert r.status == 404 and r.code == "MANIFEST_UNKNOWN"


def test_damaged_storage_copy_is_stored_again_on_the_next_pull(
    make_server: object, tmp_path: Path
) -> None:
    """Storage apart from the resolver's files: a damaged storage copy is dropped
    when served, and the next pull of the image copies it in again."""
    server: Server = make_server(resolver=FileResolver(tmp_path))  # type: ignore[operator]
    r = server.request("GET", "/v2/app/manifests/latest")
    layer = json.loads(r.body)["layers"][0]["digest"]
    assert server.request("GET", f"/v2/app/blobs/{layer}").status == 200
    path = Path(server.config.storage) / "blobs/sha256" / layer.removeprefix("sha256:")
    good = path.read_bytes()
    path.write_bytes(good[:-1] + b"!")  # same size
    r = server.request("GET", f"/v2/app/blobs/{layer}")
    assert r.status == 404 and r.code == "BLOB_UNKNOWN" and not path.exists()
    assert server.request("GET", "/v2/app/manifests/latest").status == 200
    r = server.request("GET", f"/v2/app/blobs/{layer}")
    assert r.status == 200 and r.body == good


def test_resolver_file_and_storage_copy_are_hashed_once(
    make_server: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resolver's file and storage's copy of a blob are different files: each is
    remembered once verified, so a repeated pull hashes neither again."""
    hashed: list[Path] = []
    real_hash = verified._sha256_file

    def counting(path: Path) -> str:  # the real hash, noting which file it read
        hashed.append(path)
        return real_hash(path)

    monkeypatch.setattr(verified, "_sha256_file", counting)
    cache = tmp_path / "cache"
    cache.mkdir()
    server: Server = make_server(resolver=FileResolver(cache, rewrite=False))  # type: ignore[operator]
    for _ in range(3):
        r = server.request("GET", "/v2/app/manifests/latest")
        layer = json.loads(r.body)["layers"][0]["digest"]
        assert server.request("GET", f"/v2/app/blobs/{layer}").status == 200
    stored = Path(server.config.storage) / "blobs/sha256" / layer.removeprefix("sha256:")
    assert sorted(map(str, hashed)) == sorted(
        map(str, [cache / "config", cache / "layer-app", stored])
    )
