"""Connection limits and time-outs aiohttp does not have.

aiohttp keeps a connection whose request headers never finish (or that never
sends a byte) open forever, so a few thousand half-open connections use up the
process's file descriptors and nobody else is served. ``ConnectionGuard`` wraps
the server's protocol factory:

- a connection outside a request handler (headers not complete yet, or idle
  between keep-alive requests) is aborted ``header_timeout`` seconds after it
  opened or its last response was sent, however slowly it trickles bytes;
- at most ``max_connections`` are open; a new one evicts the one idle longest,
  and is refused only when every open connection is inside a handler.

Pauses in request bodies are the API's to time out (``body_timeout``): only the
handler knows whether it waits for the client or for a build.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass
class _Conn:
    since: float  # when the wait for a request's headers began
    busy: int = 0  # requests of this connection inside a handler


class ConnectionGuard:
    def __init__(self, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        #: insertion order: oldest first
        self._open: dict[asyncio.BaseTransport, _Conn] = {}

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _GuardedProtocol(self, inner())

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        if len(self._open) >= self.max_connections:
            idle = [t for t, c in self._open.items() if not c.busy]
            if not idle:
                return False
            oldest = min(idle, key=lambda t: self._open[t].since)
            self.drop(oldest)
        self._open[transport] = _Conn(time.monotonic())
        return True

    def drop(self, transport: asyncio.BaseTransport) -> None:
        if self._open.pop(transport, None) is not None and isinstance(
            transport, asyncio.WriteTransport
        ):
            transport.abort()

    def forget(self, transport: asyncio.BaseTransport) -> None:
        self._open.pop(transport, None)

    @contextlib.contextmanager
    def busy(self, transport: asyncio.BaseTransport | None) -> Iterator[None]:
        """Around a request's handling and response: not idle meanwhile."""
        conn = self._open.get(transport) if transport is not None else None
        if conn is None:
            yield
            return
        conn.busy += 1
        try:
            yield
        finally:
            conn.busy -= 1
            conn.since = time.monotonic()

    def sweep(self) -> None:
        """Abort the connections that waited too long for headers."""
        cutoff = time.monotonic() - self.header_timeout
        for transport in [t for t, c in self._open.items() if not c.busy and c.since < cutoff]:
            self.drop(transport)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self.header_timeout / 4, 1.0))
            self.sweep()


class _GuardedProtocol(asyncio.Protocol):
    """Passes everything to aiohttp's protocol, telling the guard of its life."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.BaseTransport | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._admitted = self._guard.admit(transport)
        if not self._admitted:
            assert isinstance(transport, asyncio.WriteTransport)
            transport.abort()
            return
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            assert self._transport is not None
            self._guard.forget(self._transport)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
