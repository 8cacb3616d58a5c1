"""Slow and idle clients against ``stowaway serve --no-compose`` as a real process
with ``ulimit -n 1024``: half-open connections cannot starve everybody else."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import free_port

FD_LIMIT = 1024
IDLE = 1500  # more than the process has descriptors
HEADER_TIMEOUT = 2.0


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    config = tmp_path / "registry.toml"
    config.write_text(
        f'listen = "127.0.0.1:{port}"\nstorage = "{tmp_path / "store"}"\n'
        f"header_timeout = {HEADER_TIMEOUT}\nbody_timeout = {HEADER_TIMEOUT}\n"
        "access_log = false\n"  # max_connections: the default, meant for ulimit -n 1024
    )
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stowaway", "serve", "--no-compose", "--config", str(config)],
            stderr=err,
            preexec_fn=_low_fd_limit,
        )
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"registry did not start: {(tmp_path / 'stderr').read_text()}")
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(20)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_idle_and_half_header_connections_do_not_starve_others(
    registry: tuple[int, subprocess.Popen[bytes]],
) -> None:
    port, proc = registry
    idle: list[socket.socket] = []
    try:
        for i in range(IDLE):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:  # headers that never finish
                s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
            s.setblocking(False)
            idle.append(s)
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=10) as r:
            assert r.status == 200 and r.read() == b"{}"
        assert time.monotonic() - started < HEADER_TIMEOUT
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert fds < FD_LIMIT - 100, f"the server holds {fds} descriptors"
        # a body that stops half-way: 408, the connection closed
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v2/a/blobs/uploads/?digest=sha256:" + b"0" * 64 + b" HTTP/1.1\r\n"
                      b"Host: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)  # fmt: skip
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408 ") and b"no request body data" in reply
        deadline = time.monotonic() + HEADER_TIMEOUT + 10
        while time.monotonic() < deadline and not all(_closed(s) for s in idle):
            time.sleep(0.2)
        assert all(_closed(s) for s in idle), "idle connections were left open"
        assert proc.poll() is None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=10) as r:
            assert r.status == 200
    finally:
        for s in idle:
            s.close()
