"""Horizon bound: how many tokens of exact future routing a demand cache needs to come near Belady.

The model is plain demand caching with no timing. The access sets are the layer visits the
simulator makes (`policies.simulator.visit_sequence`): one per decode row and MoE layer, and
with prefill a prefill pass's union in chunks of top_k. One cache of `capacity` unit-size
experts, shared by all layers and empty at the start, serves them. A miss loads the expert
(one load). When the cache is full, it first evicts a cached expert that the current visit
does not need.

The h-token rule: at a visit of layer l in forward pass t, the rule knows every visit up to
and including layer l of pass t + h (its window). Cached experts with a next use in the
window are ranked by that exact next use, and the furthest goes first, as in Belady's MIN.
Experts with no use in the window go before any of them, in the order of the tie-break:
"lru" (least recently used first) or "freq" (fewest visits so far, then LRU). An expert
enters the window when the window's end reaches its next use. It leaves only when it is
accessed again. h = 0 knows only the current layer's routing (a prefill pass's whole
union), so with "lru" it is plain LRU on decode rows. `horizon=None` (a window over the
whole trace) is Belady under the same never-evict-what-the-visit-needs constraint. That can
be slightly more than `policies.cache.belady.belady_min` (the project's yardstick), which
may evict a key the current visit still needs.

Why measure it: inside the window the rule ranks experts exactly as Belady does, so all of
its remaining gap to Belady comes from how it orders the experts outside the window. Its
loads say how far exact knowledge of the next h tokens takes a demand cache that falls back
on LRU or frequency order. It is not a bound either way: another out-of-window order, or
prefetching, may do better with less foresight (the default policy beats the 8-token window
on llama4 at 25%), and the rule itself is not monotone in h (more foresight can move an
eviction that happens to cost a load later).

Cost: O(n log n) for n accesses. Next uses come from `policies.cache.belady.next_use` (one
stable sort of the keys). The candidates sit in heaps with lazy deletion: a heap entry
carries the access index it was pushed for, and it is skipped once the expert has been
accessed again or evicted.
"""
from __future__ import annotations

import dataclasses
import heapq
from collections import OrderedDict

import numpy as np

from .cache.belady import next_use
from .simulator import layer_visits
from .traces import Trace, decode_steps

TIE_BREAKS = ("lru", "freq")
_NEVER = 1 << 62  # the "next use slot" of a key never used again


@dataclasses.dataclass(frozen=True, eq=False)
class Visits:
    """A trace's layer visits in `visit_sequence` order, as flat arrays.

    keys        int64 [n]: layer * E + expert of each access, visit after visit (the order
                `access_sequence` gives, so Belady can run on it directly);
    starts      int64 [V + 1]: visit v's accesses are keys[starts[v]:starts[v + 1]];
    slot        int64 [V]: pass * L + layer of visit v, the clock the window is measured on
                (several visits share a slot only in a prefill pass, one per top_k chunk);
    next_use    int64 [n]: index of the next access to the same key (n if none);
    next_slot   int64 [n]: the slot of that next access (`_NEVER` if none).
    """

    num_layers: int
    keys: np.ndarray
    starts: np.ndarray
    slot: np.ndarray
    next_use: np.ndarray
    next_slot: np.ndarray

    @property
    def widest(self) -> int:
        """The most accesses one visit makes: the least capacity the set constraint allows."""
        return int(np.diff(self.starts).max(initial=0))


def trace_visits(trace: Trace, include_prefill: bool = False) -> Visits:
    """The layer visits `policies.simulator.simulate` makes over `trace`, tagged with their slot."""
    L, E = trace.num_layers, trace.num_experts
    keys: list[int] = []
    starts: list[int] = [0]
    slots: list[int] = []
    for p, step in enumerate(decode_steps(trace, include_prefill=include_prefill)):
        for layer, ids in layer_visits(step, trace.top_k):
            keys.extend(layer * E + e for e in ids)
            starts.append(len(keys))
            slots.append(p * L + layer)
    key_arr = np.asarray(keys, dtype=np.int64)
    start_arr = np.asarray(starts, dtype=np.int64)
    slot_arr = np.asarray(slots, dtype=np.int64)
    nxt = next_use(key_arr)
    access_slot = np.repeat(slot_arr, np.diff(start_arr))
    return Visits(num_layers=L, keys=key_arr, starts=start_arr, slot=slot_arr, next_use=nxt,
                  next_slot=np.append(access_slot, _NEVER)[nxt])


