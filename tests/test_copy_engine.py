"""CopyEngine: bit-exact RAM -> VRAM slot copies per store dtype, demand before prefetch,
fences before overwrites, errors carried to wait(), bounded close. CPU mode here; the CUDA
path (streams, events, priorities, pinned sources) in the gpu-marked tests at the end."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from pipeline.copy_engine import CopyEngine, CopyStats, EngineClosed, SlotFence, Transfer
from pipeline.vram_arena import VramArena
from tests.helpers_pipeline import bit_pattern, tiny_store  # noqa: F401 - fixture


def ram_slot(st, layer: int, expert: int, *, pin: bool = False) -> torch.Tensor:
    """A RAM slot (read_length bytes, as the reader fills it) holding one expert's bytes."""
    x = st.expert_range(layer, expert)
    buf = torch.zeros(x.read_length, dtype=torch.uint8, pin_memory=pin)
    st.read_expert_into(layer, expert, buf.numpy())
    return buf


def assert_slot_holds(arena: VramArena, slot: int, st, layer: int, expert: int) -> None:
    want = st.load_expert(layer, expert)
    got = arena.tensors(slot)
    assert set(got) == set(want)
    for role, w in want.items():
        g = got[role].cpu()
        assert g.dtype == w.dtype and g.shape == w.shape, role
        assert torch.equal(bit_pattern(g), bit_pattern(w)), f"expert {layer}/{expert} {role} differs"


class Gate:
    """A decode hook that blocks the first copy until released, and logs the slot order of copies."""

    def __init__(self, arena: VramArena, block_first: bool = True):
        self.arena, self.order = arena, []
        self.started, self.release = threading.Event(), threading.Event()
        if not block_first:
            self.release.set()

    def __call__(self, arena, landed, out):
        self.started.set()
        assert self.release.wait(10), "test gate never released"
        if arena.decodes:
            arena.store.decode_from_buffer(landed, arena.device, out=out)
        self.order.append(next(i for i in range(arena.num_slots) if arena.tensors(i) is out))


@pytest.fixture
def engine():
    eng = CopyEngine("cpu")
    yield eng
    eng.close(timeout=2)


