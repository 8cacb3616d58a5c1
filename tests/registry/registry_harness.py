"""The registry on a loopback port in a background thread (its own event loop),
with a raw HTTP helper that sends request paths exactly as given."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from dataclasses import dataclass

from stowaway.registry.app import RunningServer, make_app, start
from stowaway.registry.config import RegistryConfig
from stowaway.registry.resolver import ManifestResolver
from stowaway.registry.storage_api import Storage


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def code(self) -> str:
        return str(json.loads(self.body)["errors"][0]["code"])


class Server:
    """A running registry; ``request`` sends the path bytes exactly as given."""

    port: int
    host: str  # 127.0.0.1:PORT

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
        self._failure: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self._running = self.loop.run_until_complete(start(config, self.app))
            except BaseException as err:
                self._failure = err
                return
            finally:
                ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10), "registry did not start"
        if self._failure is not None:
            self.loop.close()
            raise self._failure
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
        return http_request(self.port, method, path, body, headers)

    def close(self) -> None:
        assert self._running is not None
        asyncio.run_coroutine_threadsafe(self._running.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> Reply:
    """One request on a fresh loopback connection (a registry in this process or not)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()
