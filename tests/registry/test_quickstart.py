"""docs/registry.md's quickstart, run as written against a real `stowaway serve`.

The first ```sh block under "## Quickstart" is run by bash (`set -euo pipefail`) in an
empty directory. Two things differ from a newcomer's machine, and only these: `<nixpkgs>`
is a stand-in (NIX_PATH) whose attributes hello, bashInteractive, coreutils, moreutils
and nano are tiny derivations built in Nix's sandbox from the static busybox (no
nixpkgs, no network here), and the port 5000 is replaced by a free one. The script
leaves the server in the background until its last line; whatever happens, the test
ends the script's process group by its pid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

from daemons import free_port
from nixtools import FIXTURES

DOC = Path(__file__).resolve().parents[2] / "docs" / "registry.md"
BIN = Path(sys.executable).parent  # the venv's `stowaway` entry point

FAKE_NIXPKGS = """{ ... }:
let
  sandboxed = import FIXTURES/sandboxed.nix;
  tool = name: bin: sandboxed.mk name ''
    mkdir -p $out/bin
    cp ${sandboxed.busybox}/busybox $out/bin/${bin}
  '';
in {
  hello = sandboxed.mk "hello-2.12" ''
    mkdir -p $out/bin
    printf '#!/bin/sh\\necho Hello, world!\\n' > $out/bin/hello
    chmod +x $out/bin/hello
  '';
  bashInteractive = tool "bash-interactive-5.2" "sh";
  coreutils = tool "coreutils-9.4" "ls";
  moreutils = tool "moreutils-0.69" "ts";
  nano = tool "nano-7.2" "vi";
}
"""


def quickstart_script() -> str:
    text = DOC.read_text()
    section = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "docs/registry.md: no ```sh block under ## Quickstart"
    return match.group(1)


def test_quickstart_runs_as_written(tmp_path: Path, have_nix: None) -> None:
    script = quickstart_script()
    assert "127.0.0.1:5000" in script
    port = free_port()
    script = script.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    nixpkgs = tmp_path / "nixpkgs"
    nixpkgs.mkdir()
    (nixpkgs / "default.nix").write_text(FAKE_NIXPKGS.replace("FIXTURES", str(FIXTURES)))
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "NIX_PATH": f"nixpkgs={nixpkgs}",
    }
    log_path = tmp_path / "quickstart.log"
    with open(log_path, "wb") as log_file:  # a file: the backgrounded server keeps it open
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=work,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        proc.wait(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the backgrounded server, if left over
        except ProcessLookupError:
            pass
        proc.wait()
    log = log_path.read_text(errors="replace")
    assert proc.returncode == 0, log

    index = json.loads((work / "index.json").read_text())
    assert {"hello", "bashInteractive", "coreutils", "moreutils", "nano"} <= set(index["packages"])
    # skopeo inspect printed the composed image's config
    assert re.search(r'"Env": \[\s*"PATH=/bin:/usr/bin:/sbin:/usr/sbin"', log), log
    layout = work / "hello-image"
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / entry["digest"].split(":")[1]).read_bytes())
    members: set[str] = set()
    for layer in manifest["layers"]:
        with tarfile.open(blobs / layer["digest"].split(":")[1]) as tar:
            members |= set(tar.getnames())
    # shell/hello: hello plus the members of the meta-package shell, linked into /
    assert {"bin/hello", "bin/sh", "bin/ls", "bin/ts", "bin/vi"} <= members, sorted(members)
    page = (work / "landing.html").read_text()
    assert f"docker pull 127.0.0.1:{port}/shell/" in page
    assert (work / "registry").is_dir()


def test_quickstart_block_is_found() -> None:
    """The extraction the test above relies on (cheap, no nix)."""
    script = quickstart_script()
    assert "stowaway serve" in script and "skopeo copy" in script
