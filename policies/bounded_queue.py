"""A bounded, never-blocking queue of `Activation` events that coalesces when full.

The bound counts EVENTS (one `Activation` = one layer visit), not bytes or experts.

`put` never blocks and never awaits: when the queue is full, room is made by, in order,
  1. merging the new event into the newest queued one when both are for the same layer
     and the same token (the union of their experts, newest first; counted `coalesced`);
  2. dropping the oldest *stale* event: one whose layer has a newer event in the queue,
     so its layer has already been passed again (counted `dropped`);
  3. dropping the oldest event (counted `dropped`).
The new event itself is always kept: it carries the newest information.

Why losing events is acceptable: the pipeline serves demand misses itself (step 3 of
"The flow of one decode step" in docs/architecture.md), so an event that never reaches the policy
only costs prediction quality, never correctness. It is never lost silently: every
merge and drop is counted, and `received == processed + coalesced + dropped + pending`
holds at all times (the owner counts `processed`).

Single-threaded: call every method from the event loop's thread (the actor offers a
thread-safe publish that hops onto the loop first).
"""
from __future__ import annotations

import asyncio
import collections

from .events import Activation


def merge_events(old: Activation, new: Activation) -> Activation:
    """One event carrying both visits of the same (layer, token): new's experts first.

    The merged visit is no wider than the wider of the two: cache policies size their
    budgets for one layer's top-k working set, so a merge must not look like a router
    that chose more than k experts. Old experts only fill the slots `new` left free.
    Router weights survive only when both events carry them (otherwise the pairs would
    not line up); later-layer hints are merged with `new` winning.
    """
    assert old.layer == new.layer, (old.layer, new.layer)
    room = max(len(old.experts), len(new.experts)) - len(new.experts)
    extra = [i for i, e in enumerate(old.experts) if e not in new.experts][:room]
    experts = new.experts + tuple(old.experts[i] for i in extra)
    weights = None
    if new.weights is not None and old.weights is not None:
        weights = new.weights + tuple(old.weights[i] for i in extra)
    hint = new.hint
    if old.hint is not None:
        hint = {**old.hint, **(new.hint or {})}
    return Activation(layer=new.layer, experts=experts, weights=weights,
                      token_id=new.token_id, hint=hint, time=new.time, rows=new.rows)


class CoalescingQueue:
    """FIFO of at most `maxsize` events; `put` makes room instead of blocking (see module doc)."""

    def __init__(self, maxsize: int):
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"queue size must be an int >= 1 (counted in events); got {maxsize!r}")
        self.maxsize = maxsize
        self._items: collections.deque[Activation] = collections.deque()
        self._per_layer: collections.Counter[int] = collections.Counter()
        self._nonempty = asyncio.Event()
        self.received = 0
        self.coalesced = 0
        self.dropped = 0
        self.peak = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: Activation) -> None:
        """Enqueue `event` now, merging or dropping older events if the queue is full."""
        self.received += 1
        if len(self._items) < self.maxsize:
            self._append(event)
        elif not self._coalesce_into_tail(event):
            self._drop_one()
            self._append(event)
        self.peak = max(self.peak, len(self._items))
        assert len(self._items) <= self.maxsize
        self._nonempty.set()

    def get_nowait(self) -> Activation | None:
        """The oldest event, or None when empty ("empty" is a value, not an exception)."""
        if not self._items:
            return None
        event = self._items.popleft()
        self._forget(event.layer)
        if not self._items:
            self._nonempty.clear()
        return event

    async def get(self) -> Activation:
        """The oldest event, waiting until there is one (cancellable)."""
        while not self._items:
            await self._nonempty.wait()
        event = self.get_nowait()
        assert event is not None
        return event

    # -- making room ------------------------------------------------------------------

    def _coalesce_into_tail(self, event: Activation) -> bool:
        tail = self._items[-1]
        if tail.layer != event.layer or tail.token_id != event.token_id:
            return False
        self._items[-1] = merge_events(tail, event)
        self.coalesced += 1
        return True

    def _drop_one(self) -> None:
        # A stale event is one whose layer has a newer event queued behind it; the first
        # such event from the front is the oldest stale one. O(maxsize) only when full.
        for index, queued in enumerate(self._items):
            if self._per_layer[queued.layer] >= 2:
                break
        else:
            index = 0
        victim = self._items[index]
        del self._items[index]
        self._forget(victim.layer)
        self.dropped += 1

    def _append(self, event: Activation) -> None:
        self._items.append(event)
        self._per_layer[event.layer] += 1

    def _forget(self, layer: int) -> None:
        self._per_layer[layer] -= 1
        if self._per_layer[layer] <= 0:
            del self._per_layer[layer]
