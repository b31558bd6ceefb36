"""Slot tables: the victim is the least recently used slot, taken off the front of the order."""
from __future__ import annotations

from pipeline.slots import FREE, LOADING, READY, SlotTable


def _ready(table: SlotTable, *keys):
    slots = [table.take_free(k) for k in keys]
    for s in slots:
        s.state = READY
    return slots


def test_victims_follow_recency_and_touch():
    t = SlotTable(4, "VRAM")
    a, b, c = _ready(t, (0, 1), (0, 2), (0, 3))
    assert t.lru_victim(lambda s: True) is a  # filled first, used least recently
    t.touch(a)  # use (0, 1): now (0, 2) is the oldest
    assert t.lru_victim(lambda s: True) is b
    assert t.lru_victim(lambda s: s is not b) is c  # the filter skips pinned slots
    t.release(b)
    assert b.state == FREE and t.lru_victim(lambda s: True) is c
    d = t.take_free((1, 0))  # a re-taken slot is the most recent
    d.state = READY
    t.touch(c)
    assert t.lru_victim(lambda s: True) is a


class _Copy:
    """A transfer stand-in: only done() matters to the slot table."""

    def __init__(self, done: bool):
        self.finished = done

    def done(self) -> bool:
        return self.finished


def test_in_flight_slots_are_a_fallback_only():
    t = SlotTable(3, "VRAM")
    a, b = _ready(t, (0, 1), (0, 2))
    f = t.take_free((0, 3))  # LOADING, its copy issued
    f.transfer = _Copy(done=False)
    t.touch(a), t.touch(b)  # f is now the least recently used
    assert t.lru_victim(lambda s: True, in_flight=True) is a  # READY first, whatever the order
    assert t.lru_victim(lambda s: s is f, in_flight=True) is f
    assert t.lru_victim(lambda s: s is f) is None  # without in_flight: never a copy still running
    assert t.victims(lambda s: True, 3, in_flight=True) == [a, b, f]
    assert t.victims(lambda s: True, 3) == [a, b]
    f.transfer.finished = True  # landed, not yet settled by the loop: as good as READY, after them
    assert t.lru_victim(lambda s: s is f) is f
    assert t.victims(lambda s: True, 2) == [a, b] and t.victims(lambda s: s is not a, 5) == [b, f]
    reading = SlotTable(1, "VRAM")
    g = reading.take_free((2, 2))  # LOADING, still waiting for its disk read: never a victim
    assert g.state == LOADING and reading.lru_victim(lambda s: True, in_flight=True) is None
