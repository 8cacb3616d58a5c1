"""SBOMs of a real closure: names split as Nix splits them, checksums that are the
store paths' NAR hashes (checked with `nix-store --dump`), references as DEPENDS_ON,
the top paths described, and the same bytes for the same closure."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from stowaway.image.sbom import SbomError, parse_name, sbom_document, top_paths
from stowaway.store.local import LocalStore
from stowaway.store.model import PathInfo
from stowaway.store.sources import closure

NAMES = [
    "hello-2.12.1", "stowaway-demo-app", "glibc-2.37-8", "foo-_bar", "a-1b", "x-.y",
    "python3.11-requests-2.31.0", "busybox", "gcc-wrapper-12.2.0", "perl5.36.0-Try-Tiny-0.31",
]  # fmt: skip


def test_names_split_like_nix_parse_drv_name(have_nix: None) -> None:
    expr = "map builtins.parseDrvName [" + " ".join(json.dumps(n) for n in NAMES) + "]"
    out = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "-E", expr],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    nix = [(d["name"], d["version"]) for d in json.loads(out.stdout)]
    assert [parse_name(n) for n in NAMES] == nix


@pytest.fixture(scope="module")
def demo_infos(local_store: LocalStore, demo_app: str) -> dict[str, PathInfo]:
    return closure(local_store, [demo_app])


def test_spdx_describes_the_closure_with_nar_hashes(
    demo_infos: dict[str, PathInfo], demo_app: str
) -> None:
    doc = json.loads(sbom_document(demo_infos, [demo_app], name="demo", created=1700000000))
    assert doc["spdxVersion"] == "SPDX-2.3" and doc["dataLicense"] == "CC0-1.0"
    assert doc["SPDXID"] == "SPDXRef-DOCUMENT" and doc["name"] == "demo"
    assert doc["creationInfo"]["created"] == "2023-11-14T22:13:20Z"
    packages = {p["packageFileName"]: p for p in doc["packages"]}
    assert set(packages) == set(demo_infos)
    for path, p in packages.items():
        nar = subprocess.run(["nix-store", "--dump", path], capture_output=True, check=True)
        assert p["checksums"] == [
            {"algorithm": "SHA256", "checksumValue": hashlib.sha256(nar.stdout).hexdigest()}
        ]
        name, version = parse_name(path.split("-", 1)[1])
        assert p["name"] == name and p.get("versionInfo", "") == version
        assert p["filesAnalyzed"] is False and p["downloadLocation"] == "NOASSERTION"
        deriver = demo_infos[path].deriver
        if deriver:
            assert p["annotations"][0]["comment"] == f"nix deriver: {deriver}"
    ids = {p["SPDXID"]: path for path, p in packages.items()}
    rels = {(r["spdxElementId"], r["relationshipType"], r["relatedSpdxElement"])
            for r in doc["relationships"]}  # fmt: skip
    described = {ids[b] for a, kind, b in rels if kind == "DESCRIBES"}
    assert described == {demo_app}
    depends = {(ids[a], ids[b]) for a, kind, b in rels if kind == "DEPENDS_ON"}
    assert depends == {(p, r) for p, info in demo_infos.items() for r in info.references if r != p}
    assert depends  # the demo app has references


def test_same_closure_same_bytes_and_namespace_follows_content(
    demo_infos: dict[str, PathInfo], demo_app: str
) -> None:
    one = sbom_document(demo_infos, [demo_app], name="demo", created=1)
    reordered = dict(reversed(list(demo_infos.items())))
    assert sbom_document(reordered, [demo_app], name="demo", created=1) == one
    later = sbom_document(demo_infos, [demo_app], name="demo", created=2)
    ns = [json.loads(d)["documentNamespace"] for d in (one, later)]
    assert ns[0] != ns[1] and all(n.startswith("https://spdx.org/spdxdocs/demo-") for n in ns)
    cdx = [sbom_document(demo_infos, [demo_app], name="demo", created=1, fmt="cyclonedx")] * 2
    assert json.loads(cdx[0])["serialNumber"].startswith("urn:uuid:")


def test_cyclonedx_lists_components_hashes_and_dependencies(
    demo_infos: dict[str, PathInfo], demo_app: str
) -> None:
    doc = json.loads(sbom_document(demo_infos, [demo_app], name="demo", created=1, fmt="cyclonedx"))
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.5"
    assert doc["metadata"]["component"]["type"] == "container"
    refs = {c["bom-ref"]: c for c in doc["components"]}
    assert set(refs) == set(demo_infos)
    for c in refs.values():
        assert c["hashes"][0]["alg"] == "SHA-256" and len(c["hashes"][0]["content"]) == 64
    deps = {d["ref"]: d["dependsOn"] for d in doc["dependencies"]}
    assert deps["image:demo"] == [demo_app]
    assert all(set(deps[p]) == set(demo_infos[p].references) - {p} for p in demo_infos)


def test_top_paths_are_the_unreferenced_ones(
    demo_infos: dict[str, PathInfo], demo_app: str
) -> None:
    assert top_paths(demo_infos) == [demo_app]


@pytest.mark.parametrize(
    ("nar_hash", "why"),
    [("md5:abc", "is not sha256"), ("sha256:zzzz", "malformed"), ("sha256:" + "00" * 16, "32")],
)
def test_a_malformed_nar_hash_is_named(nar_hash: str, why: str) -> None:
    path = "/nix/store/" + "a" * 32 + "-x-1"
    with pytest.raises(SbomError) as e:
        sbom_document({path: PathInfo(path, nar_hash, 1)}, [path], name="x", created=1)
    assert path in str(e.value) and why in str(e.value)
