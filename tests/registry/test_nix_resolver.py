"""NixResolver behind the real server: images of the demo closure composed on
demand from the real local store, a signed binary cache, and nix-build."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from registry_harness import Server
from registry_helpers import DOCKER, OCI, MakeNix, demo_packages, hash_of, write_demo_index

from nixtools import SANDBOXED_MK
from s3_fixtures import CREDS
from stowaway.registry.config import RegistryConfig, S3Options, open_storage


def layer_members(server: Server, name: str, digest: str) -> dict[str, tarfile.TarInfo]:
    blob = server.request("GET", f"/v2/{name}/blobs/{digest}").body
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_packages_compose_into_an_image_served_from_the_layer_cache(
    make_nix: MakeNix,
    demo_index: Path,
    demo_closure: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, resolver = make_nix(index=demo_index, meta={"shell": ("busybox",)})
    caplog.set_level(logging.INFO)
    r = server.request("GET", "/v2/shell/demo/manifests/latest")
    assert r.status == 200, r.body
    assert r.headers["Content-Type"] == OCI
    manifest = json.loads(r.body)
    # the same packages in another order, or the meta-package spelled out: same image
    for name in ("demo/shell", "busybox/demo", "demo/busybox/shell"):
        again = server.request("GET", f"/v2/{name}/manifests/latest")
        assert again.status == 200 and again.body == r.body, name
    assert resolver.composes == 1
    config = json.loads(
        server.request("GET", f"/v2/shell/demo/blobs/{manifest['config']['digest']}").body
    )
    assert "PATH=/bin:/usr/bin:/sbin:/usr/sbin" in config["config"]["Env"]
    # packages are linked into /: /bin/demo and /bin/sh exist in the top layer
    top = layer_members(server, "shell/demo", manifest["layers"][-1]["digest"])
    paths = demo_packages(demo_closure)
    assert top["bin/demo"].linkname == paths["demo"] + "/bin/demo"
    assert top["bin/sh"].linkname == paths["busybox"] + "/bin/sh"
    # every store path of the closure is in some layer
    stored = set()
    for layer in manifest["layers"][:-1]:
        stored |= {
            m.split("/")[2]
            for m in layer_members(server, "shell/demo", layer["digest"])
            if m.startswith("nix/store/") and m.count("/") >= 2
        }
    assert stored == {p.rsplit("/", 1)[1] for p in demo_closure}
    # shared blobs: what the API serves is the cache's file itself, never a copy
    root = Path(server.config.storage)
    blobs = sorted(p.name for p in (root / "blobs" / "sha256").iterdir())
    wanted = {d["digest"].split(":")[1] for d in [manifest["config"], *manifest["layers"]]}
    assert wanted <= set(blobs)
    entries = [json.loads(p.read_text()) for p in (root / "layers").glob("*.json")]
    assert {e["digest"].split(":")[1] for e in entries} == wanted - {
        manifest["config"]["digest"].split(":")[1]
    }
    assert not [p for p in (root / "_uploads").iterdir()], "nothing was copied through uploads"
    # HEAD and by-digest pulls work too
    assert server.request("HEAD", "/v2/shell/demo/manifests/latest").status == 200
    digest = r.headers["Docker-Content-Digest"]
    assert server.request("GET", f"/v2/shell/demo/manifests/{digest}").body == r.body
    # layer-cache files are sent with sendfile, once (no error after the response)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_docker_only_clients_get_schema_2(make_nix: MakeNix, demo_index: Path) -> None:
    server, resolver = make_nix(index=demo_index, compression="zstd")
    r = server.request("GET", "/v2/demo/manifests/latest", headers={"Accept": DOCKER})
    assert r.status == 200 and r.headers["Content-Type"] == DOCKER
    manifest = json.loads(r.body)
    assert manifest["mediaType"] == DOCKER
    assert {d["mediaType"] for d in manifest["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }
    oci = server.request("GET", "/v2/demo/manifests/latest", headers={"Accept": f"{OCI}, {DOCKER}"})
    assert oci.headers["Content-Type"] == OCI
    assert {d["mediaType"] for d in json.loads(oci.body)["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    }
    assert resolver.composes == 2


def test_unknown_packages_and_tags(make_nix: MakeNix, demo_index: Path, tmp_path: Path) -> None:
    other = write_demo_index(tmp_path / "other.json", {})
    server, resolver = make_nix(index=demo_index, indexes={"stable": other})
    r = server.request("GET", "/v2/demo/nope/zilch/manifests/latest")
    assert r.status == 404 and r.code == "MANIFEST_UNKNOWN"
    assert "unknown packages: nope, zilch" in r.body.decode()
    r = server.request("GET", "/v2/demo/manifests/stable")
    assert r.status == 404 and "unknown package: demo" in r.body.decode()
    r = server.request("GET", "/v2/demo/manifests/v9")
    assert r.status == 404 and r.code == "MANIFEST_UNKNOWN"
    assert "'v9'" in r.body.decode() and "latest, stable" in r.body.decode()
    r = server.request("GET", "/v2/Demo/manifests/latest")
    assert r.status == 400 and r.code == "NAME_INVALID"
    assert resolver.composes == 0


def test_store_hash_names_share_the_manifest(
    make_nix: MakeNix, demo_index: Path, demo_closure: list[str]
) -> None:
    server, resolver = make_nix(index=demo_index)
    paths = demo_packages(demo_closure)
    by_name = server.request("GET", "/v2/demo/greeting/manifests/latest")
    hashes = "/".join(hash_of(paths[k]) for k in ("greeting", "demo"))
    by_hash = server.request("GET", f"/v2/store/{hashes}/manifests/latest")
    assert by_hash.status == 200 and by_hash.body == by_name.body
    assert resolver.composes == 1
    missing = "0" * 32
    r = server.request("GET", f"/v2/store/{missing}/manifests/latest")
    assert r.status == 404 and missing in r.body.decode()
    r = server.request("GET", f"/v2/store/{hash_of(paths['demo'])}/manifests/v1")
    assert r.status == 404 and "single tag latest" in r.body.decode()
    r = server.request("GET", "/v2/store/notahash/manifests/latest")
    assert r.status == 400 and r.code == "NAME_INVALID"


def test_changed_index_yields_the_new_image_without_restart(
    make_nix: MakeNix, demo_index: Path, demo_closure: list[str]
) -> None:
    server, resolver = make_nix(index=demo_index)
    first = server.request("GET", "/v2/demo/manifests/latest")
    paths = demo_packages(demo_closure)
    write_demo_index(demo_index, {"demo": paths["busybox"]})
    second = server.request("GET", "/v2/demo/manifests/latest")
    assert second.status == 200 and second.body != first.body
    layers = json.loads(second.body)["layers"]
    assert len(layers) == 2  # busybox alone + customisation
    assert resolver.composes == 2
    write_demo_index(demo_index, {"demo": paths["demo"]})
    assert server.request("GET", "/v2/demo/manifests/latest").body == first.body
    assert resolver.composes == 2  # cached per store-path set
    # a broken index is ignored: the last good one stays in use
    demo_index.write_text("{ broken")
    assert server.request("GET", "/v2/demo/manifests/latest").body == first.body


def test_hundred_concurrent_first_pulls_compose_once(make_nix: MakeNix, demo_index: Path) -> None:
    server, resolver = make_nix(index=demo_index, meta={"shell": ("busybox",)})
    names = ["demo/busybox", "busybox/demo", "shell/demo", "demo/shell", "busybox/demo/shell"]
    with ThreadPoolExecutor(100) as pool:
        replies = list(
            pool.map(
                lambda i: server.request("GET", f"/v2/{names[i % len(names)]}/manifests/latest"),
                range(100),
            )
        )
    assert {r.status for r in replies} == {200}
    assert len({r.body for r in replies}) == 1
    assert resolver.composes == 1
    root = Path(server.config.storage)
    # each layer was built once: the cache has one entry per layer
    layers = json.loads(replies[0].body)["layers"]
    assert len(list((root / "layers").glob("*.json"))) == len(layers)


def test_compose_from_a_signed_binary_cache_gives_the_same_image(
    make_nix: MakeNix,
    demo_index: Path,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    tmp_path: Path,
) -> None:
    local, _ = make_nix(index=demo_index)
    empty_store = tmp_path / "empty-store"
    empty_store.mkdir()
    remote, resolver = make_nix(
        index=demo_index,
        store=str(empty_store),
        substituters=(signed_caches["zstd"],),
        trusted_public_keys=(cache_keys["good"],),
    )
    want = local.request("GET", "/v2/demo/manifests/latest")
    got = remote.request("GET", "/v2/demo/manifests/latest")
    assert got.status == 200 and got.body == want.body  # reproducible from any source
    app = demo_packages(demo_closure)["demo"]
    r = remote.request("GET", f"/v2/store/{hash_of(app)}/manifests/latest")
    assert r.status == 200 and r.body == want.body
    untrusted, _ = make_nix(
        index=demo_index,
        store=str(empty_store),
        substituters=(signed_caches["zstd"],),
        trusted_public_keys=(cache_keys["other"],),
    )
    r = untrusted.request("GET", "/v2/demo/manifests/latest")
    assert r.status == 404 and "no valid signature" in r.body.decode()


def test_nix_build_resolves_names_missing_from_the_index(
    make_nix: MakeNix, demo_index: Path, tmp_path: Path
) -> None:
    expr = tmp_path / "pkgs.nix"
    stamp = str(time.time_ns())  # a fresh derivation, really built by nix-build
    expr.write_text(
        f"""let mk = name: {SANDBOXED_MK} name "mkdir -p $out/bin; echo {stamp} > $out/bin/tool";
