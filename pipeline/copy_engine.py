"""The last hop, pinned RAM slot -> VRAM slot, ordered by events instead of host waits.

    CopyEngine(device, decode=None)
      copy_in(src, dst_slot, arena, nbytes, demand=..., after=None) -> Transfer
      fence(stream=None) -> SlotFence     "the compute stream is past this point"
      stats() -> CopyStats;  close(timeout=5.0)
    Transfer: done() (never blocks), await wait(), make_stream_wait(stream), error
    SlotFence: done(), make_stream_wait(stream)

CUDA: two dedicated copy streams, the demand stream at a higher priority than the
prefetch stream, so a demand copy's kernels and DMA are scheduled first. A copy first makes
its stream wait on the slot's release fence (`after`), then copies `nbytes` with
`non_blocking=True` (bf16/fp16: straight into the slot; mxfp4: into a staging buffer, then
the GPU decode writes the slot on the same stream), then records a pooled event. Readiness
is that event: `done()` queries it, `wait()` polls it from asyncio with a short backoff,
`make_stream_wait()` makes the consumer's stream wait on it. No host synchronisation
anywhere on the hot path.

CPU (no CUDA): one copy thread is "the copy stream". In front of it sits a priority queue:
a demand copy runs next, ahead of every queued prefetch (FIFO within a class). Fences are
trivially complete when recorded, because CPU compute is synchronous: by the time the
caller records a fence, its reads of the slot have finished.

Safety contract (what the scheduler relies on):
  - a Transfer's source RAM slot may be reused only after `done()` is True;
  - a VRAM slot is overwritten only after the `after` fence passed to the copy into it;
  - `done()` True with `error is None` means the expert's bytes are in the slot.
A copy that cannot be done (wrong sizes, wrong dtype) does not raise from `copy_in`: it
gives a Transfer that is done with `error` set, re-raised by `wait()`/`make_stream_wait()`,
the same way on both devices. Using a closed engine or a slot out of range raises at once.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import wait as concurrent_wait
from typing import Callable

import msgspec
import torch

from .cuda_memcpy import direct_h2d
from .vram_arena import VramArena

# asyncio polling of a CUDA event: start fine (a copy of a small expert takes tens of
# microseconds), back off to 1 ms so a long wait costs little CPU.
POLL_MIN_S = 20e-6
POLL_MAX_S = 1e-3

# CPU: the decode lane (and staging buffer) of copies done inline on the caller's thread; the
# copy thread uses lane 0. An arena has two (VramArena.DECODE_LANES).
INLINE_LANE = 1

# decode(arena, landed_bytes, out_tensors): run on the copy thread / copy stream after the bytes land.
DecodeFn = Callable[[VramArena, torch.Tensor, dict], None]


class EngineClosed(RuntimeError):
    """The copy engine was closed before this copy ran."""


class CopyStats(msgspec.Struct, frozen=True):
    copies_demand: int  # copies submitted, by class
    copies_prefetch: int
    bytes: int  # bytes submitted for copy (nbytes of every accepted copy)
    failed: int  # copies whose Transfer carries an error
    copies_pageable: int  # CUDA: sources that were not pinned (slow, synchronous): should stay 0
    in_flight: int  # copies submitted and not yet complete
    busy_s: float | None  # CPU: seconds the copy thread spent copying; CUDA: not measured (None)


class SlotFence:
    """A point on a (compute) stream: everything enqueued there before it is ordered before
    a copy that waits on it. CPU: always complete."""

    __slots__ = ("_event", "_pool")

    def __init__(self, event=None, pool: _EventPool | None = None):
        self._event = event
        self._pool = pool

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def make_stream_wait(self, stream=None) -> None:
        """CUDA: `stream` (default: current) waits on the fence, no host sync. CPU: nothing to wait for."""
        if self._event is not None:
            (stream or torch.cuda.current_stream()).wait_event(self._event)

    def __del__(self):
        # A stream wait already enqueued keeps the state it saw; re-recording later is safe.
        if self._event is not None and self._pool is not None:
            self._pool.put(self._event)


class Transfer:
    """One RAM -> VRAM copy. CUDA: an event after the copy (and decode); CPU: the thread's future."""

    __slots__ = ("_event", "_future", "_error", "_pool", "_src", "_landed", "demand", "nbytes", "slot")

    def __init__(self, *, demand: bool, nbytes: int, slot: int, event=None, future: Future | None = None,
                 error: BaseException | None = None, pool: _EventPool | None = None, src=None):
        self._event, self._future, self._error, self._pool = event, future, error, pool
        self._src = src  # keeps the source alive while the DMA may still read it
        # Known complete (the host saw it): later checks and stream waits cost no device call.
        self._landed = event is None and future is None
        self.demand, self.nbytes, self.slot = demand, nbytes, slot

    def done(self) -> bool:
        """True once the copy has finished or failed; never blocks."""
        if self._landed:
            return True
        if self._future is not None:
            return self._future.done()
        if not self._event.query():
            return False
        self._mark_landed()
        return True

    @property
    def known_done(self) -> bool:
        """True if the copy is known to be complete without asking the device (a waiter saw
        it land, or it failed at submission); False may still mean done. Never blocks."""
        return self._landed or (self._future is not None and self._future.done())

    def synchronize(self) -> None:
        """Block this thread until the copy is complete (for a waiter thread, never the loop)."""
        if self._landed:
            return
        if self._future is not None:
            concurrent_wait([self._future])
            return
        self._event.synchronize()
        self._mark_landed()

    def _mark_landed(self) -> None:
        self._src = None
        self._landed = True

    @property
    def error(self) -> BaseException | None:
        """The failure of a finished copy, else None (also None while still running)."""
        if self._future is not None and self._future.done():
            return self._future.exception()
        return self._error

    async def wait(self) -> None:
        """Until the copy is complete; re-raises its error. Cancelling the waiter leaves the copy running."""
        if self._future is not None:
            await asyncio.shield(asyncio.wrap_future(self._future))
            return
        delay = POLL_MIN_S
        while not self.done():
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)
        if self._error is not None:
            raise self._error

    def make_stream_wait(self, stream=None) -> None:
        """CUDA: `stream` (default: current) waits on the copy's event, no host sync. CPU: blocks
        until the copy thread has finished it. Re-raises the copy's error."""
        if self._future is not None:
            self._future.result()
            return
        if self._error is not None:
            raise self._error
        if not self._landed:  # a landed copy has nothing left to wait for
            (stream or torch.cuda.current_stream()).wait_event(self._event)

    def __del__(self):
        if self._event is not None and self._pool is not None:
            self._pool.put(self._event)

    def __repr__(self) -> str:
        state = "failed" if self.error is not None else "done" if self.done() else "in flight"
        return f"Transfer({'demand' if self.demand else 'prefetch'} -> slot {self.slot}, {self.nbytes} B, {state})"


