"""Registry test harness: the real server on a loopback port in a background
thread (its own event loop), a raw HTTP helper, and real OCI test images."""

from __future__ import annotations

import asyncio
import http.client
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from stowaway.registry.app import RunningServer, make_app, start
from stowaway.registry.config import RegistryConfig
from stowaway.registry.resolver import ManifestResolver
from stowaway.registry.storage import FilesystemStorage, Storage


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def code(self) -> str:
        import json

        return str(json.loads(self.body)["errors"][0]["code"])


class Server:
    """A running registry; ``request`` sends the path bytes exactly as given."""

    def __init__(
        self,
        config: RegistryConfig,
        storage: Storage,
        resolver: ManifestResolver | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.loop = asyncio.new_event_loop()
        self.app = make_app(config, storage=storage, resolver=resolver)
        ready = threading.Event()
        self._running: RunningServer | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self._running = self.loop.run_until_complete(start(config, self.app))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10), "registry did not start"
        assert self._running is not None
        self.port = self._running.port
        self.host = f"127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Reply(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def close(self) -> None:
        assert self._running is not None
        asyncio.run_coroutine_threadsafe(self._running.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


@pytest.fixture()
def make_server(tmp_path: Path) -> Iterator[object]:
    servers: list[Server] = []

    def factory(
        storage: Storage | None = None,
        resolver: ManifestResolver | None = None,
        **options: object,
    ) -> Server:
        root = tmp_path / f"store{len(servers)}"
        config = replace(RegistryConfig(listen="127.0.0.1:0", storage=str(root)), **options)  # type: ignore[arg-type]
        server = Server(config, storage or FilesystemStorage(root), resolver)
        servers.append(server)
        return server

    yield factory
    for s in servers:
        s.close()


@pytest.fixture()
def server(make_server: object) -> Server:
    return make_server()  # type: ignore[operator,no-any-return]


@pytest.fixture(scope="session")
def oci_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real OCI image layout (``<dir>:t``) holding /bin/busybox."""
    if shutil.which("umoci") is None or not Path("/bin/busybox").exists():
        pytest.fail("umoci and busybox-static are needed (apt-get install umoci busybox-static)")
    layout = tmp_path_factory.mktemp("oci") / "layout"
    for cmd in (
        ["umoci", "init", "--layout", str(layout)],
        ["umoci", "new", "--image", f"{layout}:t"],
        ["umoci", "insert", "--image", f"{layout}:t", "/bin/busybox", "/bin/busybox"],
        ["umoci", "config", "--image", f"{layout}:t", "--config.cmd", "/bin/busybox"],
    ):
        subprocess.run(cmd, check=True, capture_output=True)
    return layout
