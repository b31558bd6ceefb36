"""The asyncio scheduler: serves demand fetches and turns the policy's plans into transfers.

It runs on the pipeline's event loop thread, except `try_serve`: a synchronous caller serves
a fetch on its own thread when nothing has to be waited for (every expert in VRAM or in RAM
with a VRAM slot to take), so a miss from RAM costs one copy submission, not two thread
hops. Both threads change the slot tables only under `table_lock`, and the loop never awaits
while holding it; policy feedback from the caller thread is handed to the loop in order.
Tiers are fixed slot tables
(`pipeline.slots`) over the RAM arena (filled by reader processes) and the VRAM arena
(filled by the copy engine). The policy actor decides *what* to move; this module only
moves bytes, and it is the single source of truth about what is where.

- Demand (`demand`): experts already in VRAM are returned at once; a copy in flight is
  returned with its transfer (the caller's stream waits on its event); a miss takes a free
  VRAM slot or evicts the least recently demanded one, reads the expert from disk if RAM
  lacks it, and copies it on the demand stream. Demand never waits behind prefetches: it
  uses no credits, overtakes queued reads, and takes over a queued prefetch of its expert.
- Plans (`on_plan`, in pipeline.plans, mixed in): evictions free slots, stagings queue disk reads, promotions queue H2D
  copies; prefetches run in priority order under in-flight credits (`prefetch_reads`,
  `prefetch_copies`). A move that cannot run (no free slot, stale plan) is reported to the
  policy as failed so its book rolls back.
- Safety: a VRAM slot handed out by fetch N is overwritten only by a copy that waits on a
  fence recorded by a later fetch; a RAM slot is reused only when no copy reads from it;
  prefetches never hold more VRAM slots than leave room for one layer's top-k.
- When the scheduler evicts on its own (a demand victim), it tells the policy (`forget`).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time

import msgspec

from policies.events import Tier

from .plans import PlanExecution
from .readers import read_request
from .slots import LOADING, READY, FenceLog, Key, Slot, SlotTable


class SchedulerStats(msgspec.Struct, frozen=True):
    fetches: int
    vram_hits: int  # demanded experts already in VRAM (a copy in flight counts: no new transfer)
    vram_misses: int
    ram_hits: int  # VRAM misses served from RAM
    ram_misses: int  # VRAM misses read from disk
    prefetch_copies: int
    prefetch_reads: int
    prefetch_dropped: int  # planned moves that could not run (no slot, stale, failed)
    bytes_h2d: int
    bytes_nvme: int
    stall_seconds: float  # time demand fetches spent waiting for reads (the loop side)
    evictions_vram: int
    evictions_ram: int
    queued_prefetches: int
    # Of evictions_vram: demand misses that found no free slot and took the scheduler's own
    # LRU victim, not one the policy chose (it keeps slots free ahead: vram_headroom).
    evictions_vram_fallback: int = 0
    # Of fetches: those the pipeline's loop thread served (every afetch; a sync fetch only when
    # it had to wait for a disk read or a slot still filling). Each costs the decode thread a
    # hop to the loop thread and back; the rest were served on the caller's thread.
    fetches_via_loop: int = 0


class Scheduler(PlanExecution):
    def __init__(self, *, store, ram_arena, vram_arena, engine, readers, policy, top_k: int,
                 prefetch_reads: int, prefetch_copies: int, verify_checksums: bool, is_stale=None):
        self.store, self.ram_arena, self.vram_arena = store, ram_arena, vram_arena
        self.engine, self.readers, self.policy = engine, readers, policy
        self.is_stale = is_stale or (lambda stamped: False)
        self.verify = verify_checksums
        self.ram = SlotTable(ram_arena.num_slots, "RAM")
        self.vram = SlotTable(vram_arena.num_slots, "VRAM")
        # Prefetches may hold at most this many VRAM slots, so a demand always finds top_k.
        self.copy_credits = max(0, min(prefetch_copies, vram_arena.num_slots - top_k))
        self.read_credits = max(0, min(prefetch_reads, ram_arena.num_slots - top_k))
        self._copy_queue: list = []  # heap of (priority, order, key, stamped)
        self._read_queue: list = []
        self._queued: dict[tuple[Tier, Key], object] = {}  # move -> stamped plan (queued only)
        self._copy_after_read: dict[Key, tuple] = {}  # promotions waiting for their staging
        self._inflight: list[tuple] = []  # (key, vram slot, ram slot, transfer, demand) not yet settled
        # Copy completions reach the loop without polling it: on CUDA a waiter thread blocks
        # on each copy's event (the GIL released) and wakes the loop; on the CPU the copy
        # thread's future does. A loop that polled events kept the GIL busy under the decode loop.
        self._loop = asyncio.get_running_loop()  # built on the pipeline's loop (assembly.assemble)
        self._landed: queue.SimpleQueue = queue.SimpleQueue()
        self._waiter = None
        if engine.is_cuda:
            self._waiter = threading.Thread(target=self._wait_copies, name="copy-waiter", daemon=True)
            self._waiter.start()
        self._order = itertools.count()
        self._req_ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self.fences = FenceLog()  # a refill waits on the first fence after the slot's last use
        # Slot tables, queues and counters change only under this lock: the loop thread takes
        # it for each synchronous step (never across an await), `try_serve` for a whole fetch.
        self.table_lock = threading.RLock()
        self._loop_thread = threading.get_ident()
        self._c = dict.fromkeys(SchedulerStats.__struct_fields__, 0)
        self._c["stall_seconds"] = 0.0
        self.closed = False

    # ---- demand ----------------------------------------------------------------------------
    def try_serve(self, layer: int, experts: list[int], seq: int, fence) -> list[tuple[Slot, object]] | None:
        """Caller-thread fast path: if no expert of this fetch needs waiting (each is in VRAM,
        its copy issued, or in RAM with a VRAM slot free or evictable now), serve the fetch
        here: pin the hits, issue demand copies for the rest, return (slot, transfer or None)
        each. Otherwise None, with nothing but this fetch's pins changed (demand() pins the
        same slots for the same fetch)."""
        keys = [(layer, e) for e in experts]
        with self.table_lock:
            if self.closed:
                return None
            hits, copies = [], []
            for key in keys:
                slot = self.vram.where.get(key)
                if slot is not None:
                    if slot.state != READY and slot.transfer is None:
                        return None  # a prefetch still reading from disk: the loop waits for it
                    hits.append(slot)
                    continue
                rslot = self.ram.where.get(key)
                if rslot is None or rslot.state != READY:
                    return None  # a disk read: the loop's job
                copies.append((key, rslot))
            for slot in hits:  # pinned before any eviction below can pick them
                slot.handed_seq = seq
            short = len(copies) - self.vram.free_count()
            if short > 0 and len(self.vram.victims(lambda s: s.handed_seq < seq, short,
                                                    in_flight=self.engine.is_cuda)) < short:
                return None
            self.fences.note(fence, seq)
            self._c["fetches"] += 1
            self._c["vram_hits"] += len(hits)
            for slot in hits:
                self._hand_out(slot, seq)
            for key, rslot in copies:
                slot = self.vram.take_free(key) or self._evict_now(key, seq)
                assert slot is not None, "victims were counted above, under the same lock"
                self._copy_from_ram(slot, rslot, seq)
            return [(slot, slot.transfer) for slot in (self.vram.where[key] for key in keys)]

    async def demand(self, layer: int, experts: list[int], seq: int, fence) -> list[tuple[Slot, object]]:
        """Make `experts` of `layer` available in VRAM; returns (slot, transfer or None) each.

        Hits and misses served from RAM finish in this one step (no task, no await): only the
        experts that must wait (a disk read, a slot still filling) get concurrent tasks."""
        keys = [(layer, e) for e in experts]
        with self.table_lock:
            self.fences.note(fence, seq)
            self._c["fetches"] += 1
            self._c["fetches_via_loop"] += 1
            for key in keys:  # pin first, so no eviction below picks an expert of this fetch
                slot = self.vram.lookup(key)
                if slot is not None:
                    slot.handed_seq = seq
            out: list = [self._demand_now(key, seq) for key in keys]
        waiting = [i for i, r in enumerate(out) if r is None]
        if waiting:
            done = await asyncio.gather(*(self._demand_one(keys[i], seq) for i in waiting))
            for i, r in zip(waiting, done):
                out[i] = r
        return out

    def _demand_now(self, key: Key, seq: int) -> tuple[Slot, object] | None:
        """The demand of `key` if it needs no waiting (in VRAM, or a free/evictable slot and
        the bytes in RAM); None to take the waiting path."""
        slot = self.vram.lookup(key)
        if slot is not None:
            if slot.state == LOADING and slot.transfer is None:
                return None
            self._c["vram_hits"] += 1
            self._hand_out(slot, seq)
            return slot, slot.transfer
        rslot = self.ram.lookup(key)
        if rslot is None or rslot.state != READY:
            return None
        slot = self.vram.take_free(key) or self._evict_now(key, seq)
        if slot is None:
            return None
        self._copy_from_ram(slot, rslot, seq)
        return slot, slot.transfer

    def _copy_from_ram(self, slot: Slot, rslot: Slot, seq: int) -> None:
        """A demand miss whose bytes are in RAM, into the VRAM slot just taken for it."""
        self._c["vram_misses"] += 1
        self._c["ram_hits"] += 1
        self._drop_queued(Tier.VRAM, slot.key)  # demand takes over a queued prefetch of it
        self._copy(slot, rslot, demand=True, prev_handed=self._hand_out(slot, seq))

    def _hand_out(self, slot: Slot, seq: int) -> int:
        """Pin `slot` for fetch `seq` and mark it most recently used; returns the fetch that
        had it before (a refill must wait for the fence that follows that fetch's uses)."""
        prev, slot.handed_seq = slot.handed_seq, seq
        self.vram.touch(slot)
        return prev

    def _evict_now(self, key: Key, seq: int) -> Slot | None:
        """A slot for `key` by evicting, if that needs no waiting; else None."""
        # On CUDA a slot whose copy is still in flight will do: the new copy is ordered after it
        # on the GPU (Slot.prior), so the host need not wait for it to land.
        victim = self.vram.lru_victim(lambda s: s.handed_seq < seq, in_flight=self.engine.is_cuda)
        if victim is None:
            return None
        self._c["evictions_vram_fallback"] += 1
        self._evict(self.vram, victim, tell_policy=True)
        return self.vram.take_free(key)

    async def _demand_one(self, key: Key, seq: int) -> tuple[Slot, object]:
        with self.table_lock:
            slot = self.vram.lookup(key)
            hit = slot is not None
            if hit:
                self._c["vram_hits"] += 1
                self._hand_out(slot, seq)
                reading = slot.state == LOADING and slot.transfer is None  # a prefetch still reading from disk
            else:
                self._c["vram_misses"] += 1
                self._drop_queued(Tier.VRAM, key)  # demand takes over a queued prefetch of it
                slot = self.vram.take_free(key)
        if hit:
            if reading:
                await self._wait_ready(slot)
            return slot, slot.transfer
        slot = slot or await self._evict_for_demand(key, seq)
        with self.table_lock:
            prev_handed = self._hand_out(slot, seq)
        t0 = time.perf_counter()
        try:
            while True:
                rslot = await self._ensure_ram(key, demand=True)
                with self.table_lock:
                    # Between the read's wake-up and this step a plan may have evicted the RAM
                    # slot (READY, no copy yet): then read it again rather than copy a stranger.
                    if rslot.key == key and rslot.state == READY:
                        self._c["stall_seconds"] += time.perf_counter() - t0
                        self._copy(slot, rslot, demand=True, prev_handed=prev_handed)
                        return slot, slot.transfer
        except BaseException as e:  # the slot must not stay LOADING with nobody to fill it
            self._fail_slot(self.vram, slot, e)
            raise

    async def _evict_for_demand(self, key: Key, seq: int) -> Slot:
        """A VRAM slot for a demand when none is free: the least recently demanded READY slot
        not handed out by this fetch; while every candidate is still being filled (copies in
        flight), wait for one to land. Budgets leave top_k slots beyond prefetches, so one
        always comes."""
        while True:
            with self.table_lock:
                slot = self.vram.take_free(key) or self._evict_now(key, seq)  # a concurrent demand may have freed one
                if slot is not None:
                    return slot
                filling = [s for s in self.vram.slots if s.state == LOADING and s.handed_seq < seq]
            assert filling, "budget check guarantees top_k VRAM slots beyond this fetch's own"
            await asyncio.wait([self._spawn(self._settled(s)) for s in filling], return_when=asyncio.FIRST_COMPLETED)
            self._reap()  # mark the landed copies' slots READY

    async def _settled(self, slot: Slot) -> None:
        """Until a filling VRAM slot is READY or released (its outcome is someone else's to report)."""
        with contextlib.suppress(Exception):
            await self._wait_ready(slot)
            if slot.transfer is not None:
                await slot.transfer.wait()

    # ---- RAM tier ----------------------------------------------------------------------------
    async def _ensure_ram(self, key: Key, *, demand: bool) -> Slot:
        """The RAM slot holding `key`, reading it from disk first if needed."""
        while True:
            with self.table_lock:
                rslot = self._ram_slot_for(key, demand)
                busy = [t for (_, _, _, t, _) in self._inflight] if rslot is None else []
            if rslot is not None:
                break
            # Every RAM slot is the source of a copy not settled yet (a small RAM budget and
            # copies issued faster than the loop settles them): wait for one to land.
            if not busy:
                raise RuntimeError(f"RAM tier: all {len(self.ram)} slots busy with copies; raise the RAM budget")
            await asyncio.wait([self._spawn(_quietly(t.wait())) for t in busy], return_when=asyncio.FIRST_COMPLETED)
            self._reap()
        await self._wait_ready(rslot)
        return rslot

    def _ram_slot_for(self, key: Key, demand: bool) -> Slot | None:
        """`key`'s RAM slot: READY, being read, or taken now with its read started; None when
        every slot is the source of a copy still in flight."""
        rslot = self.ram.lookup(key)
        if rslot is not None:
            if rslot.state == READY:
                if demand:
                    self._c["ram_hits"] += 1
                return rslot
            if demand:
                self._c["ram_misses"] += 1
                if not rslot.read_demand and not rslot.upgrade:  # overtake the queued prefetches
                    rslot.upgrade = self.readers.cancel(rslot.read_id)
            return rslot
        rslot = self.ram.take_free(key)
        if rslot is None:
            victim = self.ram.lru_victim(lambda s: s.users == 0 and s.key not in self.vram.where)
            victim = victim or self.ram.lru_victim(lambda s: s.users == 0)
            if victim is None:
                return None  # every slot is a copy's source: the caller waits for one to land
            self._evict(self.ram, victim, tell_policy=True)
            rslot = self.ram.take_free(key)
        if demand:
            self._c["ram_misses"] += 1
            self._drop_queued(Tier.RAM, key)
        rslot.reading = self._spawn(self._read(rslot, key, demand))
        return rslot

    async def _read(self, rslot: Slot, key: Key, demand: bool) -> bool:
        """Fill `rslot` from disk; failures go to the slot's waiters (and the policy), not up."""
        while True:
            req = read_request(self.store, key[0], key[1], next(self._req_ids),
                               self.ram_arena.slot_offset(rslot.index), verify=self.verify)
            rslot.read_id, rslot.read_demand = req.id, demand
            try:
                await self.readers.read(req, demand=demand)
                break
            except asyncio.CancelledError:
                if rslot.upgrade and asyncio.current_task().cancelling() == 0:
                    rslot.upgrade, demand = False, True  # the pool dropped it from its queue: resubmit
                    continue
                with self.table_lock:
                    self._fail_slot(self.ram, rslot, RuntimeError(f"read of expert {key} cancelled: the pipeline "
                                                                  f"is closing"))
                self.policy.complete(key[0], key[1], Tier.RAM, False)
                raise
            except BaseException as e:
                with self.table_lock:
                    self._fail_slot(self.ram, rslot, e)
                self.policy.complete(key[0], key[1], Tier.RAM, False)
                return False
        with self.table_lock:
            self._c["bytes_nvme"] += req.read_length
            rslot.state, rslot.reading = READY, None
        self._wake(rslot, None)
        self.policy.complete(key[0], key[1], Tier.RAM, True)
        self._pump()
        return True

    # ---- copies ------------------------------------------------------------------------------
    def _copy(self, slot: Slot, rslot: Slot, *, demand: bool, prev_handed: int | None = None) -> None:
        key = slot.key
        entry = self.store.expert_range(*key)
        prev = slot.handed_seq if prev_handed is None else prev_handed
        assert prev < self.fences.latest_seq or prev < 0, "a slot handed out by this fetch is never refilled"
        after = self.fences.after(prev) if prev >= 0 else None  # follows the previous expert's uses
        prior, slot.prior = slot.prior, None
        if prior is not None and prior.done():
            prior = None
        rslot.users += 1
        self.ram.touch(rslot)  # RAM victims are the least recently copied from
        # CPU: a demand copy is done right here (its caller would only wait for the copy thread);
        # _copy always runs under table_lock, so inline copies never overlap each other.
        slot.transfer = self.engine.copy_in(self.ram_arena.slot(rslot.index), slot.index, self.vram_arena,
                                            entry.read_length, demand=demand, after=after, prior=prior,
                                            inline=demand, src_pinned=self.ram_arena.pinned)
        self._c["bytes_h2d"] += entry.read_length
        self._inflight.append((key, slot, rslot, slot.transfer, demand))
        self._wake(slot, None)  # waiters take the transfer and wait on its event themselves
        self._watch(slot.transfer)

    def _reap(self) -> bool:
        """Settle the copies that have landed (or failed); True if any did. One poller for
        all transfers, instead of a task per copy, keeps the loop thread (and the GIL) quiet."""
        still, settled = [], []
        with self.table_lock:
            for item in self._inflight:
                key, slot, rslot, transfer, demand = item
                # A CUDA copy counts once the waiter thread has seen it land (it wakes the loop
                # then), a CPU one once its future is done: no device query per copy per turn.
                if not transfer.known_done:
                    still.append(item)
                    continue
                ok = transfer.error is None
                rslot.users -= 1
                if slot.transfer is transfer:  # not re-taken by a demand meanwhile
                    if ok:
                        slot.state, slot.transfer = READY, None
                    else:
                        self.vram.release(slot)
                settled.append((key, ok))
                if not demand:
                    self.copy_credits += 1
            self._inflight = still
        for key, ok in settled:
            self.policy.complete(key[0], key[1], Tier.VRAM, ok)
        return bool(settled)

    def _watch(self, transfer) -> None:
        if transfer.known_done:  # e.g. a copy refused at submission: settle it on the next turn
            self._wake_loop()
        elif self._waiter is not None:
            self._landed.put(transfer)
        else:
            transfer._future.add_done_callback(lambda _f: self._wake_loop())

    def _wait_copies(self) -> None:
        """The waiter thread: block on each copy's event in issue order; once one lands, take
        the copies behind it that have landed too, then wake the loop once for all of them
        (one loop turn per batch, not per copy: the loop thread shares the GIL with the caller)."""
        head = None
        while True:
            transfer = head if head is not None else self._landed.get()
            head = None
            if transfer is None:
                return
            with contextlib.suppress(Exception):
                transfer.synchronize()
            while True:
                try:
                    nxt = self._landed.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._landed.put(None)  # stop after this batch's wake-up
                    break
                if not nxt.done():
                    head = nxt  # still in flight: the next one to block on
                    break
            self._wake_loop()

    def _wake_loop(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to settle
            self._loop.call_soon_threadsafe(self._settle_landed)

    def _settle_landed(self) -> None:
        if not self.closed and self._reap():
            self._pump()

    # ---- common ------------------------------------------------------------------------------
    def _evict(self, table: SlotTable, slot: Slot, *, tell_policy: bool) -> None:
        key = slot.key
        self._c["evictions_vram" if table is self.vram else "evictions_ram"] += 1
        table.release(slot)
        if tell_policy:
            self._on_loop(self.policy.forget, key[0], key[1], Tier.VRAM if table is self.vram else Tier.RAM)

    def _on_loop(self, fn, *args) -> None:
        """Run `fn(*args)` on the loop thread: now if this is it, else next in the loop's FIFO
        (before the activation event the same fetch publishes after it)."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to tell
                self._loop.call_soon_threadsafe(fn, *args)

    def _fail_slot(self, table: SlotTable, slot: Slot, exc: BaseException) -> None:
        with self.table_lock:
            if slot.key is not None and table.where.get(slot.key) is slot:
                table.release(slot)
            self._wake(slot, exc)

    async def _wait_ready(self, slot: Slot) -> None:
        """Until a LOADING slot is READY (RAM) or has its copy issued (VRAM); raises its failure."""
        if slot.state != LOADING or slot.transfer is not None:
            return
        fut = asyncio.get_running_loop().create_future()
        slot.waiters.append(fut)
        await fut

    def _wake(self, slot: Slot, exc: BaseException | None) -> None:
        waiters, slot.waiters = slot.waiters, []
        if waiters:
            self._on_loop(self._resolve, waiters, exc)

    @staticmethod
    def _resolve(waiters: list, exc: BaseException | None) -> None:
        for fut in waiters:
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(None)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, timeout: float) -> None:
        """Cancel queued prefetches and in-flight tasks; bounded by `timeout` seconds."""
        with self.table_lock:
            self.closed = True
        if self._waiter is not None:
            self._landed.put(None)  # after the copies already queued: their events are near
            self._waiter.join(timeout=timeout / 2)
        self._read_queue.clear()
        self._copy_queue.clear()
        self._queued.clear()
        self._copy_after_read.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(**{**self._c, "queued_prefetches": len(self._queued)})


async def _quietly(aw) -> None:
    """Await `aw`, ignoring its failure (someone else reports it)."""
    with contextlib.suppress(Exception):
        await aw
