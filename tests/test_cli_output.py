"""What the CLI prints for people: user strings are never rich markup or emoji codes,
and nothing is wrapped when the output is not a terminal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_targets_are_printed_as_given_and_digests_whole(demo_app: str, tmp_path: Path) -> None:
    target = f"oci:{tmp_path}/two:1"  # ':two:' is a rich emoji code, '[b]' markup
    out = subprocess.run(
        [sys.executable, "-m", "stowaway", "build", demo_app, "-o", target,
         "--label", "x=[b]bold[/b]"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    ).stdout  # fmt: skip
    assert target in out
    assert "2️⃣" not in out
    (manifest,) = [ln for ln in out.splitlines() if ln.startswith("manifest ")]
    assert len(manifest.split()[1]) == len("sha256:") + 64  # on one line, whole
