"""Name semantics (pure): Nixery-style package names, store/<hash>, tags, versions."""

from __future__ import annotations

import pytest

from stowaway.distribution.errors import RegistryApiError
from stowaway.registry.names import (
    expand_packages,
    parse_image_name,
    resolve_packages,
    select_package_set,
)
from stowaway.registry.package_index import (
    Package,
    PackageIndexError,
    build_index,
    compare_versions,
    package_name,
    parse_index,
    split_name,
)

H1 = "0" * 32
H2 = "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"


def test_package_names_are_sorted_and_deduplicated() -> None:
    assert parse_image_name("shell/htop/git").packages == ("git", "htop", "shell")
    assert parse_image_name("git/htop/git") == parse_image_name("htop/git")
    assert not parse_image_name("git").is_store


def test_store_names_take_hash_parts() -> None:
    name = parse_image_name(f"store/{H2}/{H1}/{H2}")
    assert name.is_store and name.store_hashes == (H1, H2)
    for bad in ("store", f"store/{H1[:-1]}", "store/" + "e" * 32, f"store/{H1}x"):
        with pytest.raises(RegistryApiError) as err:
            parse_image_name(bad)
        assert err.value.code == "NAME_INVALID"
    with pytest.raises(RegistryApiError, match="0-9a-z without|0123456789abcdfg"):
        parse_image_name("store/" + "t" * 32)


def test_meta_packages_expand_and_always_is_added() -> None:
    meta = {"shell": ["bashInteractive", "coreutils"]}
    got = expand_packages(["shell", "git"], meta, ["cacert"])
    assert got == ("bashInteractive", "cacert", "coreutils", "git")
    assert expand_packages(["git", "git"], {}, []) == ("git",)


def test_unknown_packages_are_all_named() -> None:
    known = {"git": "/nix/store/x"}
    assert resolve_packages(["git"], known.get, "git:latest") == {"git": "/nix/store/x"}
    with pytest.raises(RegistryApiError) as err:
        resolve_packages(["nope", "git", "zilch"], known.get, "nope/git:latest")
    assert err.value.status == 404 and err.value.code == "MANIFEST_UNKNOWN"
    assert "unknown packages: nope, zilch" in err.value.errors[0][1]


def test_tags_select_package_sets() -> None:
    sets = {"latest": 1, "stable": 2}
    assert select_package_set("stable", sets, "git") == 2
    with pytest.raises(RegistryApiError) as err:
        select_package_set("old", sets, "git")
    assert err.value.code == "MANIFEST_UNKNOWN"
    assert "'old'" in err.value.errors[0][1] and "latest, stable" in err.value.errors[0][1]


def test_lowercase_aliases() -> None:
    p = "/nix/store/" + H1 + "-x"
    index = build_index(
        {
            "bashInteractive": Package(p),
            "python3Packages.requests": Package(p),
            "Foo": Package(p),
            "FOO": Package(p),  # ambiguous: no alias
            "Bar": Package(p),
            "bar": Package(p + "y"),  # a real key wins over an alias
        }
    )
    assert index.lookup("bashinteractive") == p
    assert index.lookup("python3packages.requests") == p
    assert index.lookup("foo") is None and index.lookup("FOO") == p
    assert index.lookup("bar") == p + "y"
    assert index.lookup("bashInteractive") == p


def test_index_parse_errors_say_where() -> None:
    with pytest.raises(PackageIndexError, match=r"idx.json: packages\['git'\].path"):
        parse_index(b'{"packages": {"git": {"path": "/usr/bin/git"}}}', "idx.json")
    with pytest.raises(PackageIndexError, match="idx.json: not JSON"):
        parse_index(b"{", "idx.json")
    with pytest.raises(PackageIndexError, match="alias 'x' points at 'y'"):
        parse_index(b'{"packages": {}, "aliases": {"x": "y"}}', "idx.json")


def test_index_json_is_deterministic() -> None:
    p = "/nix/store/" + H1 + "-x"
    a = build_index({"b": Package(p), "a": Package(p, {"version": "1"})})
    b = build_index({"a": Package(p, {"version": "1"}), "b": Package(p)})
    assert a.to_json() == b.to_json()
    assert parse_index(a.to_json(), "t") == a


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("hello-2.12", ("hello", "2.12")),
        ("greeting-data", ("greeting-data", "")),
        ("python3-3.11.4", ("python3", "3.11.4")),
        ("stowaway-demo-app", ("stowaway-demo-app", "")),
        ("foo-bar-1.0-rc1", ("foo-bar", "1.0-rc1")),
    ],
)
def test_split_name(name: str, expected: tuple[str, str]) -> None:
    assert split_name(name) == expected


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        ("1.0", "1.0", 0),
        ("1.0", "1.2", -1),
        ("1.10", "1.9", 1),
        ("2.3a", "2.3.1", -1),
        ("1.0pre", "1.0", -1),
        ("1.0", "1.0.1", -1),
        ("2.0", "10.0", -1),
        ("1.2-man", "1.2", 1),
    ],
)
def test_compare_versions(a: str, b: str, order: int) -> None:
    assert compare_versions(a, b) == order
    assert compare_versions(b, a) == -order


def test_package_name_of_store_paths() -> None:
    assert package_name(f"/nix/store/{H1}-hello-2.12") == ("hello", "2.12")
    assert package_name(f"/nix/store/{H1}-hello-2.12-man") == ("hello.man", "2.12")
    assert package_name(f"/nix/store/{H1}-greeting-data") == ("greeting-data", "")
