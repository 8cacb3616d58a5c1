from __future__ import annotations

import pytest

from stowaway.errors import InvalidStorePath
from stowaway.store.paths import StorePath, parse_basename, parse_store_path

H = "55y7j4qz5f8ym71x3ca289zjw7k1bada"


def test_parse_full_path() -> None:
    sp = parse_store_path(f"/nix/store/{H}-busybox-1.36")
    assert sp == StorePath(H, "busybox-1.36", "/nix/store")
    assert sp.path == f"/nix/store/{H}-busybox-1.36"
    assert sp.basename == f"{H}-busybox-1.36"


def test_sub_path_only_when_not_strict() -> None:
    with pytest.raises(InvalidStorePath, match="below a store path"):
        parse_store_path(f"/nix/store/{H}-busybox/bin/sh")
    assert parse_store_path(f"/nix/store/{H}-busybox/bin/sh", strict=False).name == "busybox"


def test_other_store_dir() -> None:
    sp = parse_store_path(f"/mnt/san/nix/store/{H}-x", "/mnt/san/nix/store/")
    assert sp.path == f"/mnt/san/nix/store/{H}-x"
    with pytest.raises(InvalidStorePath, match="not inside the store directory /nix/store"):
        parse_store_path(f"/mnt/san/nix/store/{H}-x")


@pytest.mark.parametrize(
    "basename,rule",
    [
        (f"{H[:-1]}e-x", "hash part"),  # 'e' is not in the alphabet
        (f"{H.upper()}-x", "hash part"),
        (f"{H}x", "expected '<32-char hash>-<name>'"),
        (f"{H}-", "expected '<32-char hash>-<name>'"),
        (f"{H}-a%b", "contains '%'"),
        (f"{H}-a~b", "contains '~'"),
        (f"{H}-a/b", "contains '/'"),
        (f"{H}-.", "must not be"),
        (f"{H}-..", "must not be"),
        (f"{H}-.-x", "must not be"),
        (f"{H}-..-x", "must not be"),
        (f"{H}-" + "a" * 212, "212 characters"),
    ],
)
def test_invalid_basenames(basename: str, rule: str) -> None:
    with pytest.raises(InvalidStorePath, match=rule) as exc:
        parse_basename(basename)
    assert basename[:40] in str(exc.value)


def test_valid_edge_names() -> None:
    for name in ["a" * 211, "x+y-z._?=", ".x", "..x", "a.drv"]:
        assert parse_basename(f"{H}-{name}").name == name


def test_error_names_full_path() -> None:
    with pytest.raises(InvalidStorePath, match=f"/nix/store/{H}-a%b"):
        parse_store_path(f"/nix/store/{H}-a%b")