class _EventPool:
    """Reusable CUDA events (no timing: cheaper to record and query).

    Spinning events (blocking=False): the scheduler's waiter thread polls each copy's event.
    Blocking-sync events, which let that thread sleep, were measured slower on an H100
    (replay, stored form, 10%: 61.0 and 50.5 tok/s against 66.0 and 69.5 spinning): the loop
    then learns later that a copy landed."""

    def __init__(self):
        self._free: list = []
        self.closed = False

    def get(self):
        try:
            return self._free.pop()
        except IndexError:
            return torch.cuda.Event(enable_timing=False, blocking=False)

    def put(self, event) -> None:
        if not self.closed:
            self._free.append(event)  # list.append is atomic: safe from __del__ on any thread


class _on_stream:
    """`with torch.cuda.stream(s)` for a stream of the engine's device, without the public
    context's per-use device lookups and availability checks: those were a sixth of a
    copy's host time in a profile of the replay on an H100, and a copy is issued per miss.
    Restores the thread's previous current stream on exit, as the public context does."""

    __slots__ = ("_stream", "_prev")

    def __init__(self, stream):
        self._stream = stream

    def __enter__(self) -> None:
        s = self._stream
        self._prev = torch._C._cuda_getCurrentStream(s.device_index)
        torch._C._cuda_setStream(stream_id=s.stream_id, device_index=s.device_index, device_type=s.device_type)

    def __exit__(self, *exc) -> None:
        stream_id, device_index, device_type = self._prev
        torch._C._cuda_setStream(stream_id=stream_id, device_index=device_index, device_type=device_type)