def horizon_loads(visits: Visits, capacity: int, horizon: int | None, tie_break: str = "lru") -> int:
    """Loads of the h-token rule (module docstring) with `capacity` experts; `horizon=None`
    gives Belady under the set constraint (the tie-break is then irrelevant)."""
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"unknown tie-break {tie_break!r}; valid: {', '.join(sorted(TIE_BREAKS))}")
    if horizon is not None and horizon < 0:
        raise ValueError(f"horizon must be >= 0 tokens (or None for the whole trace), got {horizon}")
    if capacity < max(1, visits.widest):
        raise ValueError(f"capacity {capacity} experts is below the widest visit ({visits.widest} experts), "
                         f"which must fit at once")
    ahead = _NEVER if horizon is None else horizon * visits.num_layers  # in slots
    keys, nxt, nslot = visits.keys.tolist(), visits.next_use.tolist(), visits.next_slot.tolist()
    starts, slots = visits.starts.tolist(), visits.slot.tolist()
    use_lru = tie_break == "lru"
    # state[key] = (version, in_window) for each cached key that the current visit does not
    # hold; version = index of its last access. Heap entries carry the version; a stale one
    # (the key was accessed again or evicted since) is skipped when popped.
    state: dict[int, tuple[int, bool]] = {}
    in_heap: list[tuple[int, int, int]] = []  # (-next use, key, version): furthest next use on top
    out_lru: OrderedDict[int, int] = OrderedDict()  # lru: key -> version, least recently used first
    out_heap: list[tuple[int, int, int]] = []  # freq: (visits so far, version, key); version breaks ties: LRU
    count: dict[int, int] = {}  # freq: key -> visits that needed it so far
    enter: dict[int, list[tuple[int, int]]] = {}  # slot -> [(key, version)]: the window reaches their next use

    def evict() -> None:
        if use_lru:
            if out_lru:
                del state[out_lru.popitem(last=False)[0]]
                return
        else:
            while out_heap:
                _, ver, key = heapq.heappop(out_heap)
                if state.get(key) == (ver, False):
                    del state[key]
                    return
        while True:  # every candidate has a use in the window: the furthest one goes, as in MIN
            _, key, ver = heapq.heappop(in_heap)
            if state.get(key) == (ver, True):
                del state[key]
                return

    loads = 0
    current = -1
    for v, s in enumerate(slots):
        if s != current:  # the window's end moves to slot s + ahead: those next uses become known
            current = s
            for key, ver in enter.pop(s, ()):
                if state.get(key) == (ver, False):
                    state[key] = (ver, True)
                    if use_lru:
                        del out_lru[key]
                    heapq.heappush(in_heap, (-nxt[ver], key, ver))
        a, b = starts[v], starts[v + 1]
        # The visit's own cached experts stop being candidates: it needs them now. A key
        # repeated within the visit is handled at its last occurrence (next use inside it).
        held = misses = 0
        for i in range(a, b):
            if nxt[i] < b:
                continue
            entry = state.pop(keys[i], None)
            if entry is None:
                misses += 1
            else:
                held += 1
                if use_lru and not entry[1]:
                    del out_lru[keys[i]]
        loads += misses
        for _ in range(len(state) + held + misses - capacity):  # room for the misses (none if it fits)
            evict()
        for i in range(a, b):
            if nxt[i] < b:
                continue
            key = keys[i]
            if not use_lru:
                count[key] = count.get(key, 0) + 1
            ns = nslot[i]
            if ns <= s + ahead:
                state[key] = (i, True)
                heapq.heappush(in_heap, (-nxt[i], key, i))
            else:
                state[key] = (i, False)
                if use_lru:
                    out_lru[key] = i
                else:
                    heapq.heappush(out_heap, (count[key], i, key))
                if ns != _NEVER:
                    enter.setdefault(ns - ahead, []).append((key, i))
    return loads