def test_every_expert_lands_bit_exact_through_reused_slots(tiny_store, engine):
    st = tiny_store
    arena = VramArena(st, 3, "cpu")
    s = st.spec
    for n, (layer, expert) in enumerate((l, e) for l in range(s.num_layers) for e in range(s.num_experts)):
        src = ram_slot(st, layer, expert)
        nbytes = st.expert_range(layer, expert).length if n % 2 else src.numel()  # length or read_length
        t = engine.copy_in(src, n % 3, arena, nbytes, demand=bool(n % 2), after=engine.fence())
        t.make_stream_wait()
        assert t.done() and t.error is None
        assert_slot_holds(arena, n % 3, st, layer, expert)
    stats = engine.stats()
    total = s.num_layers * s.num_experts
    assert (stats.copies_demand, stats.copies_prefetch) == (total // 2, total - total // 2)
    assert stats.in_flight == 0 and stats.failed == 0 and stats.busy_s > 0


def test_a_batch_of_copies_into_distinct_slots_does_not_mix_them(tiny_store, engine):
    st = tiny_store
    arena = VramArena(st, 6, "cpu")
    srcs = [ram_slot(st, 1, e) for e in range(6)]
    ts = [engine.copy_in(srcs[e], 5 - e, arena, srcs[e].numel(), demand=e == 3) for e in range(6)]
    for t in ts:
        t.make_stream_wait()
    for e in range(6):
        assert_slot_holds(arena, 5 - e, st, 1, e)


def test_source_can_be_reused_once_done(tiny_store, engine):
    st = tiny_store
    arena = VramArena(st, 2, "cpu")
    src = ram_slot(st, 0, 4)
    t = engine.copy_in(src, 1, arena, src.numel(), demand=False)
    while not t.done():
        time.sleep(1e-3)
    src.fill_(0xA5)  # the reader refills the RAM slot: the VRAM copy must not change
    assert_slot_holds(arena, 1, st, 0, 4)


async def test_await_wait_completes_and_done_flips(tiny_store, engine):
    st = tiny_store
    arena = VramArena(st, 2, "cpu")
    gate = Gate(arena)
    eng = CopyEngine("cpu", decode=gate)
    try:
        src = ram_slot(st, 2, 7)
        t = eng.copy_in(src, 0, arena, src.numel(), demand=True)
        assert isinstance(t, Transfer)
        await asyncio.get_running_loop().run_in_executor(None, gate.started.wait, 5)
        assert not t.done() and t.error is None
        waiter = asyncio.ensure_future(t.wait())
        await asyncio.sleep(0.01)
        assert not waiter.done()  # the loop is free while the copy is held
        gate.release.set()
        await asyncio.wait_for(waiter, 5)
        assert t.done() and t.error is None
        assert_slot_holds(arena, 0, st, 2, 7)
    finally:
        gate.release.set()
        eng.close(timeout=2)


async def test_cancelling_a_waiter_does_not_cancel_the_copy(tiny_store):
    st = tiny_store
    arena = VramArena(st, 2, "cpu")
    gate = Gate(arena)
    eng = CopyEngine("cpu", decode=gate)
    try:
        src = ram_slot(st, 0, 1)
        t = eng.copy_in(src, 1, arena, src.numel(), demand=False)
        waiter = asyncio.ensure_future(t.wait())
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        gate.release.set()
        await asyncio.wait_for(t.wait(), 5)
        assert_slot_holds(arena, 1, st, 0, 1)
    finally:
        gate.release.set()
        eng.close(timeout=2)


def test_demand_overtakes_queued_prefetches(tiny_store):
    st = tiny_store
    arena = VramArena(st, 12, "cpu")
    gate = Gate(arena)
    eng = CopyEngine("cpu", decode=gate)
    try:
        srcs = [ram_slot(st, 0, e % 8) for e in range(12)]
        first = eng.copy_in(srcs[0], 0, arena, srcs[0].numel(), demand=False)
        assert gate.started.wait(5)  # slot 0 holds the copy thread
        pre = [eng.copy_in(srcs[i], i, arena, srcs[i].numel(), demand=False) for i in range(1, 10)]
        dem = [eng.copy_in(srcs[i], i, arena, srcs[i].numel(), demand=True) for i in (10, 11)]
        assert eng.stats().in_flight == 12
        gate.release.set()
        for t in [first, *pre, *dem]:
            t.make_stream_wait()
        # slot 0 was already running; then both demands (FIFO between them), then prefetches in order
        assert gate.order == [0, 10, 11, *range(1, 10)]
        for i in range(12):
            assert_slot_holds(arena, i, st, 0, i % 8)
    finally:
        gate.release.set()
        eng.close(timeout=2)


class HeldFence(SlotFence):
    """A fence the test completes by hand: the compute 'stream' is still reading the slot."""

    def __init__(self):
        super().__init__()
        self.passed = threading.Event()

    def done(self) -> bool:
        return self.passed.is_set()

    def make_stream_wait(self, stream=None) -> None:
        assert self.passed.wait(10)


def test_a_slot_is_not_overwritten_before_its_release_fence(tiny_store, engine):
    st = tiny_store
    arena = VramArena(st, 2, "cpu")
    old, new = ram_slot(st, 1, 2), ram_slot(st, 1, 3)
    engine.copy_in(old, 0, arena, old.numel(), demand=True).make_stream_wait()
    fence = HeldFence()
    t = engine.copy_in(new, 0, arena, new.numel(), demand=True, after=fence)
    time.sleep(0.05)
    assert not t.done()
    assert_slot_holds(arena, 0, st, 1, 2)  # the reader still sees the old expert
    fence.passed.set()
    t.make_stream_wait()
    assert_slot_holds(arena, 0, st, 1, 3)


def test_cpu_fences_are_complete_when_recorded(engine):
    f = engine.fence()
    assert f.done()
    f.make_stream_wait()  # nothing to wait for


@pytest.mark.parametrize("case", ["too_few_bytes", "too_many_bytes", "short_source", "wrong_dtype"])
async def test_a_bad_copy_surfaces_at_wait_and_the_engine_goes_on(tiny_store, engine, case):
    st = tiny_store
    arena = VramArena(st, 2, "cpu")
    src = ram_slot(st, 0, 0)
    length = st.expert_range(0, 0).length
    cap = arena.read_length if arena.decodes else arena.slot_bytes
    args = {"too_few_bytes": (src, length - 1, r"copy of \d+ bytes.*needs"),
            "too_many_bytes": (torch.zeros(cap + 64, dtype=torch.uint8), cap + 1, r"copy of \d+ bytes.*needs"),
            "short_source": (src[:length], length + 16 if length + 16 <= cap else cap, "source of only"),
            "wrong_dtype": (src.view(torch.int16), length, "1-D uint8")}[case]
    bad_src, nbytes, msg = args
    t = engine.copy_in(bad_src, 1, arena, nbytes, demand=True)
    with pytest.raises(ValueError, match=msg):
        await asyncio.wait_for(t.wait(), 5)
    assert t.done() and isinstance(t.error, ValueError)
    with pytest.raises(ValueError, match=msg):
        t.make_stream_wait()
    assert engine.stats().failed == 1
    good = engine.copy_in(src, 1, arena, src.numel(), demand=False)
    await asyncio.wait_for(good.wait(), 5)
    assert_slot_holds(arena, 1, st, 0, 0)


def test_a_failing_decode_surfaces_at_wait(tiny_store):
    arena = VramArena(tiny_store, 2, "cpu")

    def broken(arena, landed, out):
        raise RuntimeError("decode exploded")

    eng = CopyEngine("cpu", decode=broken)
    try:
        src = ram_slot(tiny_store, 0, 0)
        t = eng.copy_in(src, 0, arena, src.numel(), demand=False)
        with pytest.raises(RuntimeError, match="decode exploded"):
            t.make_stream_wait()
    finally:
        eng.close(timeout=2)


def test_slot_out_of_range_raises_at_once(tiny_store, engine):
    arena = VramArena(tiny_store, 2, "cpu")
    src = ram_slot(tiny_store, 0, 0)
    with pytest.raises(IndexError, match="slot 2"):
        engine.copy_in(src, 2, arena, src.numel(), demand=True)


def test_close_with_copies_queued_returns_within_its_bound(tiny_store):
    st = tiny_store
    arena = VramArena(st, 4, "cpu")
    gate = Gate(arena)
    eng = CopyEngine("cpu", decode=gate)
    src = ram_slot(st, 0, 0)
    running = eng.copy_in(src, 0, arena, src.numel(), demand=False)
    assert gate.started.wait(5)
    queued = [eng.copy_in(src, i % 4, arena, src.numel(), demand=i % 3 == 0) for i in range(40)]
    t0 = time.monotonic()
    eng.close(timeout=0.3)  # the running copy is stuck in its decode: close must not hang on it
    assert time.monotonic() - t0 < 1.5
    assert all(t.done() and isinstance(t.error, EngineClosed) for t in queued)
    with pytest.raises(RuntimeError, match="closed"):
        eng.copy_in(src, 0, arena, src.numel(), demand=True)
    gate.release.set()
    running.make_stream_wait()  # the copy already running still finishes
    assert_slot_holds(arena, 0, st, 0, 0)
    eng._thread.join(5)
    assert not eng._thread.is_alive()


def test_close_of_an_idle_engine_is_quick_and_idempotent():
    eng = CopyEngine("cpu")
    t0 = time.monotonic()
    eng.close()
    eng.close()
    assert time.monotonic() - t0 < 1 and not eng._thread.is_alive()
    s = eng.stats()
    assert isinstance(s, CopyStats) and s.in_flight == 0


# -- CUDA ------------------------------------------------------------------------------------

@pytest.fixture
def cuda_engine():
    eng = CopyEngine("cuda")
    yield eng
    eng.close(timeout=5)


@pytest.mark.gpu
def test_cuda_every_expert_bit_exact_from_pinned_sources(tiny_store, cuda_engine):
    st = tiny_store
    arena = VramArena(st, 4, "cuda")
    s = st.spec
    keys = [(l, e) for l in range(s.num_layers) for e in range(s.num_experts)]
    for start in range(0, len(keys), 4):
        srcs = [ram_slot(st, l, e, pin=True) for l, e in keys[start:start + 4]]
        assert all(x.is_pinned() for x in srcs)
        fence = cuda_engine.fence()
        ts = [cuda_engine.copy_in(x, i, arena, x.numel(), demand=i % 2 == 0, after=fence)
              for i, x in enumerate(srcs)]
        for t in ts:
            t.make_stream_wait()
        for i, (l, e) in enumerate(keys[start:start + 4]):
            assert_slot_holds(arena, i, st, l, e)  # .cpu() runs on the current stream, which waited
    assert cuda_engine.stats().copies_pageable == 0


@pytest.mark.gpu
def test_cuda_pageable_sources_are_counted_whether_asked_or_told(tiny_store, cuda_engine):
    st = tiny_store
    arena = VramArena(st, 2, "cuda")
    pageable, pinned = ram_slot(st, 0, 0, pin=False), ram_slot(st, 0, 1, pin=True)
    cuda_engine.copy_in(pinned, 0, arena, pinned.numel(), demand=True).make_stream_wait()
    cuda_engine.copy_in(pinned, 1, arena, pinned.numel(), demand=True, src_pinned=True).make_stream_wait()
    assert cuda_engine.stats().copies_pageable == 0
    cuda_engine.copy_in(pageable, 0, arena, pageable.numel(), demand=True).make_stream_wait()  # the driver says
    cuda_engine.copy_in(pageable, 1, arena, pageable.numel(), demand=True, src_pinned=False).make_stream_wait()
    assert cuda_engine.stats().copies_pageable == 2
    assert_slot_holds(arena, 0, st, 0, 0)
    assert_slot_holds(arena, 1, st, 0, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("direct", [True, False])
def test_cuda_pinned_copies_go_straight_to_the_runtime_bit_exact(tiny_store, direct, monkeypatch):
    """Pinned sources go to cudaMemcpyAsync through ctypes (pipeline/cuda_memcpy.py), pageable
    ones through torch; MOE_CACHE_DIRECT_MEMCPY=0 switches the first off. Same bytes either way,
    into dense slots (the staging buffer, for mxfp4) and into stored-form slots."""
    if not direct:
        monkeypatch.setenv("MOE_CACHE_DIRECT_MEMCPY", "0")
    eng = CopyEngine("cuda")
    assert (eng._direct is not None) == direct  # the GPU image's torch loads libcudart
    calls = []
    if direct:
        real = eng._direct
        eng._direct = lambda *a: (calls.append(a[2]), real(*a))[1]
    st = tiny_store
    forms = ("dense", "stored") if st.dtype == "mxfp4" else ("dense",)
    try:
        for form in forms:
            arena = VramArena(st, 2, "cuda", form=form)
            for i, (layer, e, pin) in enumerate(((0, 1, True), (2, 5, True), (1, 3, False))):
                src = ram_slot(st, layer, e, pin=pin)
                n = st.expert_range(layer, e).length
                eng.copy_in(src, i % 2, arena, n, demand=i % 2 == 0, src_pinned=pin).make_stream_wait()
                if form == "dense":
                    assert_slot_holds(arena, i % 2, st, layer, e)
                else:
                    assert torch.equal(arena.raw_view(i % 2)[:n].cpu(), src[:n])
            arena.close()
        assert calls == ([st.expert_range(0, 1).length, st.expert_range(2, 5).length] * len(forms) if direct else [])
        if direct:
            with pytest.raises(RuntimeError, match="cudaMemcpyAsync of 16 bytes host -> device failed: .*error"):
                real(0, 0, 16, eng.demand_stream.cuda_stream)
            torch.cuda._sleep(1000)  # a kernel launch: torch finds no error left behind by the refused copy
            torch.cuda.synchronize()
    finally:
        eng.close(timeout=5)


def test_the_runtime_library_is_found_in_the_process_maps(tmp_path, monkeypatch):
    from pipeline import cuda_memcpy

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 12 /usr/lib/libc.so.6\n"
                    "7f02-7f03 r-xp 00000000 08:01 13 /opt/nvidia/cu13/lib/libcudart.so.13\n"
                    "7f04-7f05 rw-p 00000000 00:00 0 \n")
    assert cuda_memcpy.loaded_cudart(str(maps)) == "/opt/nvidia/cu13/lib/libcudart.so.13"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 12 /usr/lib/libc.so.6\n")
    assert cuda_memcpy.loaded_cudart(str(maps)) is None
    assert cuda_memcpy.loaded_cudart(str(tmp_path / "missing")) is None
    monkeypatch.setattr(cuda_memcpy, "loaded_cudart", lambda: "/nowhere/libcudart.so.13")
    assert cuda_memcpy.direct_h2d() is None  # a path that cannot be loaded: torch's copy_ instead
    monkeypatch.setenv("MOE_CACHE_DIRECT_MEMCPY", "0")
    monkeypatch.setattr(cuda_memcpy, "loaded_cudart", lambda: (_ for _ in ()).throw(AssertionError("looked")))
    assert cuda_memcpy.direct_h2d() is None  # switched off: not even looked for


def _copy_behind_slow_fence(st, engine, slot: int, layer: int, expert: int):
    """(arena, transfer): a demand copy of (layer, expert) into `slot` of a fresh 2-slot arena,
    after a fence on a side stream held busy (~25 ms of GPU sleep), so the copy must queue."""
    arena = VramArena(st, 2, "cuda")
    src = ram_slot(st, layer, expert, pin=True)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        fence = engine.fence(side)
    return arena, engine.copy_in(src, slot, arena, src.numel(), demand=True, after=fence)


@pytest.mark.gpu
def test_cuda_make_stream_wait_orders_the_current_stream_without_host_sync(tiny_store, cuda_engine):
    st = tiny_store
    arena, t = _copy_behind_slow_fence(st, cuda_engine, 1, 2, 5)
    assert not t.done()  # a slow fence holds it: done() did not block
    t.make_stream_wait()
    got = {k: v.clone() for k, v in arena.tensors(1).items()}  # on the current stream, after its wait
    want = st.load_expert(2, 5)
    for k, w in want.items():
        assert torch.equal(bit_pattern(got[k].cpu()), bit_pattern(w)), k


@pytest.mark.gpu
def test_cuda_known_done_only_after_the_host_saw_the_copy_land(tiny_store, cuda_engine):
    st = tiny_store
    arena, t = _copy_behind_slow_fence(st, cuda_engine, 0, 1, 3)
    assert not t.known_done and not t.done()
    torch.cuda.synchronize()
    assert not t.known_done  # landed on the device, but nobody on the host has looked yet
    t.synchronize()
    assert t.known_done and t.done() and t.error is None
    t.make_stream_wait()  # a landed copy: nothing to wait for, and no error
    assert_slot_holds(arena, 0, st, 1, 3)


@pytest.mark.gpu
def test_cuda_fence_keeps_old_contents_for_earlier_readers(tiny_store, cuda_engine):
    st = tiny_store
    arena = VramArena(st, 2, "cuda")
    old, new = ram_slot(st, 0, 1, pin=True), ram_slot(st, 0, 2, pin=True)
    cuda_engine.copy_in(old, 0, arena, old.numel(), demand=True).make_stream_wait()
    torch.cuda._sleep(50_000_000)  # compute still busy when the reader's clone is enqueued
    seen = {k: v.clone() for k, v in arena.tensors(0).items()}
    fence = cuda_engine.fence()
    t = cuda_engine.copy_in(new, 0, arena, new.numel(), demand=True, after=fence)
    assert not fence.done()
    torch.cuda.synchronize()
    assert t.done()
    for k, w in st.load_expert(0, 1).items():
        assert torch.equal(bit_pattern(seen[k].cpu()), bit_pattern(w)), k
    assert_slot_holds(arena, 0, st, 0, 2)


@pytest.mark.gpu
async def test_cuda_await_wait_polls_the_event(tiny_store, cuda_engine):
    st = tiny_store
    arena = VramArena(st, 2, "cuda")
    src = ram_slot(st, 1, 1, pin=True)
    t = cuda_engine.copy_in(src, 0, arena, src.numel(), demand=False)
    await asyncio.wait_for(t.wait(), 10)
    assert t.done() and t.error is None
    assert_slot_holds(arena, 0, st, 1, 1)
    bad = cuda_engine.copy_in(src[:16], 1, arena, 16, demand=True)
    with pytest.raises(ValueError, match="copy of 16 bytes"):
        await asyncio.wait_for(bad.wait(), 10)


@pytest.mark.gpu
def test_cuda_demand_stream_has_the_higher_priority(cuda_engine):
    # lower number = higher priority in CUDA
    assert cuda_engine.demand_stream.priority < cuda_engine.prefetch_stream.priority
    assert cuda_engine.demand_stream != torch.cuda.current_stream()


@pytest.mark.gpu
def test_h2d_probe_measures_a_positive_bandwidth():
    from pipeline.bench.h2d_probe import raw_h2d_bandwidth

    bw = raw_h2d_bandwidth(8 << 20, 3)
    assert 1e8 < bw < 1e12


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_h2d_probe_without_cuda_says_so():
    from pipeline.bench.h2d_probe import raw_h2d_bandwidth

    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        raw_h2d_bandwidth(1 << 20, 2)


@pytest.mark.gpu
def test_the_cheap_stream_context_switches_and_restores_like_torchs():
    from pipeline.copy_engine import _on_stream

    mine, other = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(mine):
        with _on_stream(other):
            assert torch.cuda.current_stream() == other
            x = torch.ones(1 << 20, device="cuda")  # enqueued on `other`
            done = torch.cuda.Event()
            done.record()
        assert torch.cuda.current_stream() == mine  # restored, not the default stream
    done.synchronize()
    assert other.query() and float(x.sum()) == float(1 << 20)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


def test_inline_copies_finish_on_return_and_run_beside_the_copy_thread(tiny_store, engine):
    # CPU: an inline (demand) copy is done when copy_in returns, on the caller's thread, while
    # the copy thread works through queued copies into other slots; they use different
    # staging buffers and decode scratch, so neither corrupts the other.
    st = tiny_store
    arena = VramArena(st, 4, "cpu")
    keys = [(x.layer, x.expert) for x in st.index.experts]
    srcs = {k: ram_slot(st, *k) for k in keys}
    n = 0
    for i in range(0, len(keys) - 3, 2):
        queued = [engine.copy_in(srcs[keys[i + j]], j, arena, st.expert_range(*keys[i + j]).read_length,
                                 demand=False) for j in (0, 1)]
        inline = [engine.copy_in(srcs[keys[i + 2 + j]], 2 + j, arena, st.expert_range(*keys[i + 2 + j]).read_length,
                                 demand=True, inline=True) for j in (0, 1)]
        assert all(t.done() and t.error is None for t in inline)  # done on return, no waiting
        for t in queued + inline:
            t.make_stream_wait()
        for j in range(4):
            assert_slot_holds(arena, j, st, *keys[i + j])
        n += 1
    assert n >= 5 and engine.stats().copies_demand == 2 * n


def test_known_done_never_asks_and_follows_the_copy_thread(tiny_store):
    st = tiny_store
    arena = VramArena(st, 2, "cpu")
    refused = Transfer(demand=True, nbytes=1, slot=0, error=ValueError("refused"))
    assert refused.known_done and refused.done()
    refused.synchronize()  # returns at once: nothing in flight
    gate = Gate(arena)
    with CopyEngine("cpu", decode=gate) as eng:
        src = ram_slot(st, 0, 0)
        t = eng.copy_in(src, 0, arena, src.numel(), demand=False)
        assert gate.started.wait(5)
        assert not t.known_done  # held in the decode hook
        gate.release.set()
        t.synchronize()
        assert t.known_done and t.error is None