def _check_copy(src: torch.Tensor, arena: VramArena, nbytes: int) -> None:
    """Sizes and dtypes of one copy; a ValueError naming the numbers (carried by the Transfer)."""
    if not isinstance(src, torch.Tensor) or src.dtype != torch.uint8 or src.dim() != 1:
        got = f"{src.dtype} {list(src.shape)}" if isinstance(src, torch.Tensor) else type(src).__name__
        raise ValueError(f"copy source must be a 1-D uint8 tensor (a RAM slot view), got {got}")
    if src.device.type != "cpu":
        raise ValueError(f"copy source must be host memory, got a tensor on {src.device}")
    cap = arena.read_length if arena.decodes else arena.slot_bytes
    if not arena.expert_length <= nbytes <= cap:
        raise ValueError(f"copy of {nbytes} bytes: an expert of this {arena.dtype} store needs "
                         f"{arena.expert_length}..{cap} bytes (its length .. its {'staging' if arena.decodes else 'slot'}"
                         f" size)")
    if nbytes > src.numel():
        raise ValueError(f"copy of {nbytes} bytes from a source of only {src.numel()} bytes")


def _default_decode(arena: VramArena, landed: torch.Tensor, out: dict) -> None:
    if arena.decodes:
        arena.store.decode_from_buffer(landed, arena.device, out=out)


