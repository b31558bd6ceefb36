"""Which expert occupies which fixed slot of a tier, and which slot a demand may take.

A slot is FREE, LOADING (bytes on their way) or READY. The scheduler changes these tables
under its own lock (from the event-loop thread and from the caller-thread fast path); the
recency order has a small lock of its own as well, since `touch` is cheap and frequent.
Victims come off the front of that order: no scan of every slot per miss.
"""
from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

FREE, LOADING, READY = 0, 1, 2
Key = tuple[int, int]  # (layer, expert)


@dataclass(eq=False)
class Slot:
    index: int
    key: Key | None = None
    state: int = FREE
    # VRAM: fetch sequence number that last handed its tensors to the caller; the slot may be
    # overwritten only behind a fence recorded by a later fetch (docs/architecture.md: no use-after-free).
    handed_seq: int = -1
    transfer: object | None = None  # VRAM: the copy filling it (Transfer); None once READY
    prior: object | None = None  # VRAM: a copy into this slot still in flight when it was re-taken
    users: int = 0  # RAM: H2D copies reading from it; it is not reusable while > 0
    reading: object | None = None  # RAM: the asyncio.Task reading it from disk
    read_id: int = 0  # RAM: the reader request in flight, and whether it is a demand read
    read_demand: bool = False
    upgrade: bool = False  # RAM: a demand asked to re-queue a prefetch read as demand
    waiters: list = field(default_factory=list)  # futures woken when it becomes READY (or fails)


class SlotTable:
    def __init__(self, num_slots: int, name: str):
        self.name = name
        self.slots = [Slot(i) for i in range(num_slots)]
        self.where: dict[Key, Slot] = {}
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._recency: OrderedDict[int, Slot] = OrderedDict()  # occupied slots, least recent first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.slots)

    def lookup(self, key: Key) -> Slot | None:
        return self.where.get(key)

    def free_count(self) -> int:
        return len(self._free)

    def take_free(self, key: Key) -> Slot | None:
        if not self._free:
            return None
        slot = self.slots[self._free.pop()]
        assert slot.state == FREE and slot.key is None
        slot.key, slot.state = key, LOADING
        self.where[key] = slot
        with self._lock:
            self._recency[slot.index] = slot
        return slot

    def release(self, slot: Slot) -> None:
        assert slot.state != FREE and slot.users == 0, (self.name, slot)
        del self.where[slot.key]
        with self._lock:
            del self._recency[slot.index]
        slot.key, slot.state, slot.transfer, slot.reading, slot.prior = None, FREE, None, None, slot.transfer
        self._free.append(slot.index)

    def touch(self, slot: Slot) -> None:
        """`slot` was just used: it becomes the last victim candidate."""
        with self._lock:
            self._recency.move_to_end(slot.index)

    def victims(self, evictable, n: int, *, in_flight: bool = False) -> list[Slot]:
        """Up to `n` distinct slots `lru_victim` would pick one after another (READY ones in
        recency order, then slots whose copy it could take over): nothing changes."""
        ready, filling = [], []
        with self._lock:
            for slot in self._recency.values():
                if len(ready) >= n:
                    break
                if slot.state == READY:
                    if evictable(slot):
                        ready.append(slot)
                elif len(filling) < n and _taking_over(slot, in_flight) and evictable(slot):
                    filling.append(slot)
        return (ready + filling)[:n]

    def lru_victim(self, evictable, *, in_flight: bool = False) -> Slot | None:
        """The least recently used READY slot that `evictable(slot)` allows; failing that, the
        least recently used one whose copy has finished but is not settled yet, or, with
        `in_flight`, whose copy is issued at all."""
        found = self.victims(evictable, 1, in_flight=in_flight)
        return found[0] if found else None


def _taking_over(slot: Slot, in_flight: bool) -> bool:
    """A filling slot may be re-taken when its copy has finished (the loop has not settled it
    yet) or, where copies into one slot are ordered on the device (`in_flight`), once issued."""
    return slot.transfer is not None and (in_flight or slot.transfer.done())


class FenceLog:
    """The fences of recent fetches, by fetch sequence number. A VRAM slot handed out by fetch
    s may be refilled behind the first fence recorded after s: the caller's stream is past
    every use of what fetch s handed out, and little else, so the refill starts as early as
    it can (the latest fence would order it after all compute enqueued since).

    Keeps between `keep` and 2 * `keep` fences; a fetch older than the oldest kept gets the
    oldest, later than it needs but safe."""

    def __init__(self, keep: int = 256):
        self.keep = keep
        self._seqs: list[int] = []
        self._fences: list = []

    def note(self, fence, seq: int) -> None:
        """Record fetch `seq`'s fence (the copy engine's; on the CPU an always-complete one).
        None, or a fetch not after the latest, records nothing."""
        if fence is None or (self._seqs and seq <= self._seqs[-1]):
            return
        self._seqs.append(seq)
        self._fences.append(fence)
        if len(self._fences) > 2 * self.keep:
            del self._seqs[:self.keep], self._fences[:self.keep]

    @property
    def latest_seq(self) -> int:
        return self._seqs[-1] if self._seqs else -1

    def after(self, seq: int):
        """The earliest kept fence of a fetch after `seq` (the latest if none is later yet)."""
        return self._fences[min(bisect.bisect_right(self._seqs, seq), len(self._fences) - 1)]

    def __len__(self) -> int:
        return len(self._fences)
