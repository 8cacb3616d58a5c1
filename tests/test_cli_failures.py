"""How the CLI fails and what it shows meanwhile: every failure a user can cause is one
`error:` line and a hint (and the JSON object with --json), never a traceback; Ctrl-C
stops a build at once; on a terminal one overall bar and the names of the store paths
under way. Each is run as the real command in a subprocess, as a user would meet it."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from nixtools import SANDBOXED_MK
from stowaway.cli import main
from stowaway.fsutil import TEMP_PREFIX

SRC = Path(__file__).resolve().parent.parent / "src"
STOWAWAY = [sys.executable, "-m", "stowaway"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STOWAWAY, *args], capture_output=True, text=True, timeout=120, env=env)


def one_error(proc: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The error line and the hint of a failed command, which printed nothing else."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    hints = [ln for ln in lines if ln.startswith("  hint: ")]
    assert len(errors) == 1 and len(hints) == 1, proc.stderr
    return errors[0], hints[0]


def test_serve_on_a_busy_port_names_the_address(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run("serve", "--listen", f"127.0.0.1:{port}", "--no-compose",
                   "--storage", str(tmp_path / "root"))  # fmt: skip
    error, hint = one_error(proc)
    assert error == f"error: cannot listen on 127.0.0.1:{port}: address in use"
    assert "--listen" in hint


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file or directory"), ("{not json", "not JSON"),
     ('{"packages": {"x": "/tmp/not-a-store-path"}}', "packages['x']")],
)  # fmt: skip
def test_serve_refuses_a_missing_or_malformed_index_at_start_up(
    tmp_path: Path, content: str | None, message: str
) -> None:
    index = tmp_path / "index.json"
    if content is not None:
        index.write_text(content)
    proc = run("serve", "--listen", "127.0.0.1:0", "--storage", str(tmp_path / "root"),
               "--index", str(index))  # fmt: skip
    error, hint = one_error(proc)
    assert str(index) in error and message in error
    assert "--index" in hint and "stowaway index" in hint


def test_serve_checks_its_storage_and_cache_dirs_before_listening(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run("serve", "--listen", "127.0.0.1:0", "--storage", str(blocker / "root"))
    error, hint = one_error(proc)
    assert error.startswith(f"error: cannot use the storage directory {blocker}/root")
    assert "--storage DIR" in hint
    proc = run("serve", "--listen", "127.0.0.1:0", "--storage", str(tmp_path / "root"),
               "--cache-dir", str(blocker / "cache"))  # fmt: skip
    error, hint = one_error(proc)
    assert error.startswith(f"error: cannot write to the layer cache {blocker}/cache")
    assert "--cache-dir DIR" in hint and "--no-compose" in hint


def test_an_unwritable_cache_dir_is_named_with_the_flags_to_choose_another(
    demo_app: str, tmp_path: Path
) -> None:
    """`build` as nobody with HOME=/nonexistent: the default cache cannot be made. The
    store and its database are readable by everyone (the database opened read-only)."""
    tmp_path.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": "/nonexistent",
        "PYTHONPATH": str(SRC),
    }
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*nobody, *STOWAWAY, "--help"], capture_output=True, env=env)
    if probe.returncode != 0:  # e.g. a checkout under /root (mode 0700), as in the clean room
        pytest.skip("nobody cannot run this checkout's stowaway (its venv or src is private)")
    argv = [*nobody, *STOWAWAY, "build", demo_app, "-o", f"oci:{tmp_path}/nobody-out/img"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    error, hint = one_error(proc)
    assert error.startswith("error: cannot write to the layer cache /nonexistent/.cache/stowaway")
    assert "Permission denied" in error
    assert "--cache-dir" in hint and "XDG_CACHE_HOME" in hint
    again = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert json.loads(again.stdout)["hint"] == hint.removeprefix("  hint: ")


def test_an_explicit_unwritable_cache_dir_hints_at_the_flag(demo_app: str, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run("build", demo_app, "--cache-dir", str(blocker / "cache"),
               "-o", f"oci:{tmp_path}/img")  # fmt: skip
    error, hint = one_error(proc)
    assert f"layer cache {blocker}/cache" in error
    assert hint == "  hint: pass --cache-dir DIR"


def test_an_unexpected_exception_is_one_line_unless_debugging(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import stowaway.sinks.inspect

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(stowaway.sinks.inspect, "read_image_summary", broken)
    monkeypatch.delenv("STOWAWAY_DEBUG", raising=False)
    result = CliRunner().invoke(main, ["inspect", f"oci:{tmp_path}/x", "--json"])
    assert result.exit_code == 1
    first = result.stderr.splitlines()[0]
    assert first == "error: internal error: ZeroDivisionError: division by zero"
    assert "please report it" in result.stderr and "STOWAWAY_DEBUG=1" in result.stderr
    assert json.loads(result.stdout)["error"].startswith("internal error: ZeroDivisionError")
    assert "Traceback" not in result.output

    monkeypatch.setenv("STOWAWAY_DEBUG", "1")
    debug = CliRunner().invoke(main, ["inspect", f"oci:{tmp_path}/x"])
    assert isinstance(debug.exception, ZeroDivisionError)  # raised, with its traceback


#: 160 MB of random bytes: incompressible, so gzip takes seconds over it.
BIG_NIX = f"""{SANDBOXED_MK} "stowaway-big-random" ''
  mkdir -p $out; head -c 160000000 /dev/urandom > $out/random.bin
