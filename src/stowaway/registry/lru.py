"""A bounded, thread-safe LRU map whose entries may expire.

Every cache keyed by something a client chose (a package name, a store hash part)
is one of these: a client asking for ten million names costs at most
``max_entries`` entries, the least recently used going first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    def __init__(
        self,
        max_entries: int,
        ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("a bounded cache needs room for at least one entry")
        self.max_entries = max_entries
        #: seconds an entry lives (None: until evicted)
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        """The value, or None when absent or expired (an expired entry is dropped)."""
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            if self.ttl is not None and self._clock() >= hit[0]:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return hit[1]

    def put(self, key: K, value: V) -> None:
        deadline = self._clock() + self.ttl if self.ttl is not None else 0.0
        with self._lock:
            self._items[key] = (deadline, value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
