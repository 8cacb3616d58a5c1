"""The image's platform: parsed from --platform, or read from the roots' derivations in
the real local store (an x86_64-linux and a real aarch64-linux build of one recipe)."""

from __future__ import annotations

import json

import pytest

from nixtools import build_multiarch
from stowaway.image.config import ImageOptions, build_config
from stowaway.image.platform import (
    NIX_SYSTEMS,
    Platform,
    PlatformError,
    closure_platform,
    host_platform,
    parse_platform,
    platform_of_system,
    with_platform,
)
from stowaway.store.local import LocalStore


@pytest.fixture(scope="module")
def apps(have_nix: None) -> dict[str, str]:
    return {s: build_multiarch(s) for s in ("x86_64-linux", "aarch64-linux")}


def test_parse_platform_normalises_and_rejects() -> None:
    assert parse_platform("linux/amd64") == Platform("linux", "amd64")
    assert parse_platform("linux/x86_64") == Platform("linux", "amd64")
    assert parse_platform("Linux/AArch64") == Platform("linux", "arm64")
    assert parse_platform("linux/arm/v7") == Platform("linux", "arm", "v7")
    assert str(parse_platform("linux/arm/v7")) == "linux/arm/v7"
    for bad in ("linux", "linux/", "/amd64", "linux/amd64/v1/x", "linux/am d64", "a/b\n"):
        with pytest.raises(PlatformError, match="is not a platform") as e:
            parse_platform(bad)
        assert e.value.hint and "OS/ARCH" in e.value.hint


def test_systems_table() -> None:
    assert platform_of_system("aarch64-linux") == Platform("linux", "arm64")
    assert platform_of_system("armv7l-linux") == Platform("linux", "arm", "v7")
    assert platform_of_system("x86_64-darwin") is None
    assert all(s.endswith("-linux") and p.os == "linux" for s, p in NIX_SYSTEMS.items())
    assert Platform("linux", "arm").matches(Platform("linux", "arm", "v7"))
    assert not Platform("linux", "arm", "v6").matches(Platform("linux", "arm", "v7"))


def test_config_carries_the_platform() -> None:
    options = with_platform(ImageOptions(), Platform("linux", "arm", "v7"))
    doc = json.loads(build_config(options, [], [], "oci"))
    assert (doc["os"], doc["architecture"], doc["variant"]) == ("linux", "arm", "v7")
    doc = json.loads(build_config(with_platform(options, host_platform()), [], [], "oci"))
    assert "variant" not in doc


def test_platform_read_from_derivations(local_store: LocalStore, apps: dict[str, str]) -> None:
    arm, amd = apps["aarch64-linux"], apps["x86_64-linux"]
    clo = local_store.closure_infos([arm, amd])
    got = closure_platform(local_store, [arm], clo)
    assert (got.platform, got.origin) == (Platform("linux", "arm64"), "derivations")
    assert got.systems == {arm: "aarch64-linux"}
    assert closure_platform(local_store, [amd], clo).platform == Platform("linux", "amd64")
    with pytest.raises(PlatformError, match="built for different platforms") as e:
        closure_platform(local_store, [arm, amd], clo)
    assert e.value.hint and "--platform" in e.value.hint
    said = closure_platform(local_store, [arm, amd], clo, explicit=Platform("linux", "s390x"))
    assert (said.platform, said.origin) == (Platform("linux", "s390x"), "flag")
    with pytest.raises(PlatformError, match="was built for linux/arm64"):
        closure_platform(
            local_store, [arm], clo, explicit=Platform("linux", "amd64"), check_explicit=True
        )


def test_no_readable_deriver_means_this_machine(
    local_store: LocalStore, apps: dict[str, str]
) -> None:
    arm = apps["aarch64-linux"]
    clo = local_store.closure_infos([arm])
    source = next(p for p in clo if p != arm)  # the busybox: a builtins.path source
    assert clo[source].deriver is None
    got = closure_platform(local_store, [source], clo)
    assert (got.platform, got.origin, dict(got.systems)) == (host_platform(), "host", {})
