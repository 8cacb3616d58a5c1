"""The BuildKit gateway as the frontend sees it: the LLBBridge connection BuildKit hands
over on stdin/stdout, relayed to a private unix socket because grpcio only dials
addresses (fd 1 is then pointed at stderr so that no stray print can corrupt the HTTP/2
stream), and typed calls on the LLBBridge stub (``Gateway``). What to build is
``frontend``'s.

Imports stay within grpc, protobuf and the stdlib-only parts of stowaway: this module
runs on Debian's python3 inside the frontend image.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from stowaway.buildkit.pb import gateway, gateway_grpc
from stowaway.errors import StowawayError

__all__ = ["CacheImport", "FrontendError", "Gateway", "stdio_gateway"]

_CHUNK = 1 << 20
#: Concurrent ReadFile calls: enough to hide the round trips, few enough for BuildKit.
_READERS = 8
#: BuildKit's gRPC server accepts requests up to 4 MiB (grpc-go's default).
_MAX_REQUEST = 4 << 20


class FrontendError(StowawayError):
    """The gateway refused a request or the daemon lacks something we need."""


@dataclass(frozen=True)
class CacheImport:
    """A cache BuildKit may load results from: ``type`` ("registry", "local", …) + attrs."""

    type: str
    attrs: Mapping[str, str]


class _Relay:
    """Bytes between fd ``rfd``/``wfd`` and the one client of a private unix socket."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="stowaway-frontend-")
        self.path = os.path.join(self.dir, "gw.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.rfd, self.wfd = rfd, wfd
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.listener.close()
        threading.Thread(target=self._pump_in, args=(conn,), daemon=True).start()
        while data := conn.recv(_CHUNK):
            view = memoryview(data)
            while view:
                view = view[os.write(self.wfd, view) :]

    def _pump_in(self, conn: socket.socket) -> None:
        while data := os.read(self.rfd, _CHUNK):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        try:
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            pass


@dataclass
class Gateway:
    """Typed calls on the LLBBridge stub."""

    stub: Any
    #: Forwarded on solves of the build graph (not on reads of the client's files).
    caches: tuple[CacheImport, ...] = ()
    #: BuildKit takes ``CacheImports`` (cap "importcaches"); else registry refs only.
    typed_caches: bool = True

    def ping(self) -> tuple[set[str], set[str]]:
        pong = self.stub.Ping(gateway.PingRequest())
        return (
            {c.ID for c in pong.FrontendAPICaps if c.Enabled},
            {c.ID for c in pong.LLBCaps if c.Enabled},
        )

    def solve(self, definition: Any, use_caches: bool = False) -> str:
        """Solve ``definition``; the result's ref id ('' for an empty result).
        ``use_caches`` lets BuildKit load results from the imported caches."""
        size = definition.ByteSize()
        if size >= _MAX_REQUEST:
            raise FrontendError(
                f"the build graph marshals to {size} bytes, over BuildKit's 4 MiB request limit"
            )
        req = gateway.SolveRequest(Definition=definition, allowResultReturn=True)
        req.allowResultArrayRef = True
        for c in self.caches if use_caches else ():
            if self.typed_caches:
                req.CacheImports.add(Type=c.type, Attrs=c.attrs)
            elif c.type == "registry" and "ref" in c.attrs:
                req.ImportCacheRefsDeprecated.append(c.attrs["ref"])
        res = self.stub.Solve(req)
        which = res.result.WhichOneof("result") if res.HasField("result") else None
        if which == "ref":
            return str(res.result.ref.id)
        if which == "refDeprecated":
            return str(res.result.refDeprecated)
        return str(res.ref)

    def resolve_image_config(self, ref: str, platform: tuple[str, str]) -> tuple[str, bytes]:
        """The manifest digest and config of image ``ref`` (from its registry)."""
        req = gateway.ResolveImageConfigRequest(Ref=ref, LogName=f"[stowaway] resolve {ref}")
        req.Platform.OS, req.Platform.Architecture = platform
        res = self.stub.ResolveImageConfig(req)
        return str(res.Digest), bytes(res.Config)

    def read_file(self, ref: str, path: str) -> bytes:
        """The whole file, read in 1 MiB ranges (responses must stay under 4 MiB)."""
        out = bytearray()
        while True:
            req = gateway.ReadFileRequest(Ref=ref, FilePath=path)
            req.Range.Offset, req.Range.Length = len(out), _CHUNK
            data = self.stub.ReadFile(req).Data
            out += data
            if len(data) < _CHUNK:
                return bytes(out)

    def read_files(self, ref: str, paths: Sequence[str]) -> list[bytes]:
        """Several whole files, read concurrently over the one connection: each
        ``ReadFile`` is a round trip through BuildKit, and a graph has a .drv file per
        derivation (thousands in a real closure)."""
        if len(paths) < 2:
            return [self.read_file(ref, p) for p in paths]
        with ThreadPoolExecutor(max_workers=_READERS) as pool:
            return list(pool.map(lambda p: self.read_file(ref, p), paths))

    def ret(self, ref: str | None, metadata: Mapping[str, bytes], error: str | None) -> None:
        req = gateway.ReturnRequest()
        if error is not None:
            req.error.code, req.error.message = 2, error  # 2 = UNKNOWN
        else:
            req.result.ref.id = ref or ""
            for k, v in metadata.items():
                req.result.metadata[k] = v
        self.stub.Return(req)


@contextmanager
def stdio_gateway() -> Iterator[Gateway]:
    """The gateway BuildKit serves on fds 0/1, for the length of the ``with`` block;
    from here on fd 1 and ``sys.stdout`` are stderr."""
    rfd, wfd = os.dup(0), os.dup(1)
    os.dup2(2, 1)  # stray prints must never reach the gRPC stream
    sys.stdout = sys.stderr
    relay = _Relay(rfd, wfd)
    channel = grpc.insecure_channel(
        "unix:" + relay.path,
        options=[
            ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.max_send_message_length", _MAX_REQUEST),
        ],
    )
    try:
        yield Gateway(gateway_grpc.LLBBridgeStub(channel))
    finally:
        channel.close()
        relay.close()
