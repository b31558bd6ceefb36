"""Belady's MIN: the offline optimum of demand caching, the yardstick for every policy.

`belady_min` replays a sequence of unit-size expert keys through one cache of
`capacity_experts` slots, evicting on each miss the cached key whose next use is farthest
in the future. Next-use indices are precomputed with numpy; the victim comes from a
max-heap with lazy deletion, so the whole replay is O(n log n).

`warm_start_loads` turns its (cold) loads into those of MIN starting from the best possible
cache content, the bound for a cache that was warmed before timing.
"""
from __future__ import annotations

import heapq

import numpy as np


def next_use(accesses: np.ndarray) -> np.ndarray:
    """int64 [n]: index of the next access to the same key after i, or n if none."""
    a = np.asarray(accesses, dtype=np.int64).ravel()
    n = a.size
    order = np.argsort(a, kind="stable")  # groups equal keys, each group in time order
    nxt = np.full(n, n, dtype=np.int64)
    same = a[order[1:]] == a[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def belady_min(accesses, capacity_experts: int) -> tuple[int, int]:
    """(hits, loads) of MIN over `accesses` (keys, e.g. layer * E + expert, in order)."""
    if capacity_experts < 1:
        raise ValueError(f"belady_min: capacity_experts must be >= 1, got {capacity_experts}")
    a = np.asarray(accesses, dtype=np.int64).ravel()
    nxt = next_use(a).tolist()
    cached: dict[int, int] = {}  # key -> its next use (the heap may hold stale entries)
    heap: list[tuple[int, int]] = []  # (-next use, key)
    hits = loads = 0
    for i, key in enumerate(a.tolist()):
        if key in cached:
            hits += 1
        else:
            loads += 1
            if len(cached) >= capacity_experts:
                while True:
                    neg, victim = heapq.heappop(heap)
                    if cached.get(victim) == -neg:
                        del cached[victim]
                        break
        cached[key] = nxt[i]
        heapq.heappush(heap, (-nxt[i], key))
    return hits, loads


def warm_start_loads(cold_loads: int, capacity_experts: int, distinct_keys: int) -> int:
    """MIN's loads when the cache may start with any content, from its loads from empty.

    A cold MIN's first `capacity` misses are the first distinct keys, which fill the cache
    without evicting: starting with them saves those loads. No start saves more: a cold run
    can load a warm run's initial content lazily, at its first use, for at most `capacity`
    extra loads. (Tested by brute force over every initial content.)"""
    return max(0, cold_loads - min(capacity_experts, distinct_keys))