in {{ tool = mk "tool-1.0"; }}
"""
    )
    server, resolver = make_nix(
        index=demo_index,
        nix_build=True,
        nix_expr=str(expr),
        nix_build_args=("--option", "substituters", ""),
    )
    r = server.request("GET", "/v2/demo/tool/manifests/latest")
    assert r.status == 200, r.body
    root_link = Path(server.config.storage) / "nix-roots" / "tool"
    target = os.readlink(root_link)
    assert target.startswith("/nix/store/") and target.endswith("-tool-1.0")
    assert Path(target, "bin/tool").read_text().strip() == stamp
    r = server.request("GET", "/v2/nosuchattr/manifests/latest")
    assert r.status == 404 and "unknown package: nosuchattr" in r.body.decode()


def test_landing_page_lists_package_sets_escaped(
    make_nix: MakeNix, demo_closure: list[str], tmp_path: Path
) -> None:
    packages = demo_packages(demo_closure)
    packages["<b>bold</b>"] = packages["demo"]
    index = write_demo_index(tmp_path / "i.json", packages)
    server, _ = make_nix(index=index, indexes={"stable": index})
    r = server.request("GET", "/", headers={"Host": "reg.example:5000"})
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    page = r.body.decode()
    # the default meta-package shell needs bashInteractive, coreutils, ...: not in this
    # index, so the page suggests a plain package name (one a client can pull), not shell/
    assert "docker pull reg.example:5000/busybox\n" in page
    assert "docker pull reg.example:5000/shell/" not in page
    assert "need all their members" in page
    assert "<code>:stable</code>" in page and "<code>:latest</code>" in page
    assert "<code>busybox</code>" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page


def test_s3_storage_serves_a_composed_image(
    make_nix: MakeNix,
    demo_index: Path,
    moto_endpoint: str,  # noqa: F811
    bucket: str,  # noqa: F811
) -> None:
    storage = open_storage(
        RegistryConfig(storage=f"s3://{bucket}/reg", s3=S3Options(endpoint=moto_endpoint, **CREDS))
    )
    server, resolver = make_nix(storage=storage, index=demo_index)
    r = server.request("GET", "/v2/demo/manifests/latest")
    assert r.status == 200, r.body
    manifest = json.loads(r.body)
    for d in [manifest["config"], *manifest["layers"]]:
        blob = server.request("GET", f"/v2/demo/blobs/{d['digest']}")
        assert blob.status == 200 and len(blob.body) == d["size"]
        assert server.storage.blob_path(d["digest"]) is None  # really from S3
    # a second server on the same bucket (a replica) serves the manifest by digest
    digest = r.headers["Docker-Content-Digest"]
    replica, _ = make_nix(storage=storage)
    assert replica.request("GET", f"/v2/demo/manifests/{digest}").body == r.body
    assert resolver.composes == 1


def test_damaged_cache_blob_is_dropped_and_composed_again(
    make_nix: MakeNix, demo_index: Path
) -> None:
    """The storage root is the layer cache, served in place: a damaged cache file
    must be caught before it is served, not on every client's layer check."""
    server, resolver = make_nix(index=demo_index)
    r = server.request("GET", "/v2/demo/manifests/latest")
    assert r.status == 200, r.body
    layer = json.loads(r.body)["layers"][0]["digest"]
    path = Path(server.config.storage) / "blobs/sha256" / layer.removeprefix("sha256:")
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))  # same size: a cache lookup cannot tell

    again = server.request("GET", "/v2/demo/manifests/latest")
    assert again.status == 200 and again.body == r.body  # reproducible: same image
    assert resolver.composes == 2, "the damaged layer was rebuilt"
    assert path.read_bytes() == good
    assert server.request("GET", f"/v2/demo/blobs/{layer}").body == good

    # damaged between the manifest and the blob request: never served either
    path.write_bytes(bytes(damaged))
    r = server.request("GET", f"/v2/demo/blobs/{layer}")
    assert r.status == 404 and r.code == "BLOB_UNKNOWN"
    assert not path.exists()
    assert server.request("GET", "/v2/demo/manifests/latest").status == 200
    assert resolver.composes == 3 and path.read_bytes() == good


