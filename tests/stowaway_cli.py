"""Running the stowaway CLI as a user does, in a subprocess of this test's Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

STOWAWAY = [sys.executable, "-m", "stowaway"]


def run(
    *args: str,
    ok: bool = True,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``stowaway ARGS``; with ``ok`` a non-zero exit fails the test showing its output.
    ``env`` is added to this process's environment."""
    proc = subprocess.run(
        [*STOWAWAY, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    if ok and proc.returncode != 0:
        raise AssertionError(f"stowaway {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def build_json(*args: str, **kw: Any) -> dict[str, Any]:
    """The ``build --json`` summary (stdout must hold nothing else)."""
    return json.loads(run("build", "--json", *args, **kw).stdout)  # type: ignore[no-any-return]
