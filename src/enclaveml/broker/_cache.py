"""A small in-process cache for the broker store's hot lookups (apps, policies per key).

Entries expire after the time-to-live given when they are stored; the cache is bounded
(cleared when full). ``invalidate`` bumps a generation: a value read from the database
*before* an invalidation (a reader whose transaction began before the change committed)
is not stored afterwards, so a committed change is never hidden by a stale entry put in
just after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["ExpiringCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._entries: dict[K, tuple[float, V]] = {}
        self._generation = 0

    def get(self, key: K) -> V | None:
        """The live value for ``key``, or None."""
        found = self._entries.get(key)
        return found[1] if found is not None and found[0] > time.monotonic() else None

    @property
    def generation(self) -> int:
        """Read before the database read whose result is then ``put``."""
        return self._generation

    def put(self, key: K, value: V, ttl_s: float, generation: int) -> None:
        """Store ``value`` unless the cache was invalidated since ``generation`` was read."""
        with self._lock:
            if generation != self._generation:
                return
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[key] = (time.monotonic() + ttl_s, value)

    def invalidate(self, key: K | None = None) -> None:
        """After a committed change: drop ``key`` (or everything) and void reads in flight."""
        with self._lock:
            self._generation += 1
            if key is None:
                self._entries.clear()
            else:
                self._entries.pop(key, None)
