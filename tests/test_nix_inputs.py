"""What stowaway takes from Nix: what it builds for `stowaway build` (-f FILE.nix with
--arg/--argstr, flake references; Nix's build log on stderr while it runs) and the
binary caches of its configuration. Real nix, through the CLI as a user runs it (a
subprocess), each build made new by a salt so that it really runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nixtools import SANDBOXED_MK, write_flake
from stowaway.installables import is_flake_ref

STOWAWAY = [sys.executable, "-m", "stowaway"]


def run(
    *args: str, ok: bool = True, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*STOWAWAY, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    if ok and proc.returncode != 0:
        raise AssertionError(f"stowaway {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def build_json(*args: str, **kw: Any) -> tuple[dict[str, Any], str]:
    """The --json summary (stdout must be JSON only) and stderr."""
    proc = run("build", "--json", *args, **kw)
    return json.loads(proc.stdout), proc.stderr


def top_paths(summary: dict[str, Any]) -> list[str]:
    """Store paths of the image's top store layer (the root's, below customisation)."""
    return list(summary["layers"][-2]["store_paths"])


def test_nix_file_takes_arg_and_argstr_and_its_log_reaches_stderr(
    tmp_path: Path, have_nix: None
) -> None:
    salt = uuid.uuid4().hex[:12]
    expr = tmp_path / "app.nix"
    expr.write_text(
        "{ greeting, n, salt }: "
        f'{SANDBOXED_MK} "args-app-${{greeting}}" '
        "''echo MARKER-${greeting}-${toString n}-${salt}; mkdir $out; echo ${greeting} > $out/g''"
    )
    out, err = build_json(
        "-f", str(expr),
        "--argstr", "greeting", "hello",
        "--arg", "n", "6 * 7",
        "--argstr", "salt", salt,
        "--cache-dir", str(tmp_path / "c"),
        "-o", f"oci:{tmp_path}/img",
    )  # fmt: skip
    assert f"MARKER-hello-42-{salt}" in err  # the builder's echo, while nix-build ran
    assert top_paths(out)[0].endswith("-args-app-hello")


def test_arg_without_file_is_refused(tmp_path: Path) -> None:
    proc = run("plan", "--argstr", "a", "b", ok=False)
    assert proc.returncode == 1
    assert "--argstr needs -f FILE.nix" in proc.stderr


def test_failing_nix_build_reports_nix_error(tmp_path: Path, have_nix: None) -> None:
    expr = tmp_path / "bad.nix"
    expr.write_text(f"{SANDBOXED_MK} \"bad\" ''echo FAILING-{uuid.uuid4().hex}; exit 3''")
    proc = run("plan", "-f", str(expr), "--json", ok=False)
    assert proc.returncode == 1
    assert "FAILING-" in proc.stderr  # the log went by
    error = json.loads(proc.stdout)["error"]
    assert error.startswith(f"nix-build {expr} failed (exit ")  # 100: a builder failed
    assert "-bad.drv' failed with exit code 3" in error  # nix's own error line


@pytest.mark.parametrize(
    ("item", "flake"),
    [
        (".#app", True),
        ("path:/srv/app#app", True),
        ("/srv/app#app", True),
        ("github:owner/repo#app", True),
        ("github:owner/repo", True),
        ("git+file:///srv/app", True),
        ("/nix/store/abcdefghijklmnopqrstuvwxyz012345-source#app", True),
        ("/nix/store/abcdefghijklmnopqrstuvwxyz012345-app", False),
        ("./result", False),  # does not exist here: resolve() says it is no store path
    ],
)
def test_flake_references_are_told_from_paths(item: str, flake: bool) -> None:
    assert is_flake_ref(item) is flake


@pytest.fixture()
def flake(tmp_path: Path, have_nix: None) -> tuple[Path, str]:
    """A git-less flake (so `path:` semantics, no git needed) and its build marker."""
    marker = f"FLAKE-MARKER-{uuid.uuid4().hex[:12]}"
    directory = write_flake(tmp_path / "flake", f"echo {marker}; mkdir $out; echo hi > $out/f")
    return directory, marker


def test_flake_forms_build_and_nix_log_reaches_stderr(
    flake: tuple[Path, str], tmp_path: Path
) -> None:
    """Nix 2.8 (flakes experimental, enabled on nix's command line) and ≥ 2.26 alike."""
    directory, marker = flake
    common = ["--cache-dir", str(tmp_path / "c"), "-o", f"oci:{tmp_path}/img"]
    first, err = build_json(".#app", *common, cwd=directory)
    assert marker in err  # built now, its log passed through; stdout stayed JSON
    (app,) = top_paths(first)
    assert app.endswith("-flake-app")
    for ref in [f"path:{directory}#app", f"{directory}#default", str(directory)]:
        out, _ = build_json(ref, *common)
        assert top_paths(out) == [app], ref
    assert not (tmp_path / "flake" / "result").exists()  # --no-link


def test_flake_errors_are_nix_errors(flake: tuple[Path, str]) -> None:
    directory, _ = flake
    proc = run("plan", f"path:{directory}#nope", ok=False)
    assert proc.returncode == 1
    assert "not a store path" not in proc.stderr
    assert f"error: nix build path:{directory}#nope failed" in proc.stderr
    assert "does not provide attribute" in proc.stderr
    # a github: reference goes to nix too (which cannot fetch it here, or finds no repo)
    offline = {"NIX_CONFIG": os.environ.get("NIX_CONFIG", "") + "\ndownload-attempts = 1\n"}
    proc = run("plan", "github:stowaway-test/no-such-repo#app", ok=False, env=offline)
    assert proc.returncode == 1
    assert "error: nix build github:stowaway-test/no-such-repo#app failed" in proc.stderr


class SilentServer:
    """A TCP port that accepts connections and never answers (an HTTP cache there makes
    a client wait for its timeout); it counts who came."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.accepted:
            c.close()


@pytest.fixture()
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


def test_nix_config_caches_are_used_without_flags(
    demo_app: str,
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    silent: SilentServer,
    tmp_path: Path,
) -> None:
    """substituters and trusted-public-keys from NIX_CONFIG (as nix reads them) stand in
    for --substituter/--trusted-public-key; an unreachable cache before the good one is
    passed over, as Nix does."""
    empty = tmp_path / "empty-store"
    empty.mkdir()
    conf = {
        "NIX_CONFIG": f"substituters = http://127.0.0.1:9 {signed_caches['zstd']}\n"
        f"trusted-public-keys = {cache_keys['good']}\n"
    }
    local, _ = build_json(demo_app, "--cache-dir", str(tmp_path / "c1"), "-o", f"oci:{tmp_path}/a")
    remote, _ = build_json(
        demo_app,
        "--store", str(empty),
        "--cache-dir", str(tmp_path / "c2"),
        "-o", f"oci:{tmp_path}/b",
        env=conf,
    )  # fmt: skip
    assert remote["manifest_digest"] == local["manifest_digest"]
    # a wrong key from nix.conf: the hint says so, and where the keys came from
    conf["NIX_CONFIG"] = f"substituters = {signed_caches['zstd']}\n" + (
        f"trusted-public-keys = {cache_keys['other']}\n"
    )
    proc = run("plan", demo_app, "--store", str(empty), ok=False, env=conf)
    assert proc.returncode == 1
    assert "the cache's signer is good-key-1, which none of the keys given matches" in proc.stderr
    assert "(trusted-public-keys of nix " in proc.stderr and cache_keys["other"] in proc.stderr


def test_nix_config_caches_are_asked_only_for_missing_paths(
    demo_app: str, silent: SilentServer, tmp_path: Path
) -> None:
    """A configured cache that would hang (as https://cache.nixos.org does offline, when
    it is not refused at once) is not contacted for paths in the local store."""
    conf = {"NIX_CONFIG": f"substituters = {silent.url}\n"}
    started = time.monotonic()
    run("plan", demo_app, env=conf)
    run("build", demo_app, "--cache-dir", str(tmp_path / "c"), "-o", f"oci:{tmp_path}/a", env=conf)
    assert silent.accepted == [] and time.monotonic() - started < 25
