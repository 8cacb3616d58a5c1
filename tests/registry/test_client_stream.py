"""RegistryClient.open_stream against real HTTP servers: bearer re-auth after a token
expires, redirects to another origin without credentials, retries, clean errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stowaway.distribution.client import RegistryClient
from stowaway.errors import RegistryError

BLOB = bytes(range(256)) * 5000  # > 1 MiB: read in chunks


class _State:
    def __init__(self) -> None:
        self.tokens = 0
        self.store_tokens = 0  # tokens the blob store's own realm handed out
        self.store_hits: list[str | None] = []  # Authorization seen by the blob store
        self.store_failures = 1  # 503s the blob store answers first
        self.store_port = 0
        self.registry_port = 0


def _serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture()
def servers() -> Iterator[_State]:
    st = _State()

    class Registry(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes = b"", **headers: str) -> None:
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k.replace("_", "-"), v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            realm = f'Bearer realm="http://127.0.0.1:{st.registry_port}/token",service="t"'
            if self.path.startswith("/token"):
                st.tokens += 1
                self._send(200, json.dumps({"token": f"t{st.tokens}"}).encode())
            elif self.path == "/v2/":
                self._send(401, b"{}", WWW_Authenticate=realm)
            elif self.path.startswith("/v2/r/blobs/"):
                if self.headers.get("Authorization") != "Bearer t2":  # t1 has "expired"
                    self._send(401, b'{"errors":[]}', WWW_Authenticate=realm)
                elif self.path.endswith("missing"):
                    loc = f"http://127.0.0.1:{st.store_port}/gone?sig=SECRET"
                    self._send(307, Location=loc)
                elif self.path.endswith("foreign"):
                    self._send(307, Location=f"http://127.0.0.1:{st.store_port}/private")
                else:
                    loc = f"http://127.0.0.1:{st.store_port}/blob?sig=SECRET"
                    self._send(307, Location=loc)
            else:
                self._send(404)

    class Store(Registry):
        def do_GET(self) -> None:
            st.store_hits.append(self.headers.get("Authorization"))
            if self.path.startswith("/token"):  # the store's own token server
                st.store_tokens += 1
                self._send(200, json.dumps({"token": "store"}).encode())
            elif self.path.startswith("/private"):
                realm = f'Bearer realm="http://127.0.0.1:{st.store_port}/token"'
                self._send(401, b"{}", WWW_Authenticate=realm)
            elif self.path.startswith("/gone"):
                self._send(404, b"no such object")
            elif st.store_failures:
                st.store_failures -= 1
                self._send(503, b"busy")
            else:
                self._send(200, BLOB)

    reg, store = _serve(Registry), _serve(Store)
    st.registry_port, st.store_port = reg.server_address[1], store.server_address[1]
    try:
        yield st
    finally:
        for s in (reg, store):
            s.shutdown()
            s.server_close()


def _client(st: _State) -> RegistryClient:
    c = RegistryClient(f"127.0.0.1:{st.registry_port}", tls_verify=False)
    c.ping()
    c.authorize(["repository:r:pull"])
    return c


def test_stream_reauths_redirects_and_retries(servers: _State) -> None:
    c = _client(servers)
    try:
        with c.open_stream(c.url("/v2/r/blobs/sha256:abc")) as f:
            got = b"".join(iter(lambda: f.read(1 << 20), b""))
    finally:
        c.close()
    assert got == BLOB
    assert servers.tokens == 2  # the first token was refused: fetched afresh once
    assert servers.store_hits == [None, None]  # 503 retried; no credentials to the store


def test_stream_errors_name_the_url_without_its_query(servers: _State) -> None:
    c = _client(servers)
    try:
        with pytest.raises(RegistryError) as e:
            c.open_stream(c.url("/v2/r/blobs/missing"))
    finally:
        c.close()
    assert f"127.0.0.1:{servers.store_port}/gone" in str(e.value)
    assert "SECRET" not in str(e.value)


def test_a_401_from_another_origin_never_gets_our_credentials(servers: _State) -> None:
    """A redirect target answering 401 with its own Bearer realm is an error: adopting
    its challenge would send our credentials to that realm on the next request."""
    c = RegistryClient(f"127.0.0.1:{servers.registry_port}", tls_verify=False, creds=("u", "p"))
    c.ping()
    c.authorize(["repository:r:pull"])
    blob = c.url("/v2/r/blobs/sha256:abc")
    try:
        for _ in range(2):  # before: a valid token, so the store's 401 is the first one
            with c.open_stream(blob) as f:  # after: our own realm still works
                assert b"".join(iter(lambda: f.read(1 << 20), b"")) == BLOB
            with pytest.raises(RegistryError, match="/private"):
                c.open_stream(c.url("/v2/r/blobs/foreign"))
    finally:
        c.close()
    assert servers.store_tokens == 0
    assert set(servers.store_hits) == {None}  # no Authorization ever reached the store