class CopyEngine:
    """RAM -> VRAM copies on dedicated streams (CUDA) or one priority-ordered thread (CPU)."""

    def __init__(self, device: torch.device | str, *, decode: DecodeFn | None = None,
                 demand_priority: int = -1, prefetch_priority: int = 0):
        """`decode(arena, landed, out)` runs after the bytes land (on the copy stream/thread);
        default: the store's MXFP4 decode into the slot for mxfp4 arenas, nothing otherwise."""
        self.device = torch.device(device)
        self._decode = decode or _default_decode
        self._closed = False
        self._lock = threading.Lock()
        self._n = {"demand": 0, "prefetch": 0, "bytes": 0, "failed": 0, "pageable": 0}
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda:
            # Lower number = higher priority; out-of-range values are clamped by CUDA.
            self.demand_stream = torch.cuda.Stream(self.device, priority=demand_priority)
            self.prefetch_stream = torch.cuda.Stream(self.device, priority=prefetch_priority)
            self._pool = _EventPool()
            self._pending: deque[Transfer] = deque()
            # MXFP4: decodes run on companion streams of the same priorities, so a copy overlaps
            # the previous expert's decode; each staging buffer is reused after its decode.
            self.decode_streams = {True: torch.cuda.Stream(self.device, priority=demand_priority),
                                   False: torch.cuda.Stream(self.device, priority=prefetch_priority)}
            self._staging_turn = {True: 0, False: 0}
            self._staging_free: dict[tuple[int, int], object] = {}
            # Pinned sources go straight to cudaMemcpyAsync (pipeline/cuda_memcpy.py), on this
            # device only: the runtime call runs in the calling thread's current device.
            self._direct = direct_h2d()
            self._index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            # With one device every thread's current device is this one: no per-copy check.
            self._one_device = torch.cuda.device_count() == 1
        else:
            self._cv = threading.Condition(self._lock)
            self._heap: list = []
            self._seq = itertools.count()
            self._running = 0
            self._busy_s = 0.0
            self._thread = threading.Thread(target=self._worker, name="copy-engine", daemon=True)
            self._thread.start()

    # -- submitting ------------------------------------------------------------------------
    def copy_in(self, src: torch.Tensor, dst_slot: int, arena: VramArena, nbytes: int, *, demand: bool,
                after: SlotFence | None = None, prior: Transfer | None = None, inline: bool = False,
                src_pinned: bool | None = None) -> Transfer:
        """Copy `nbytes` of the RAM slot view `src` into VRAM slot `dst_slot` of `arena`
        (decoding there for mxfp4), after the slot's release fence `after` and, CUDA only, after
        `prior`: a copy into the same slot still in flight (ordered on the GPU, no host wait).

        `inline` (CPU only; ignored on CUDA): do the copy now on the calling thread, for a
        caller that would only wait for it. It uses its own staging buffer and decode lane,
        so it may run beside the copy thread; inline copies must not run concurrently with
        each other (the scheduler issues them under its table lock).

        `src_pinned` (CUDA): whether `src` is page-locked, when the caller knows (a RAM arena
        is pinned as a whole); None asks the driver, a few microseconds per copy."""
        if self._closed:
            raise RuntimeError("CopyEngine is closed")
        if prior is not None and not self.is_cuda and not prior.done():
            raise ValueError("CPU copy engine: a slot's earlier copy must finish before the next (prior)")
        arena.raw_view(dst_slot)  # IndexError for a slot out of range: a caller bug
        with self._lock:
            self._n["demand" if demand else "prefetch"] += 1
            self._n["bytes"] += nbytes
        if self.is_cuda:
            return self._copy_cuda(src, dst_slot, arena, nbytes, demand, after, prior, src_pinned)
        fut: Future = Future()
        if inline and (not arena.decodes or arena.num_staging > INLINE_LANE):
            self._run_copy(src, dst_slot, arena, nbytes, after, fut, lane=INLINE_LANE)
            return Transfer(demand=demand, nbytes=nbytes, slot=dst_slot, future=fut)
        with self._cv:
            heapq.heappush(self._heap, (0 if demand else 1, next(self._seq),
                                        (src, dst_slot, arena, nbytes, after, fut)))
            self._cv.notify()
        return Transfer(demand=demand, nbytes=nbytes, slot=dst_slot, future=fut)

    def _land(self, src: torch.Tensor, slot: int, arena: VramArena, nbytes: int, lane: int,
              stream=None, pinned: bool = False) -> None:
        """The copy and the decode: enqueued on `stream`, the current one (CUDA), or done now
        without one (CPU). Lane k lands in staging buffer k and decodes with scratch k."""
        _check_copy(src, arena, nbytes)
        dst = arena.staging(lane) if arena.decodes else arena.raw_view(slot)
        if stream is None:
            dst[:nbytes].copy_(src[:nbytes])
        else:
            self._h2d(dst, src, nbytes, stream, pinned)
        self._decode_slot(arena, lane, slot, lane=lane)

    def _h2d(self, dst: torch.Tensor, src: torch.Tensor, nbytes: int, stream, pinned: bool) -> None:
        """dst[:nbytes] <- src[:nbytes] on `stream` (the current one), without waiting."""
        if pinned and self._direct is not None and (self._one_device or torch.cuda.current_device() == self._index):
            self._direct(dst.data_ptr(), src.data_ptr(), nbytes, stream.cuda_stream)
        else:
            dst[:nbytes].copy_(src[:nbytes], non_blocking=True)

    def _decode_slot(self, arena: VramArena, staging: int, slot: int, lane: int) -> None:
        """Staging buffer -> slot on the current stream: the arena's prepared decoder, or the
        `decode` hook given to the engine."""
        if self._decode is _default_decode:
            if arena.decodes:
                arena.decoder.decode(staging, slot, lane)
            return
        self._decode(arena, arena.staging(staging) if arena.decodes else arena.raw_view(slot), arena.tensors(slot))

    def _copy_cuda(self, src, slot, arena, nbytes, demand, after, prior=None, src_pinned=None) -> Transfer:
        stream = self.demand_stream if demand else self.prefetch_stream
        try:
            pinned = src_pinned if src_pinned is not None else (not isinstance(src, torch.Tensor) or src.is_pinned())
            if not pinned:
                with self._lock:
                    self._n["pageable"] += 1
            if arena.decodes:
                event = self._copy_and_decode_cuda(src, slot, arena, nbytes, demand, after, stream, prior, pinned)
            else:
                with _on_stream(stream):
                    if after is not None:
                        after.make_stream_wait(stream)
                    if prior is not None and prior._event is not None:
                        stream.wait_event(prior._event)
                    self._land(src, slot, arena, nbytes, 0, stream=stream, pinned=pinned)
                    event = self._pool.get()
                    event.record(stream)
        except Exception as e:  # noqa: BLE001 - carried to wait(), as on the CPU path
            with self._lock:
                self._n["failed"] += 1
            return Transfer(demand=demand, nbytes=nbytes, slot=slot, error=e)
        t = Transfer(demand=demand, nbytes=nbytes, slot=slot, event=event, pool=self._pool, src=src)
        self._pending.append(t)
        while self._pending and self._pending[0].done():
            self._pending.popleft()
        return t

    def _copy_and_decode_cuda(self, src, slot, arena, nbytes, demand, after, stream, prior=None, pinned=False):
        """MXFP4: the compressed bytes land in a staging buffer on the copy stream; the decode
        into the slot runs on a companion decode stream. Each copy stream rotates over its own
        staging buffers, so the next copy overlaps this decode (the copy engine and the SMs
        work at once). Returns the event recorded after the decode."""
        _check_copy(src, arena, nbytes)
        half = max(1, arena.num_staging // 2)
        base = 0 if demand or arena.num_staging < 2 else half
        turn = self._staging_turn[demand]
        self._staging_turn[demand] = turn + 1
        k = base + turn % half
        staging = arena.staging(k)
        decode_stream = self.decode_streams[demand]
        free = self._staging_free.get((id(arena), k))
        if free is None:  # one engine-owned event per buffer, re-recorded after each decode
            free = self._staging_free[(id(arena), k)] = torch.cuda.Event()
        with _on_stream(stream):
            stream.wait_event(free)  # the previous decode from this buffer has read it
            self._h2d(staging, src, nbytes, stream, pinned)
            landed = self._pool.get()
            landed.record(stream)
        with _on_stream(decode_stream):
            decode_stream.wait_event(landed)
            self._pool.put(landed)  # a wait captures the event's state now; re-recording later is safe
            if after is not None:  # the decode writes the slot: it waits for the slot's release
                after.make_stream_wait(decode_stream)
            if prior is not None and prior._event is not None:  # and for an earlier fill of it
                decode_stream.wait_event(prior._event)
            self._decode_slot(arena, k, slot, lane=int(demand))  # one scratch lane per decode stream
            done = self._pool.get()
            done.record(decode_stream)
            free.record(decode_stream)
        return done

    # -- the CPU copy thread ------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, (src, slot, arena, nbytes, after, fut) = heapq.heappop(self._heap)
                self._running += 1
            self._run_copy(src, slot, arena, nbytes, after, fut, lane=0)
            with self._cv:
                self._running -= 1

    def _run_copy(self, src, slot, arena, nbytes, after, fut: Future, *, lane: int) -> None:
        """One CPU copy now, on this thread; its outcome goes to `fut`. Lane k uses staging
        buffer k and decode scratch k: the copy thread lane 0, inline copies lane 1."""
        if not fut.set_running_or_notify_cancel():
            return
        t0 = time.perf_counter()
        err = None
        try:
            if after is not None:
                after.make_stream_wait()  # CPU fences are complete; a CUDA one would block here
            self._land(src, slot, arena, nbytes, lane)
        except Exception as e:  # noqa: BLE001 - carried to wait()
            err = e
        with self._cv:
            self._busy_s += time.perf_counter() - t0
            if err is not None:
                self._n["failed"] += 1
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)

    # -- fences, stats, shutdown ------------------------------------------------------------
    def fence(self, stream=None) -> SlotFence:
        """Record "everything enqueued so far on `stream` (default: current)" NOW. CPU: complete."""
        if not self.is_cuda:
            return SlotFence()
        event = self._pool.get()
        event.record(stream or torch.cuda.current_stream(self.device))
        return SlotFence(event, self._pool)

    def stats(self) -> CopyStats:
        with self._lock:
            n = dict(self._n)
            if self.is_cuda:
                in_flight, busy = sum(not t.done() for t in list(self._pending)), None
            else:
                in_flight, busy = len(self._heap) + self._running, self._busy_s
        return CopyStats(copies_demand=n["demand"], copies_prefetch=n["prefetch"], bytes=n["bytes"],
                         failed=n["failed"], copies_pageable=n["pageable"], in_flight=in_flight, busy_s=busy)

    # Shutdown order: (1) refuse new copies; (2) CPU: fail every queued copy with EngineClosed
    # (their Transfers re-raise it), CUDA: poll both copy streams until idle or the deadline, then
    # synchronize (a copy already on the DMA engine cannot be cancelled); (3) CPU: join the copy
    # thread with the remaining time; a copy stuck in a user decode leaves a daemon thread behind
    # rather than hanging shutdown; (4) release pooled events.
    def close(self, timeout: float = 5.0) -> None:
        """Stop within about `timeout` seconds; idempotent."""
        deadline = time.monotonic() + timeout
        if self.is_cuda:
            self._closed = True
            for s in (self.demand_stream, self.prefetch_stream):
                while not s.query() and time.monotonic() < deadline:
                    time.sleep(1e-3)
                s.synchronize()
            self._pool.closed = True
            self._pool._free.clear()
            self._pending.clear()
            self._staging_free.clear()
            return
        with self._cv:
            self._closed = True
            queued, self._heap = self._heap, []
            self._cv.notify_all()
        for *_, (_, _, _, _, _, fut) in queued:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineClosed("copy engine closed before this copy ran"))
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> CopyEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
