"""The scheduler's plan side: the policy's plans become evictions, disk reads and H2D copies.

`Scheduler` (pipeline.scheduler) mixes this in; it runs on the loop thread and uses the
scheduler's slot tables, queues and credits under its `table_lock`.

- Evictions apply at once, for READY slots nobody may still read (a VRAM slot only behind
  the latest fetch's fence, a RAM slot with no copy reading it).
- Stagings and promotions queue by priority (= expected time of use); `_pump` starts them
  while in-flight credits last. A promotion whose bytes are still on their way to RAM waits
  for its staging. A move that cannot run (no free slot, stale plan, failed read) is
  reported to the policy as failed, so its book rolls back.
"""
from __future__ import annotations

import heapq

import msgspec

from policies.events import Tier

from .slots import READY, Key, Slot, SlotTable


class PlanExecution:
    def on_plan(self, stamped) -> None:
        """The actor's callback: apply evictions now, queue prefetches by priority."""
        if self.closed:
            return
        plan = stamped.plan
        landed = []
        with self.table_lock:
            for mv in plan.evictions:
                table = self.vram if mv.tier == Tier.VRAM else self.ram
                slot = table.lookup((mv.layer, mv.expert))
                self._drop_queued(mv.tier, (mv.layer, mv.expert))
                if slot is not None and slot.state == READY and self._evictable(table, slot):
                    self._evict(table, slot, tell_policy=False)
            for mv in plan.stagings:
                self._queue(self._read_queue, Tier.RAM, mv, stamped)
            for mv in plan.promotions:
                key = (mv.layer, mv.expert)
                if key in self.vram.where:  # already there or on its way (e.g. demand got it first)
                    if self.vram.where[key].state == READY:
                        landed.append(mv)
                    continue
                self._queue(self._copy_queue, Tier.VRAM, mv, stamped)
        for mv in landed:
            self.policy.complete(mv.layer, mv.expert, Tier.VRAM, True)
        self._pump()

    def _evictable(self, table: SlotTable, slot: Slot) -> bool:
        if table is self.vram:
            return slot.handed_seq < self.fences.latest_seq or slot.handed_seq < 0
        return slot.users == 0 and slot.reading is None

    def _queue(self, heap: list, tier: Tier, mv, stamped) -> None:
        key = (mv.layer, mv.expert)
        self._queued[(tier, key)] = stamped
        heapq.heappush(heap, (mv.priority, next(self._order), key, stamped))

    def _drop_queued(self, tier: Tier, key: Key) -> None:
        self._queued.pop((tier, key), None)  # its heap entry is skipped when popped

    def _pump(self) -> None:
        """Start queued prefetches while credits last, best priority first."""
        with self.table_lock:
            self._pump_locked()

    def _pump_locked(self) -> None:
        while self.read_credits > 0 and self._read_queue:
            key, stamped, _ = self._pop(self._read_queue, Tier.RAM)
            if key is None:
                continue
            if key in self.ram.where:
                continue
            rslot = self.ram.take_free(key)
            if rslot is None:
                self._dropped(key, Tier.RAM)
                continue
            self.read_credits -= 1
            self._c["prefetch_reads"] += 1
            rslot.reading = self._spawn(self._prefetch_read(rslot, key))
        while self.copy_credits > 0 and self._copy_queue:
            key, stamped, priority = self._pop(self._copy_queue, Tier.VRAM)
            if key is None or key in self.vram.where:
                continue
            rslot = self.ram.lookup(key)
            if rslot is None or rslot.state != READY:
                # The policy stages what it promotes (same plan); copy once the bytes are in RAM.
                if rslot is not None or (Tier.RAM, key) in self._queued:
                    self._copy_after_read[key] = (priority, stamped)
                else:
                    self._dropped(key, Tier.VRAM)
                continue
            slot = self.vram.take_free(key)
            if slot is None:
                self._dropped(key, Tier.VRAM)
                continue
            self.copy_credits -= 1
            self._c["prefetch_copies"] += 1
            self._copy(slot, rslot, demand=False)

    async def _prefetch_read(self, rslot: Slot, key: Key) -> None:
        try:
            ok = await self._read(rslot, key, False)  # a failure reaches the policy and any waiter
        finally:
            with self.table_lock:
                self.read_credits += 1
        with self.table_lock:
            waiting = self._copy_after_read.pop(key, None)
            if waiting is not None:
                if ok:
                    self._queue(self._copy_queue, Tier.VRAM, _Move(key, waiting[0]), waiting[1])
                else:
                    self._dropped(key, Tier.VRAM)
        self._pump()

    def _pop(self, heap: list, tier: Tier):
        priority, _, key, stamped = heapq.heappop(heap)
        if self._queued.get((tier, key)) is not stamped:
            return None, None, 0.0  # superseded or taken over by demand
        del self._queued[(tier, key)]
        if self.is_stale(stamped):
            self._dropped(key, tier)
            return None, None, 0.0
        return key, stamped, priority

    def _dropped(self, key: Key, tier: Tier) -> None:
        self._c["prefetch_dropped"] += 1
        self.policy.complete(key[0], key[1], tier, False)


class _Move(msgspec.Struct, frozen=True):
    """A promotion re-queued after its staging finished (the plan's own Move is gone)."""

    key: Key
    priority: float

    @property
    def layer(self) -> int:
        return self.key[0]

    @property
    def expert(self) -> int:
        return self.key[1]
