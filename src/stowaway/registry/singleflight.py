"""Keyed de-duplication of concurrent async work.

The first caller for a key runs the work; everyone who asks for the same key
while it runs awaits the same result (or exception). Nothing is cached after
completion: caching is the caller's business (the registry stores what a
resolver produced), single-flight only stops a thundering herd of first pulls
from composing the same image a hundred times.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Future[T]] = {}
        #: how many times work actually ran (for tests and metrics)
        self.runs = 0

    def __len__(self) -> int:
        return len(self._inflight)

    def __contains__(self, key: Hashable) -> bool:
        """Whether work for ``key`` is running (a ``do`` now would join it)."""
        return key in self._inflight

    async def do(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        fut = self._inflight.get(key)
        if fut is not None:
            # shield: one impatient waiter being cancelled must not cancel the work
            return await asyncio.shield(fut)
        task: asyncio.Task[T] = asyncio.ensure_future(self._run(key, work))
        self._inflight[key] = task
        return await asyncio.shield(task)

    async def _run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        self.runs += 1
        try:
            return await work()
        finally:
            del self._inflight[key]
