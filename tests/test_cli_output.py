"""What the CLI prints for people: user strings are never rich markup or emoji codes,
and nothing is wrapped when the output is not a terminal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemons import Registry


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


def test_the_summary_counts_built_sent_and_present_apart(demo_app: str, tmp_path: Path) -> None:
    """A warm build pushed to a fresh repository: nothing built, every layer uploaded;
    pushed again: every layer already there (it used to say "0 built or uploaded")."""
    cmd = [sys.executable, "-m", "stowaway", "build", demo_app]
    subprocess.run([*cmd, "-o", f"oci:{tmp_path}/warm"], check=True, capture_output=True)
    with Registry(tmp_path / "registry") as reg:
        push = [*cmd, "-o", f"docker://{reg.host}/fresh/app:1", "--dest-tls-verify=false"]
        first = subprocess.run(push, check=True, capture_output=True, text=True).stdout
        again = subprocess.run(push, check=True, capture_output=True, text=True).stdout
    summary = [ln for ln in first.splitlines() if " layers, " in ln]
    assert summary and summary[0].endswith(
        "0 built, 4 from the layer cache; 4 uploaded, 0 mounted, 0 already there"
    ), first
    assert [ln for ln in again.splitlines() if " layers, " in ln][0].endswith(
        "0 built, 4 from the layer cache; 0 uploaded, 0 mounted, 4 already there"
    ), again


def _columns(text: str) -> dict[str, list[str]]:
    """The cells of the (one) table in ``text``, by column header."""
    rows = [
        [cell.strip() for cell in line.strip().strip("┃│").split("┃" if "┃" in line else "│")]
        for line in text.splitlines()
        if line.startswith(("┃", "│"))
    ]
    header, *body = rows
    return {name: [row[i] for row in body] for i, name in enumerate(header)}


def test_plan_prints_no_empty_column(demo_app: str, demo_closure: list[str]) -> None:
    """Nothing is built by `plan`: it used to print digest and reused columns that were
    always empty."""
    out = subprocess.run(
        [sys.executable, "-m", "stowaway", "plan", demo_app],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    columns = _columns(out)
    assert list(columns) == ["#", "size", "paths", "store paths"]
    for name, cells in columns.items():
        assert all(cells), (name, out)
    assert sum(int(n) for n in columns["paths"]) == len(demo_closure)
    assert columns["store paths"][-1] == "stowaway-demo-app"
