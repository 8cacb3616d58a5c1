"""The binary caches Nix itself would use: ``substituters`` and ``trusted-public-keys``
from its configuration, for commands given no ``--substituter`` /
``--trusted-public-key`` (each flag replaces its setting alone, as ``--option`` does
for Nix).

When nix is installed it is asked (``nix config show --json`` in newer Nix, 2.26
among them; else ``nix show-config --json``, as in Nix 2.8), so every source Nix reads
counts, its defaults included. Otherwise the files are read as Nix reads them: ``$NIX_CONF_DIR/
nix.conf`` (``/etc/nix``), ``$NIX_USER_CONF_FILES`` or ``nix/nix.conf`` under
``$XDG_CONFIG_DIRS`` and ``$XDG_CONFIG_HOME``, then ``$NIX_CONFIG``; ``include``,
``!include`` and ``extra-`` settings work, ``#`` starts a comment.

Nix's default substituter is https://cache.nixos.org. Opening a cache contacts
nothing: a binary cache is asked only for paths the local store lacks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_KEYS", "DEFAULT_SUBSTITUTERS", "NixCacheSettings", "nix_cache_settings"]

DEFAULT_SUBSTITUTERS = ("https://cache.nixos.org/",)
DEFAULT_KEYS = ("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",)

# setting → its old names (Nix still reads them)
_ALIASES = {
    "substituters": ("substituters", "binary-caches"),
    "trusted-public-keys": ("trusted-public-keys", "binary-cache-public-keys"),
}


@dataclass(frozen=True)
class NixCacheSettings:
    substituters: tuple[str, ...]
    trusted_public_keys: tuple[str, ...]
    origin: str  # where they were read, e.g. "nix show-config"


def nix_cache_settings(env: Mapping[str, str] | None = None) -> NixCacheSettings:
    """Nix's substituters and trusted keys: asked of nix when it runs, else read from
    the configuration files (see the module docstring)."""
    env = os.environ if env is None else env
    if shutil.which("nix", path=env.get("PATH")) is not None:
        asked = _ask_nix(env)
        if asked is not None:
            return asked
    return settings_from_files(env)


def _ask_nix(env: Mapping[str, str]) -> NixCacheSettings | None:
    features = ["--extra-experimental-features", "nix-command"]
    for sub in (["config", "show"], ["show-config"]):
        try:
            proc = subprocess.run(
                ["nix", *features, *sub, "--json"],
                capture_output=True,
                text=True,
                env=dict(env),
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc.returncode == 0:
            try:
                return settings_from_json(json.loads(proc.stdout), f"nix {' '.join(sub)}")
            except (ValueError, TypeError, AttributeError):
                return None
    return None


def settings_from_json(doc: Mapping[str, Any], origin: str) -> NixCacheSettings:
    """From ``nix show-config --json`` / ``nix config show --json``: each setting an
    object with its ``value`` (or, to be safe, the value itself)."""

    def value(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = doc.get(name, default)
        if isinstance(v, Mapping):
            v = v.get("value", default)
        if isinstance(v, str):
            v = v.split()
        return tuple(str(x) for x in v)

    return NixCacheSettings(
        value("substituters", DEFAULT_SUBSTITUTERS),
        value("trusted-public-keys", DEFAULT_KEYS),
        origin,
    )


def _user_files(env: Mapping[str, str]) -> list[Path]:
    if env.get("NIX_USER_CONF_FILES"):
        return [Path(p) for p in env["NIX_USER_CONF_FILES"].split(":") if p]
    home = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME", "/"), ".config")
    dirs = (env.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":")
    # later files override earlier ones: the most important directory comes last
    return [Path(d, "nix", "nix.conf") for d in reversed(dirs) if d] + [
        Path(home, "nix", "nix.conf")
    ]


def settings_from_files(env: Mapping[str, str] | None = None) -> NixCacheSettings:
    """Nix's settings read from its configuration files and ``$NIX_CONFIG``."""
    env = os.environ if env is None else env
    values: dict[str, list[str]] = {
        "substituters": list(DEFAULT_SUBSTITUTERS),
        "trusted-public-keys": list(DEFAULT_KEYS),
    }
    system = Path(env.get("NIX_CONF_DIR") or "/etc/nix", "nix.conf")
    for path in [system, *_user_files(env)]:
        _apply_file(path, values, 0)
    if env.get("NIX_CONFIG"):
        _apply_text(env["NIX_CONFIG"], Path.cwd(), values, depth=0)
    return NixCacheSettings(
        tuple(values["substituters"]), tuple(values["trusted-public-keys"]), "nix.conf files"
    )


def _apply_file(path: Path, values: dict[str, list[str]], depth: int) -> None:
    try:
        text = path.read_text()
    except OSError:
        return  # a missing file (also an `include`d one) adds nothing
    _apply_text(text, path.parent, values, depth)


def _apply_text(text: str, base: Path, values: dict[str, list[str]], depth: int) -> None:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] in ("include", "!include") and len(words) == 2:
            if depth < 10:
                _apply_file(base / words[1], values, depth + 1)
            continue
        name, sep, rest = line.partition("=")
        if not sep:
            continue
        name = name.strip()
        extra = name.startswith("extra-")
        name = name.removeprefix("extra-")
        for setting, names in _ALIASES.items():
            if name in names:
                if extra:
                    values[setting] += rest.split()
                else:
                    values[setting] = rest.split()
