"""`stowaway pull` names images as Docker does and talks to the registry's API host,
and its hints name its own flags. No containerd needed: these fail before it is used."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from runtime_helpers import SRC

from stowaway.runtime import pull as pull_module
from stowaway.runtime.containerd_client import ContainerdClient


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    ("ref", "repo"),
    [
        ("busybox", "library/busybox"),
        ("docker.io/busybox:1", "library/busybox"),
        ("index.docker.io/library/busybox", "library/busybox"),
        ("docker.io/me/app", "me/app"),
    ],
)
def test_pull_of_a_docker_hub_name_asks_registry_1(
    ref: str, repo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts: list[str] = []

    class Spy:
        def __init__(self, host: str, **_: object) -> None:
            hosts.append(host)
            raise _Stop

    monkeypatch.setattr(pull_module, "RegistryClient", Spy)
    client = ContainerdClient("/nonexistent.sock", "x")
    try:
        with pytest.raises(_Stop):
            pull_module.pull_image(ref, client)
    finally:
        client.close()
    assert hosts == ["registry-1.docker.io"]


@pytest.fixture()
def plain_http_port() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_pull_tls_hint_names_plain_http(plain_http_port: int) -> None:
    code = "from stowaway.cli import main; main()"
    r = subprocess.run(
        [sys.executable, "-c", code, "pull", "--containerd", "/nonexistent.sock",
         f"127.0.0.1:{plain_http_port}/app:1"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "hint: for a plain-HTTP registry pass --plain-http" in r.stderr
    assert "--dest-tls-verify" not in r.stderr
