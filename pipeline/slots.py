"""Which expert occupies which fixed slot of a tier, and which slot a demand may take.

A slot is FREE, LOADING (bytes on their way) or READY. Only the scheduler's event-loop
thread touches these tables, so they need no locks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FREE, LOADING, READY = 0, 1, 2
Key = tuple[int, int]  # (layer, expert)


@dataclass(eq=False)
class Slot:
    index: int
    key: Key | None = None
    state: int = FREE
    last_use: int = 0  # fetch sequence number of its last demand (LRU order for demand victims)
    # VRAM: fetch sequence number that last handed its tensors to the caller; the slot may be
    # overwritten only behind a fence recorded by a later fetch (DESIGN: no use-after-free).
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
        return slot

    def release(self, slot: Slot) -> None:
        assert slot.state != FREE and slot.users == 0, (self.name, slot)
        del self.where[slot.key]
        slot.key, slot.state, slot.transfer, slot.reading, slot.prior = None, FREE, None, None, slot.transfer
        self._free.append(slot.index)

    def lru_victim(self, evictable) -> Slot | None:
        """The least recently demanded READY slot that `evictable(slot)` allows."""
        best = None
        for slot in self.where.values():
            if slot.state == READY and evictable(slot) and (best is None or slot.last_use < best.last_use):
                best = slot
        return best
