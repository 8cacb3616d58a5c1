"""Shared fixtures: real Nix closures built with the local nix from fixtures/*.nix."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


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


@pytest.fixture(scope="session")
def have_nix() -> None:
    if shutil.which("nix-build") is None:
        pytest.fail("nix-build not found: run `make setup` (installs nix-bin)")


@pytest.fixture(scope="session")
def demo_app(have_nix: None) -> str:
    """Store path of the demo app (closure: app, busybox, greeting-data)."""
    return nix_build(FIXTURES / "demo.nix")


@pytest.fixture(scope="session")
def demo_closure(demo_app: str) -> list[str]:
    return closure_of(demo_app)


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1")
    return tmp_path