def test_layer_base_packages_are_planned_apart_in_every_image_holding_them(
    make_nix: MakeNix, demo_index: Path, demo_closure: list[str]
) -> None:
    """``[nix] layer_base = ["shell"]``: an image holding all of shell's packages gets
    shell's closure planned on its own at the bottom, so "shell/demo" starts with the
    very layers of "shell". With two store layers and no base, each image groups its
    roots its own way, and "shell/demo" lacks some of "shell"'s layers."""
    paths = demo_packages(demo_closure)
    meta = {"shell": ("busybox", "greeting")}

    def store_layers(server: Server, name: str) -> list[str]:
        r = server.request("GET", f"/v2/{name}/manifests/latest")
        assert r.status == 200, r.body
        return [x["digest"] for x in json.loads(r.body)["layers"][:-1]]

    based, _ = make_nix(index=demo_index, meta=meta, max_layers=3, layer_base=("shell",))
    plain, _ = make_nix(index=demo_index, meta=meta, max_layers=3)
    shell, app = store_layers(based, "shell"), store_layers(based, "shell/demo")
    assert len(shell) == 1 and len(app) == 2
    assert app[0] == shell[0]
    members = layer_members(based, "shell", shell[0])
    assert {m.split("/")[2] for m in members if m.count("/") >= 2} == {
        paths["busybox"].rsplit("/", 1)[1],
        paths["greeting"].rsplit("/", 1)[1],
    }
    # a name without all of shell's packages has no base: demo alone is one plain plan
    assert store_layers(based, "busybox/demo") == store_layers(plain, "busybox/demo")
    assert not set(store_layers(plain, "shell")) <= set(store_layers(plain, "shell/demo"))
