"""Helpers that drive the real nix CLI for tests (building fixtures, making caches)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# `mk NAME SCRIPT` for expressions written by tests: builds in Nix's default sandbox
# (static busybox as builder, its applets on PATH); see fixtures/sandboxed.nix.
SANDBOXED_MK = f"(import {FIXTURES / 'sandboxed.nix'}).mk"


def nix_build(expr: Path, attr: str | None = None, **args: str) -> str:
    """Build a fixture expression with the local nix; return the output store path."""
    cmd = ["nix-build", str(expr), "--no-out-link"]
    if attr:
        cmd += ["-A", attr]
    for k, v in args.items():
        cmd += ["--argstr", k, v]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def closure_of(path: str) -> list[str]:
    out = subprocess.run(["nix-store", "-qR", path], check=True, capture_output=True, text=True)
    return out.stdout.split()


def nix_copy(dest: Path, paths: list[str], compression: str, secret_key: str | None) -> str:
    url = f"file://{dest}?compression={compression}"
    if secret_key:
        url += f"&secret-key={secret_key}"
    subprocess.run(
        ["nix", "copy", "--extra-experimental-features", "nix-command", "--to", url, *paths],
        check=True,
        capture_output=True,
    )
    return f"file://{dest}"


def current_system() -> str:
    out = subprocess.run(
        ["nix-instantiate", "--eval", "--expr", "builtins.currentSystem"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return str(out.strip().strip('"'))


def write_flake(directory: Path, script: str) -> Path:
    """A flake in ``directory`` with no inputs (there is no nixpkgs here) whose
    ``packages.<system>.app`` (also ``default``) runs ``script`` in the sandbox.

    In pure evaluation a flake reads nothing outside its directory (nor
    builtins.currentSystem), so the static busybox and fixtures/sandboxed-derivation.nix
    are copied in, and the system is written out."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / "sandboxed-derivation.nix", directory / "sandboxed-derivation.nix")
    shutil.copy("/usr/bin/busybox", directory / "busybox")
    system = current_system()
    (directory / "flake.nix").write_text(
        f"""{{
  outputs = {{ self }}: let
    sandboxed = import ./sandboxed-derivation.nix {{
      busybox = builtins.path {{
        path = ./.;
        name = "busybox-static";
        filter = path: type: baseNameOf path == "busybox";
      }};
      system = "{system}";
    }};
    app = sandboxed.mk "flake-app" ''{script}'';
  in {{
    packages."{system}" = {{ inherit app; default = app; }};
  }};
}}
"""
    )
    return directory


#: Debian's arm64 busybox-static, put here by scripts/setup.sh (the arm64 fixture's builder).
ARM_BUSYBOX = Path("/usr/local/lib/stowaway-fixtures/aarch64-linux/busybox")


def build_multiarch(system: str) -> str:
    """fixtures/multiarch.nix built for ``system`` (x86_64-linux or aarch64-linux, the
    latter run under qemu through binfmt: ``extra-platforms`` lets Nix start it)."""
    if system == "aarch64-linux" and not ARM_BUSYBOX.is_file():
        raise RuntimeError(f"{ARM_BUSYBOX} is missing: run `make setup`")
    cmd = ["nix-build", str(FIXTURES / "multiarch.nix"), "--no-out-link"]
    cmd += ["--argstr", "system", system, "--option", "substituters", ""]
    if system == "aarch64-linux":
        cmd += ["--option", "extra-platforms", "aarch64-linux"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"building {system} fixture failed:\n{proc.stderr}")
    return proc.stdout.split()[-1]
