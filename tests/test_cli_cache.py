"""`stowaway cache` and `cache prune` through the command line, and prune running in a
loop while real builds use the same cache: every build succeeds with the right image."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from stowaway.cli import main
from stowaway.image.cache_prune import prune

STOWAWAY = [sys.executable, "-m", "stowaway"]


def build(demo_app: str, cache: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*STOWAWAY, "build", demo_app, "--json", "--cache-dir", str(cache), "-o", f"oci:{out}:t"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def age_all(cache: Path, days: float) -> None:
    t = time.time() - days * 86400
    for entry in (cache / "layers").glob("*.json"):
        os.utime(entry, (t, t))


def check_layout(layout: Path) -> None:
    """Every blob of the layout is there and has its digest."""
    for blob in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_cache_info_and_prune_json(demo_app: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    proc = build(demo_app, cache, tmp_path / "img")
    assert proc.communicate(timeout=300) and proc.returncode == 0
    runner = CliRunner()
    info = json.loads(runner.invoke(main, ["cache", "--cache-dir", str(cache), "--json"]).stdout)
    assert info["directory"] == str(cache) and info["layers"] == 4 and info["blobs"] == 4
    assert info["size"] > 0 and info["oldest_use"] <= info["newest_use"]
    assert (
        json.loads(
            runner.invoke(main, ["cache", "info", "--cache-dir", str(cache), "--json"]).stdout
        )
        == info
    )
    text = runner.invoke(main, ["cache", "--cache-dir", str(cache)]).stdout
    assert "layers      4" in text and "oldest use" in text
    args = ["cache", "prune", "--cache-dir", str(cache), "--json"]
    kept = json.loads(runner.invoke(main, [*args, "--max-size", "0"]).stdout)
    assert kept["removed_layers"] == [] and kept["in_grace"] == 4  # just used
    age_all(cache, 2)
    dry = json.loads(runner.invoke(main, [*args, "--older-than", "1d", "--dry-run"]).stdout)
    assert dry["dry_run"] and len(dry["removed_layers"]) == 4
    assert len(list((cache / "layers").glob("*.json"))) == 4
    done = json.loads(runner.invoke(main, [*args, "--older-than", "1d"]).stdout)
    assert len(done["removed_blobs"]) == 4 and done["freed"] == info["size"]
    assert list((cache / "layers").glob("*.json")) == []
    missing = runner.invoke(main, ["cache", "prune", "--cache-dir", str(cache), "--json"])
    assert missing.exit_code == 1 and "nothing to prune by" in json.loads(missing.stdout)["error"]
    bad = runner.invoke(main, ["cache", "prune", "--cache-dir", str(cache), "--max-size", "x"])
    assert bad.exit_code == 1 and "not a size" in bad.stderr


def test_builds_succeed_while_prune_runs_in_a_loop(demo_app: str, tmp_path: Path) -> None:
    reference = build(demo_app, tmp_path / "ref-cache", tmp_path / "ref")
    stdout, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr
    expected = json.loads(stdout)["manifest_digest"]
    cache = tmp_path / "cache"
    warm = build(demo_app, cache, tmp_path / "warm")
    assert warm.communicate(timeout=300) and warm.returncode == 0
    removed = 0
    for n in range(4):
        age_all(cache, 2)  # every entry is a candidate until a build uses it again
        out = tmp_path / f"img{n}"
        proc = build(demo_app, cache, out)
        while proc.poll() is None:
            removed += len(prune(cache, max_size=0).removed_layers)
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr
        assert json.loads(stdout)["manifest_digest"] == expected
        check_layout(out)
    assert removed > 0  # prune did run against the builds, not only beside them
