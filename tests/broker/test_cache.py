"""The store's expiring cache: a value read before an invalidation is never stored after it."""

from __future__ import annotations

import time

from enclaveml.broker._cache import ExpiringCache


def test_a_read_that_began_before_an_invalidation_is_not_cached() -> None:
    cache: ExpiringCache[str, str] = ExpiringCache(8)
    generation = cache.generation  # a reader starts its database read
    cache.invalidate("a-1")  # a disable commits meanwhile
    cache.put("a-1", "enabled (stale)", 60, generation)
    assert cache.get("a-1") is None
    cache.put("a-1", "disabled", 60, cache.generation)
    assert cache.get("a-1") == "disabled"


def test_entries_expire_and_the_cache_is_bounded() -> None:
    cache: ExpiringCache[int, int] = ExpiringCache(2)
    cache.put(1, 1, 0.01, cache.generation)
    time.sleep(0.02)
    assert cache.get(1) is None
    for key in (2, 3, 4):
        cache.put(key, key, 60, cache.generation)
    assert [cache.get(k) for k in (2, 3, 4)] == [None, 3, 4]  # full (expired 1 and 2) when 3 came: cleared
