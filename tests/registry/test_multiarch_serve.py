"""`serve` with `[nix] systems`: one name, one image per Nix system, answered as an image
index from a package set per system; real x86_64-linux and aarch64-linux closures (the
latter built under qemu, see scripts/setup.sh) and skopeo picking its platform."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from registry_helpers import DOCKER, OCI, MakeNix, skopeo, write_demo_index

from nixtools import build_multiarch
from stowaway.registry.config import RegistryConfigError, nix_options_from_dict

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
SYSTEMS = ("x86_64-linux", "aarch64-linux")


@pytest.fixture(scope="module")
def apps(have_nix: None) -> dict[str, str]:
    return {s: build_multiarch(s) for s in SYSTEMS}


@pytest.fixture()
def indexes(tmp_path: Path, apps: dict[str, str]) -> Path:
    for system, app in apps.items():
        (tmp_path / system).mkdir()
        write_demo_index(tmp_path / system / "index.json", {"hello": app})
    return tmp_path / "{system}" / "index.json"


def test_a_name_is_an_index_of_one_image_per_system(make_nix: MakeNix, indexes: Path) -> None:
    server, resolver = make_nix(index=indexes, systems=SYSTEMS)
    accept = {"Accept": f"{OCI_INDEX}, {OCI}"}
    r = server.request("GET", "/v2/hello/manifests/latest", headers=accept)
    assert r.status == 200, r.body
    assert r.headers["Content-Type"] == OCI_INDEX
    index = json.loads(r.body)
    platforms = [(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]]
    assert platforms == [("linux", "amd64"), ("linux", "arm64")]
    for entry in index["manifests"]:  # each platform's manifest and config are served
        m = server.request("GET", f"/v2/hello/manifests/{entry['digest']}", headers=accept)
        assert m.status == 200 and m.headers["Content-Type"] == OCI
        config = json.loads(
            server.request("GET", f"/v2/hello/blobs/{json.loads(m.body)['config']['digest']}").body
        )
        assert config["architecture"] == entry["platform"]["architecture"]
    again = server.request("GET", "/v2/hello/manifests/latest", headers=accept)
    assert again.body == r.body and resolver.composes == 2  # cached, same bytes
    # Docker clients get a manifest list of Docker manifests
    r = server.request("GET", "/v2/hello/manifests/latest", headers={"Accept": DOCKER_LIST})
    assert r.status == 200 and r.headers["Content-Type"] == DOCKER_LIST
    assert {m["mediaType"] for m in json.loads(r.body)["manifests"]} == {DOCKER}
    # a client that takes no index gets the first system's image
    r = server.request("GET", "/v2/hello/manifests/latest", headers={"Accept": OCI})
    assert r.status == 200 and r.headers["Content-Type"] == OCI
    first = json.loads(r.body)
    config = server.request("GET", f"/v2/hello/blobs/{first['config']['digest']}").body
    assert json.loads(config)["architecture"] == "amd64"
    for arch in ("arm64", "amd64"):
        ref = f"docker://{server.host}/hello:latest"
        out = json.loads(skopeo("--override-arch", arch, "inspect", "--tls-verify=false", ref))
        assert out["Architecture"] == arch


def test_store_names_are_labelled_from_their_derivation(
    make_nix: MakeNix, indexes: Path, apps: dict[str, str]
) -> None:
    server, _ = make_nix(index=indexes, systems=SYSTEMS)
    name = "store/" + apps["aarch64-linux"].rsplit("/", 1)[1][:32]
    r = server.request("GET", f"/v2/{name}/manifests/latest", headers={"Accept": OCI})
    assert r.status == 200, r.body
    config = server.request("GET", f"/v2/{name}/blobs/{json.loads(r.body)['config']['digest']}")
    assert json.loads(config.body)["architecture"] == "arm64"


def test_systems_config_is_checked() -> None:
    ok = nix_options_from_dict({"systems": list(SYSTEMS), "index": "/x/{system}.json"}, "c")
    assert ok.systems == SYSTEMS
    for doc, match in (
        ({"systems": ["x86_64-darwin"]}, "is not one of"),
        ({"systems": ["x86_64-linux", "x86_64-linux"]}, "twice"),
        ({"systems": list(SYSTEMS), "index": "/x/index.json"}, "must hold {system}"),
        ({"systems": list(SYSTEMS), "nix_build": True}, "nix_build"),
    ):
        with pytest.raises(RegistryConfigError, match=match):
            nix_options_from_dict(doc, "c")
