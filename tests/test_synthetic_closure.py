"""bench/synthetic_closure.py: the scale benchmark's fixture generator, at a tiny size,
against the real local Nix store."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "bench" / "synthetic_closure.py"
SEED = "424242"  # this test's own closure; nothing else uses this seed
SIZE = "3M"

pytestmark = pytest.mark.skipif(
    not os.access("/nix/var/nix/db", os.W_OK), reason="needs write access to the Nix store"
)


def generate(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / f"summary-{len(list(tmp_path.iterdir()))}.json"
    cmd = [sys.executable, str(GENERATOR), "--paths", "20", "--size", SIZE, "--seed", SEED,
           "--json-out", str(out), *args]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary


def nix_store(*args: str) -> list[str]:
    out = subprocess.run(["nix-store", *args], check=True, capture_output=True, text=True)
    return out.stdout.split()


def test_same_seed_same_paths_and_the_salt_changes_only_the_app(tmp_path: Path) -> None:
    a = generate(tmp_path, "--dry-run")
    b = generate(tmp_path, "--dry-run")
    salted = generate(tmp_path, "--dry-run", "--app-salt", "x")
    other = generate(tmp_path, "--dry-run", "--seed", "424243")
    assert a["closure"] == b["closure"] and len(a["closure"]) == 20
    assert a["app"] == a["closure"][-1]
    assert salted["closure"][:-1] == a["closure"][:-1] and salted["app"] != a["app"]
    assert not set(other["closure"]) & set(a["closure"])


def test_registers_a_valid_closure_with_the_same_bytes_every_time(tmp_path: Path) -> None:
    first = generate(tmp_path)
    closure = first["closure"]
    assert sorted(nix_store("-qR", first["app"])) == sorted(closure)
    nix_store("--verify-path", *closure)  # the NAR hashes Nix recorded match the files
    assert 2.5e6 < first["nar_size"] < 4e6
    # references are real: every path names its references in its own bytes
    for path in closure:
        deps = Path(path, "nix-support", "propagated-deps").read_text().split()
        assert sorted(deps) == sorted(set(nix_store("-q", "--references", path)) - {path})
    assert generate(tmp_path)["imported"] == 0  # present: nothing to do
    # gzip has real work: neither all zeros nor all random
    tar = subprocess.run(["tar", "-cf", "-", *closure], check=True, capture_output=True).stdout
    assert 0.3 < len(gzip.compress(tar, 6)) / len(tar) < 0.8

    hashes = nix_store("-q", "--hash", *closure)
    nix_store("--delete", *closure)
    again = generate(tmp_path)
    assert again["imported"] == 20
    assert nix_store("-q", "--hash", *closure) == hashes