''
"""


@pytest.fixture(scope="module")
def big_path(have_nix: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    expr = tmp_path_factory.mktemp("big") / "big.nix"
    expr.write_text(BIG_NIX)
    out = subprocess.run(["nix-build", str(expr), "--no-out-link"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def _temp_blob_growing(blobs: Path) -> bool:
    for temp in blobs.glob(TEMP_PREFIX + "*"):
        try:
            if temp.stat().st_size > 1 << 20:
                return True
        except FileNotFoundError:
            pass
    return False


def test_ctrl_c_stops_a_build_at_once_leaving_no_temp_files(big_path: str, tmp_path: Path) -> None:
    """SIGINT while a large layer is being compressed: exit 130 within ~2 s saying
    `interrupted`, no temp blob left in the cache nor in the layout; the next build
    works."""
    cache, layout = tmp_path / "cache", tmp_path / "layout"
    argv = [*STOWAWAY, "build", big_path, "--cache-dir", str(cache), "-o", f"oci:{layout}:1"]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as at a terminal, even where the runner ignores SIGINT (a background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )
    try:
        deadline = time.monotonic() + 60
        while not _temp_blob_growing(cache / "blobs" / "sha256"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no layer was being compressed"
            time.sleep(0.02)
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - interrupted
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted"], err
    assert took < 2.5, f"took {took:.1f}s to stop"
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith((TEMP_PREFIX, ".link-"))]
    assert leftovers == []
    assert not list((cache / "layers").glob("*.json"))  # nothing recorded as built

    again = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    layers = json.loads(again.stdout)["layers"]
    assert any(big_path in layer["store_paths"] and layer["built"] for layer in layers)


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except OSError:  # EIO: the other side is closed
            return out
        if not data:
            return out
        out += data


def test_progress_on_a_terminal_is_one_bar_and_the_names_being_worked_on(
    big_path: str, tmp_path: Path
) -> None:
    master, slave = pty.openpty()
    argv = [*STOWAWAY, "build", big_path, "--cache-dir", str(tmp_path / "cache"),
            "-o", f"oci:{tmp_path}/layout:1"]  # fmt: skip
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    with subprocess.Popen(argv, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env):
        os.close(slave)
        shown = _read_all(master).decode(errors="replace")
    os.close(master)
    name = big_path.split("-", 1)[1]  # stowaway-big-random, not the hash
    assert "\x1b[" in shown and "━" in shown  # drawn
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.replace("\r", "\n")).splitlines()
    bars = [ln for ln in lines if "/160.0 MB" in ln]
    # one bar per stage, named by it (no bar per layer): tarring + compressing, writing
    assert {ln.split()[0] for ln in bars} == {"layers", "write"}, bars
    assert f"  {name}" in lines and f"  write {name}" in lines
    assert big_path.rsplit("/", 1)[1].split("-", 1)[0] not in shown.split("manifest")[0]


def test_off_a_terminal_nothing_is_drawn(demo_app: str, tmp_path: Path) -> None:
    proc = run("build", demo_app, "--cache-dir", str(tmp_path / "cache"),
               "-o", f"oci:{tmp_path}/layout:1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x1b" not in proc.stderr
    assert "━" not in proc.stderr and proc.stderr == ""
