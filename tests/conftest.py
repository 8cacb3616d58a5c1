"""Shared fixtures: real Nix closures built with the local nix from fixtures/*.nix."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixtools import FIXTURES, closure_of, nix_build, nix_copy
from stowaway.store.local import LocalStore

#: Fixture modules shared by several test directories.
pytest_plugins = ["s3_fixtures"]

COMPRESSIONS = ["xz", "zstd", "bzip2", "none"]


@pytest.fixture(scope="session", autouse=True)
def private_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests write nothing outside their temp dirs and read no one's settings: caches
    (stowaway's and nix's) and docker/containers credentials live in a private home, and
    nix never asks the (unreachable) default binary cache."""
    home = tmp_path_factory.mktemp("home")
    env = pytest.MonkeyPatch()
    env.setenv("XDG_CACHE_HOME", str(home / "cache"))
    env.setenv("XDG_CONFIG_HOME", str(home / "config"))
    env.setenv("DOCKER_CONFIG", str(home / "docker"))
    env.setenv("NIX_CONFIG", "substituters =\n" + os.environ.get("NIX_CONFIG", ""))
    try:
        yield
    finally:
        env.undo()


@pytest.fixture(scope="session")
def have_nix() -> None:
    if shutil.which("nix-build") is None:
        pytest.fail("nix-build not found: run `make setup` (installs nix-bin)")


@pytest.fixture(scope="session")
def demo_app(have_nix: None) -> str:
    """Store path of the demo app (closure: app, busybox, greeting-data)."""
    return nix_build(FIXTURES / "demo.nix")


@pytest.fixture(scope="session")
def local_store(have_nix: None) -> Iterator[LocalStore]:
    """The machine's Nix store, read through its database (closed at the end)."""
    with LocalStore() as store:
        yield store


@pytest.fixture(scope="session")
def demo_closure(demo_app: str) -> list[str]:
    return closure_of(demo_app)


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1")
    return tmp_path


@pytest.fixture(scope="session")
def cache_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two key pairs made by nix: 'good' signs the caches, 'other' signs nothing."""
    d = tmp_path_factory.mktemp("keys")
    keys = {}
    for name in ("good", "other"):
        subprocess.run(
            [
                "nix-store",
                "--generate-binary-cache-key",
                f"{name}-key-1",
                str(d / f"{name}.sk"),
                str(d / f"{name}.pk"),
            ],
            check=True,
        )
        keys[name] = (d / f"{name}.pk").read_text().strip()
        keys[name + ".sk"] = str(d / f"{name}.sk")
    return keys


@pytest.fixture(scope="session")
def signed_caches(
    tmp_path_factory: pytest.TempPathFactory, demo_closure: list[str], cache_keys: dict[str, str]
) -> dict[str, str]:
    """compression → URL of a cache holding the demo closure, signed with 'good'."""
    base = tmp_path_factory.mktemp("caches")
    return {
        c: nix_copy(base / c, [demo_closure[-1]], c, cache_keys["good.sk"]) for c in COMPRESSIONS
    }


@pytest.fixture()
def strict_umask() -> Iterator[None]:
    """A umask of 077 for the test: files meant for other users must not depend on it."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)
