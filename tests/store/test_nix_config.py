"""Nix's substituters and trusted-public-keys as stowaway reads them: asked of the real
nix, and read from the files when nix is not there (both must agree)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stowaway.store.nix_config import (
    DEFAULT_KEYS,
    DEFAULT_SUBSTITUTERS,
    nix_cache_settings,
    settings_from_files,
    settings_from_json,
)


def environment(tmp_path: Path, nix_config: str = "") -> dict[str, str]:
    """An environment whose nix reads only files under tmp_path (and NIX_CONFIG)."""
    etc, xdg_dirs, home = tmp_path / "etc", tmp_path / "xdg", tmp_path / "home"
    for d in (etc, xdg_dirs, home):
        d.mkdir(exist_ok=True)
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "NIX_CONF_DIR": str(etc),
        "XDG_CONFIG_DIRS": str(xdg_dirs),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "NIX_CONFIG": nix_config,
    }


def test_defaults_are_nixs(tmp_path: Path, have_nix: None) -> None:
    env = environment(tmp_path)
    asked = nix_cache_settings(env)
    assert asked.origin in ("nix config show", "nix show-config")
    assert (asked.substituters, asked.trusted_public_keys) == (DEFAULT_SUBSTITUTERS, DEFAULT_KEYS)
    read = settings_from_files(env)
    assert (read.substituters, read.trusted_public_keys) == (DEFAULT_SUBSTITUTERS, DEFAULT_KEYS)


def test_files_are_read_as_nix_reads_them(tmp_path: Path, have_nix: None) -> None:
    env = environment(tmp_path, "extra-substituters = file:///from-env\n")
    (tmp_path / "etc" / "nix.conf").write_text(
        "# system\n"
        "binary-caches = file:///system  # the old name\n"
        "trusted-public-keys = sys-1:c3lzdGVtLWtleQ==\n"
        "include more.conf\n"
        "!include missing.conf\n"
    )
    (tmp_path / "etc" / "more.conf").write_text("extra-substituters = file:///included\n")
    user = Path(env["XDG_CONFIG_HOME"], "nix")
    user.mkdir(parents=True)
    (user / "nix.conf").write_text("extra-trusted-public-keys = user-1:dXNlci1rZXk=\n")
    read = settings_from_files(env)
    assert read.substituters == ("file:///system", "file:///included", "file:///from-env")
    assert read.trusted_public_keys == ("sys-1:c3lzdGVtLWtleQ==", "user-1:dXNlci1rZXk=")
    asked = nix_cache_settings(env)  # the real nix agrees
    assert (asked.substituters, asked.trusted_public_keys) == (
        read.substituters,
        read.trusted_public_keys,
    )


def test_without_nix_the_files_are_read(tmp_path: Path) -> None:
    env = {**environment(tmp_path, "substituters = file:///only\n"), "PATH": str(tmp_path)}
    got = nix_cache_settings(env)
    assert got.origin == "nix.conf files"
    assert got.substituters == ("file:///only",)


@pytest.mark.parametrize(
    "doc",
    [
        {"substituters": {"value": ["file:///a"]}, "trusted-public-keys": {"value": ["k:AA=="]}},
        {"substituters": ["file:///a"], "trusted-public-keys": "k:AA=="},
    ],
)
def test_config_json_shapes(doc: dict[str, object]) -> None:
    got = settings_from_json(doc, "nix config show")
    assert (got.substituters, got.trusted_public_keys) == (("file:///a",), ("k:AA==",))
