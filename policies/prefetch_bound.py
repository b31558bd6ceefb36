"""What prefetching with perfect knowledge of the future could reach, in the simulator's time model.

The replay's oracle bound, max(compute, Belady's loads / link bandwidth) per token, assumes
every copy overlaps compute. `aggressive_prefetch` schedules the copies of a known sequence
of layer visits with the "aggressive" rule of offline prefetching and caching (Cao, Felten,
Karlin and Li, 1995): whenever the link is free, fetch the next missing expert of the future,
evicting the cached one used farthest ahead, if that one is used after the fetched one; else
wait for compute to move on. A visit computes once its experts have arrived. With no compute
time it makes Belady's choices; with compute, it is a schedule an offline prefetcher can
really run, so it says how much of the oracle bound is reachable at all.

    aggressive_prefetch(visits, capacity, copy_s, compute_s) -> PrefetchSchedule

Keys are ints (e.g. layer * E + expert); unit-size experts, one VRAM cache of `capacity`
slots, one link, RAM warm (every copy starts from RAM).
"""
from __future__ import annotations

import heapq
from collections import defaultdict

import msgspec

_NEVER = 1 << 62


class PrefetchSchedule(msgspec.Struct, frozen=True):
    seconds: float  # until the last visit's compute ends
    loads: int  # copies made
    stall_seconds: float  # compute waiting for copies


def aggressive_prefetch(visits, capacity: int, copy_s: float, compute_s: float) -> PrefetchSchedule:
    """Schedule `visits` (each a collection of distinct keys, in order) as described above."""
    visits = [tuple(v) for v in visits]
    widest = max((len(v) for v in visits), default=0)
    if capacity < max(1, widest):
        raise ValueError(f"aggressive_prefetch: capacity {capacity} is below the widest visit ({widest} experts)")
    if copy_s < 0 or compute_s < 0:
        raise ValueError(f"aggressive_prefetch: times must be >= 0, got copy {copy_s}, compute {compute_s}")
    uses: dict[int, list[int]] = defaultdict(list)
    for i, v in enumerate(visits):
        for k in v:
            uses[k].append(i)
    seen = dict.fromkeys(uses, 0)  # per key: index into uses[k] of its next use at or after the cursor
    refs = [(i, k) for i, v in enumerate(visits) for k in v]

    def next_use(k, cursor: int) -> int:
        u, j = uses[k], seen[k]
        while j < len(u) and u[j] < cursor:
            j += 1
        seen[k] = j
        return u[j] if j < len(u) else _NEVER

    arrive: dict[int, float] = {}  # cached keys -> arrival time
    far: list[tuple[int, int]] = []  # max-heap of (-next use, key); stale entries skipped
    scan = 0  # refs[:scan] are cached or consumed: the next missing reference is at or after it
    link = comp = stall = 0.0  # when the link is next free; when the last visit's compute ends
    loads = 0
    for cur, need in enumerate(visits):
        # Decisions below take visit `cur` as the present, so none starts before visit cur - 1
        # ends (its experts stay pinned until then); earlier ones were tried with it as present.
        link = max(link, comp)
        while True:
            if all(k in arrive for k in need) and link >= max(comp, *(arrive[k] for k in need)) + compute_s:
                break  # the link frees only after this visit: decide with the next one as present
            while scan < len(refs) and (refs[scan][0] < cur or refs[scan][1] in arrive):
                scan += 1
            if scan == len(refs):
                break  # nothing left to fetch
            pos, key = refs[scan]
            if len(arrive) >= capacity:
                # One link: at `link` every copy has landed, so any cached key may go.
                victim = _farthest(far, arrive, cur, next_use)
                if next_use(victim, cur) <= pos:
                    # Never for this visit's own expert: at most capacity - 1 cached keys serve it.
                    break  # every cached key is needed first: wait for compute to move on
                del arrive[victim]
            loads += 1
            link += copy_s
            arrive[key] = link
            heapq.heappush(far, (-next_use(key, cur), key))
        start = max(comp, max((arrive[k] for k in need), default=comp))
        stall += start - comp
        comp = start + compute_s
        for k in need:  # their next use moved past this visit
            heapq.heappush(far, (-next_use(k, cur + 1), k))
    return PrefetchSchedule(seconds=comp, loads=loads, stall_seconds=stall)


def _farthest(far, arrive, cursor: int, next_use) -> int:
    """The cached key used farthest ahead of `cursor` (left in the heap: valid until evicted)."""
    while True:
        neg, k = far[0]
        if k in arrive and -neg == next_use(k, cursor):
            return k
        heapq.heappop(far)  # evicted, or its next use moved on: a fresher entry exists
