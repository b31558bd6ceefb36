"""vram_form="stored": VRAM slots hold the MXFP4 bytes as stored, decoded at each use into
dense views. The tensors a fetch hands out must be bit for bit those of a direct load, the
budget must buy more experts than the dense form, and misuse must fail with a clear message."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.store import StoreCheckpoint
from pipeline.api import ExpertPipeline, StagedExperts
from pipeline.assembly import plan_slots
from pipeline.config import PipelineConfig
from pipeline.decode_at_use import view_bytes_for
from pipeline.vram_arena import VramArena
from tests.helpers_pipeline import STORE_DTYPES, build_tiny_store, no_leaks  # noqa: F401
from tests.test_pipeline import assert_same, trace_visits

GPU = pytest.mark.gpu


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("atuse")
    return {d: build_tiny_store(root, d) for d in STORE_DTYPES}


def stored_budget(st: StoreCheckpoint, vram_experts: int, ram_experts: int) -> dict:
    """Budgets that hold exactly `vram_experts` stored-form slots next to one fetch's views."""
    ram_slot = st.index.max_read_length
    return {"vram": view_bytes_for(st, st.spec.top_k) + VramArena.slot_bytes_for(st, "stored") * vram_experts,
            "ram": ram_slot * ram_experts, "vram_form": "stored"}


def _raw(st: StoreCheckpoint, layer: int, e: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(st.read_expert(layer, e)), dtype=torch.uint8)


def test_stored_slots_are_the_read_length_and_refuse_dense_access(stores):
    st = StoreCheckpoint(stores["mxfp4"])
    read = st.index.max_read_length
    stored, dense = VramArena.slot_bytes_for(st, "stored"), VramArena.slot_bytes_for(st, "dense")
    assert stored == -(-read // 256) * 256 and stored < dense
    arena = VramArena(st, 3, "cpu", form="stored")
    assert arena.form == "stored" and not arena.decodes and arena.num_staging == 0
    assert arena.slot_bytes == stored
    assert arena.nbytes == 3 * stored + arena.views.nbytes and arena.views.num_views == st.spec.top_k
    with pytest.raises(ValueError, match=r"slot 1 holds the stored mxfp4 bytes.*views\.decode"):
        arena.tensors(1)
    assert arena.buffer.numel() == 3 * stored
    arena.close()
    with pytest.raises(RuntimeError, match="VramArena is closed"):
        arena.buffer  # noqa: B018 - the property is what raises
    with pytest.raises(ValueError, match="VRAM form 'packed' unknown; valid: dense, stored"):
        VramArena(st, 3, "cpu", form="packed")


def test_decode_at_use_refuses_what_it_cannot_serve(stores):
    from pipeline.decode_at_use import DecodeAtUse

    st = StoreCheckpoint(stores["mxfp4"])
    with pytest.raises(ValueError, match="at least one dense view, got 0"):
        DecodeAtUse(VramArena(st, 3, "cpu", form="stored"), 0)
    with pytest.raises(ValueError, match="num_views=-1"):
        VramArena(st, 3, "cpu", form="stored", num_views=-1)
    with pytest.raises(ValueError, match="needs an mxfp4 store; this one is bfloat16"):
        DecodeAtUse(VramArena(StoreCheckpoint(stores["bfloat16"]), 3, "cpu"), 2)


def test_no_views_hands_out_the_stored_tensors_of_each_slot(stores):
    """num_views=0: no dense views are made, and each slot's stored tensors are views of it."""
    st = StoreCheckpoint(stores["mxfp4"])
    arena = VramArena(st, 3, "cpu", form="stored", num_views=0)
    assert arena.views is None and arena.nbytes == 3 * arena.slot_bytes
    raw = _raw(st, 1, 2)
    arena.raw_view(2)[: raw.numel()].copy_(raw)
    got = arena.stored_tensors(2)
    want = st.stored_views(raw)
    assert list(got) == list(want)
    for role, t in got.items():
        assert t.dtype == want[role].dtype and t.shape == want[role].shape and torch.equal(t, want[role])
        assert arena.raw_view(2).data_ptr() <= t.data_ptr() < arena.raw_view(2).data_ptr() + arena.slot_bytes
    with pytest.raises(ValueError, match="stored_tensors"):
        arena.tensors(2)
    with pytest.raises(ValueError, match="holds dense tensors"):
        VramArena(st, 3, "cpu").stored_tensors(0)


def test_a_bf16_store_is_the_same_in_both_forms(stores):
    st = StoreCheckpoint(stores["bfloat16"])
    arena = VramArena(st, 3, "cpu", form="stored")
    assert arena.form == "dense" and arena.views is None
    assert VramArena.slot_bytes_for(st, "stored") == VramArena.slot_bytes_for(st, "dense")


def _check_every_slot_and_view(st: StoreCheckpoint, device: str) -> int:
    arena = VramArena(st, 3, device, form="stored", num_views=2)
    experts = [(x.layer, x.expert) for x in st.index.experts][:6]
    checked = 0
    for n, (layer, e) in enumerate(experts):
        slot, view = n % arena.num_slots, n % arena.views.num_views
        raw = _raw(st, layer, e)
        arena.raw_view(slot).fill_(0x5A)  # an earlier expert's leftovers must not leak through
        arena.raw_view(slot)[: raw.numel()].copy_(raw.to(device))
        for t in arena.views.tensors(view).values():
            t.view(torch.uint8).fill_(0xFF) if t.element_size() == 1 else t.view(torch.int16).fill_(-1)
        got = arena.views.decode(slot, view)
        assert got is arena.views.tensors(view)
        assert_same({k: v.cpu() for k, v in got.items()}, st.decode_from_buffer(raw), (layer, e, slot, view))
        checked += 1
    arena.close()
    return checked


def _check_batches(st: StoreCheckpoint, device: str) -> int:
    """decode_many: slots in any order into consecutive views, from any first view."""
    arena = VramArena(st, 5, device, form="stored", num_views=4)
    experts = [(x.layer, x.expert) for x in st.index.experts][:5]
    raws = [_raw(st, *key) for key in experts]
    for slot, raw in enumerate(raws):
        arena.raw_view(slot)[: raw.numel()].copy_(raw.to(device))
    checked = 0
    for order, first in (([4, 1, 3], 0), ([2], 3), ([0, 2, 4, 1], 0), ([3, 0], 2)):
        for j in range(arena.views.num_views):
            for t in arena.views.tensors(j).values():
                t.view(torch.uint8).fill_(0xFF) if t.element_size() == 1 else t.view(torch.int16).fill_(-1)
        got = arena.views.decode_many(order, first)
        assert len(got) == len(order)
        for e, slot in enumerate(order):
            assert got[e] is arena.views.tensors(first + e)
            assert_same({k: v.cpu() for k, v in got[e].items()}, st.decode_from_buffer(raws[slot]), (order, first, e))
            checked += 1
    with pytest.raises(IndexError, match="3 experts into dense views 2.. of 4"):
        arena.views.decode_many([0, 1, 2], 2)
    if device == "cuda":  # the later batches went straight to the compiled kernel (triton_launch.py)
        assert arena.views._batch.fast
    arena.close()
    return checked


def test_decode_at_use_is_bit_identical_to_the_general_decode(stores):
    st = StoreCheckpoint(stores["mxfp4"])
    assert _check_every_slot_and_view(st, "cpu") == 6
    assert _check_batches(st, "cpu") == 10


@GPU
def test_decode_at_use_is_bit_identical_on_the_gpu(stores):
    st = StoreCheckpoint(stores["mxfp4"])
    assert VramArena(st, 2, "cuda", form="stored").views._batch is not None  # the batched kernel ran
    assert _check_every_slot_and_view(st, "cuda") == 6
    assert _check_batches(st, "cuda") == 10


BATCHED_ON_CPU = """
import sys
from adapters.store import StoreCheckpoint
from pipeline.fused_decode import BatchDecode
from pipeline.vram_arena import VramArena
from tests.test_decode_at_use import _check_batches, _check_every_slot_and_view
store = StoreCheckpoint(sys.argv[1])
arena = VramArena(store, 2, "cpu", form="stored")
assert arena.views._batch is not None
try:  # slots or views off the kernel's alignment are refused at construction
    BatchDecode(store, arena.buffer, arena.slot_bytes + 8, arena.views._buf, arena.views.view_bytes)
    raise SystemExit("misaligned slots accepted")
except ValueError as e:
    assert "16-byte aligned slots" in str(e), e
print(_check_every_slot_and_view(store, "cpu") + _check_batches(store, "cpu"))
"""


def test_batched_kernel_is_bit_identical_in_tritons_interpreter(stores):
    """The batched decode kernel (pipeline/fused_decode.py) run by Triton's interpreter on CPU
    tensors, where Triton is installed (CI without it relies on the GPU test above)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", BATCHED_ON_CPU, str(stores["mxfp4"])], capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip().splitlines()[-1]) == 16


def test_batched_kernel_compiles_for_hopper():
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pipeline.fused_decode import COMPILE_OPTIONS, _decode_batch

    sig = {"slots": "*u8", "views8": "*u8", "views32": "*i32", "table": "*i32", "desc": "*i64", "first": "i32",
           **{f"i{e}": "i32" for e in range(8)}, "SLOT_BYTES": "constexpr", "VIEW_BYTES": "constexpr",
           "NSEG": "constexpr", "GROUPS": "constexpr"}
    src = ASTSource(fn=_decode_batch, signature=sig,
                    constexprs={"SLOT_BYTES": 13238272, "VIEW_BYTES": 49783808, "NSEG": 4, "GROUPS": 64})
    assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32), options=COMPILE_OPTIONS).asm


def test_the_same_bytes_buy_more_experts_stored_and_the_views_count(stores):
    st = StoreCheckpoint(stores["mxfp4"])
    k = st.spec.top_k
    total = st.spec.num_layers * st.spec.num_experts
    vram = 6 * VramArena.slot_bytes_for(st, "dense")
    dense = plan_slots(PipelineConfig(store=str(stores["mxfp4"]), vram=vram, ram="1MiB"), st)[0]
    stored = plan_slots(PipelineConfig(store=str(stores["mxfp4"]), vram=vram, ram="1MiB", vram_form="stored"), st)[0]
    assert dense == 6
    assert total > stored == (vram - view_bytes_for(st, k)) // VramArena.slot_bytes_for(st, "stored") > dense
    # never more slots than experts: the rest of a large budget stays unallocated
    assert plan_slots(PipelineConfig(store=str(stores["mxfp4"]), vram="1GiB", ram="1GiB", vram_form="stored"),
                      st)[::2] == (total, total)
    short = view_bytes_for(st, k) + (k - 1) * VramArena.slot_bytes_for(st, "stored")
    with pytest.raises(ValueError, match=r"holds 1 experts .* after \d+ bytes of dense views.*at least \d+ bytes"):
        plan_slots(PipelineConfig(store=str(stores["mxfp4"]), vram=short, ram="1MiB", vram_form="stored"), st)
    with pytest.raises(ValueError, match="vram_form 'packed' unknown; valid: auto, dense, stored"):
        PipelineConfig(store=str(stores["mxfp4"]), vram=vram, ram="1MiB", vram_form="packed")


def test_auto_form_is_stored_only_where_decoding_at_use_is_cheap_and_pays(stores, monkeypatch):
    """PipelineConfig's default: stored for an mxfp4 store on CUDA with the batched decode,
    when dense slots cannot hold every expert and stored ones hold more; else dense."""
    from pipeline import assembly

    st, bf16 = StoreCheckpoint(stores["mxfp4"]), StoreCheckpoint(stores["bfloat16"])
    dense_slot = VramArena.slot_bytes_for(st, "dense")
    total = st.spec.num_layers * st.spec.num_experts
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(assembly.fused_decode, "supports", lambda store, device: store.dtype == "mxfp4")
    assert assembly.resolve_vram_form(st, "auto", cuda, 6 * dense_slot) == "stored"
    assert assembly.resolve_vram_form(st, "auto", cuda, total * dense_slot) == "dense"  # dense holds them all
    tight = st.spec.top_k * dense_slot  # the views alone would take it all
    assert assembly.resolve_vram_form(st, "auto", cuda, tight) == "dense"
    assert assembly.resolve_vram_form(st, "auto", "cpu", 6 * dense_slot) == "dense"
    assert assembly.resolve_vram_form(bf16, "auto", cuda, 6 * dense_slot) == "dense"
    assert assembly.resolve_vram_form(st, "dense", cuda, 6 * dense_slot) == "dense"
    assert assembly.resolve_vram_form(st, "stored", "cpu", 6 * dense_slot) == "stored"
    monkeypatch.setattr(assembly.fused_decode, "supports", lambda store, device: False)  # no Triton
    assert assembly.resolve_vram_form(st, "auto", cuda, 6 * dense_slot) == "dense"
    with pytest.raises(ValueError, match="'auto' depends on the device and the budget"):
        VramArena(st, 2, "cpu", form="auto")
    cfg = PipelineConfig(store=str(stores["mxfp4"]), vram=6 * dense_slot, ram="1MiB", device="cpu")
    assert cfg.vram_form == "auto" and plan_slots(cfg, st)[0] == 6  # the CPU: dense


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_fetch_is_bit_exact_under_constant_eviction_stored(stores, device, no_leaks):
    st = StoreCheckpoint(stores["mxfp4"])
    k = st.spec.top_k
    checked = 0
    with ExpertPipeline.open(stores["mxfp4"], **stored_budget(st, k + 1, k + 2), device=device, readers=2) as pipe:
        assert pipe.stats().vram_form == "stored"
        for layer, ids, token in trace_visits(stores["mxfp4"]):
            got = pipe.fetch(layer, ids, token_id=token)
            for e, tensors in zip(ids, got):
                assert_same({r: t.cpu() for r, t in tensors.items()}, st.load_expert(layer, e), (layer, e))
                checked += 1
        s = pipe.stats()
        with pytest.raises(ValueError, match=rf"{k + 1} experts at once but vram_form='stored' decodes into {k} "
                                             rf"dense views; .* vram_views={k + 1} \(or vram_form='dense'\)"):
            pipe.fetch(0, list(range(k + 1)))
    assert checked > 50 and s.vram_slots == k + 1
    assert s.scheduler.evictions_vram > checked // 3


def test_more_views_serve_a_larger_fetch_and_come_out_of_the_budget(stores, no_leaks):
    st = StoreCheckpoint(stores["mxfp4"])
    k, E = st.spec.top_k, st.spec.num_experts
    budget = stored_budget(st, E + 1, 3 * E)  # a fetch of E experts needs E slots too
    assert plan_slots(PipelineConfig(store=str(stores["mxfp4"]), **budget), st)[0] == E + 1
    # E views instead of k take their bytes from the slots: here all but fewer than top_k of them
    assert (budget["vram"] - view_bytes_for(st, E)) // VramArena.slot_bytes_for(st, "stored") < k
    with pytest.raises(ValueError, match=rf"after {view_bytes_for(st, E)} bytes of dense views"):
        plan_slots(PipelineConfig(store=str(stores["mxfp4"]), vram_views=E, **budget), st)
    budget["vram"] += view_bytes_for(st, E) - view_bytes_for(st, k)  # the same slots next to E views
    with ExpertPipeline.open(stores["mxfp4"], vram_views=E, device="cpu", readers=1, **budget) as pipe:
        assert pipe.stats().vram_slots == E + 1 and pipe.stats().vram_views == E
        for layer in range(st.spec.num_layers):  # a prefill-like fetch: every expert of the layer at once
            for e, tensors in enumerate(pipe.fetch(layer, list(range(E)))):
                assert_same(tensors, st.load_expert(layer, e), (layer, e))
    with pytest.raises(ValueError, match="vram_views must be >= 0"):
        PipelineConfig(store=str(stores["mxfp4"]), vram_views=-1, **budget)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_staged_fetch_decodes_hits_at_once_and_copies_at_ready(stores, device, no_leaks):
    st = StoreCheckpoint(stores["mxfp4"])
    k = st.spec.top_k
    checked = 0
    with ExpertPipeline.open(stores["mxfp4"], **stored_budget(st, k + 2, k + 3), device=device, readers=2) as pipe:
        assert pipe.stats().vram_views == k  # the default: one fetch's worth
        for layer, ids, token in trace_visits(stores["mxfp4"]):
            staged = pipe.fetch(layer, ids, token_id=token, wait=False)
            assert isinstance(staged, StagedExperts)
            hits = [i for i in staged.order if staged._transfers[i] is None]
            for i in hits:  # readable before ready(): decoded when the fetch returned
                assert_same({r: t.cpu() for r, t in staged[i].items()}, st.load_expert(layer, ids[i]), (layer, i))
            for i in staged.order:
                staged.ready(i)
                staged.ready(i)  # twice is harmless: one decode
                assert_same({r: t.cpu() for r, t in staged[i].items()}, st.load_expert(layer, ids[i]), (layer, i))
                checked += 1
    assert checked > 50
    # Whether the trace's fetches mix hits and misses depends on when the policy's prefetches
    # land; with LRU (no prefetch) one is made for certain: expert k-1 is still in VRAM, k is not.
    with ExpertPipeline.open(stores["mxfp4"], **stored_budget(st, k + 2, k + 3), device=device, readers=2,
                             policy="lru", predictor=None) as pipe:
        pipe.fetch(0, list(range(k)))
        ids = [k - 1, k]
        staged = pipe.fetch(0, ids, wait=False)
        assert [staged._transfers[i] is None for i in range(2)] == [True, False] and staged.order == (0, 1)
        assert_same({r: t.cpu() for r, t in staged[0].items()}, st.load_expert(0, k - 1), (0, k - 1))
        staged.ready(1)
        assert_same({r: t.cpu() for r, t in staged[1].items()}, st.load_expert(0, k), (0, k))


@GPU
def test_a_stored_slot_and_its_view_outlive_reads_still_queued_on_the_compute_stream(stores, no_leaks):
    # As in test_pipeline's dense version: the compute stream is held busy before it reads
    # expert (0, 1); the next fetch evicts that slot and decodes into the same view. Both the
    # refill and the decode must come after the delayed read.
    st = StoreCheckpoint(stores["mxfp4"])
    k = st.spec.top_k
    with ExpertPipeline.open(stores["mxfp4"], **stored_budget(st, k, 4 * k), device="cuda", readers=1) as pipe:
        first = pipe.fetch(0, list(range(k)))
        torch.cuda._sleep(200_000_000)
        seen = {role: t.clone() for role, t in first[1].items()}
        pipe.fetch(1, list(range(k, 2 * k)))
        torch.cuda.current_stream().synchronize()
        assert_same({r: t.cpu() for r, t in seen.items()}, st.load_expert(0, 1), (0, 1))


def test_no_views_a_pipeline_hands_out_stored_tensors_and_the_whole_budget_is_slots(stores, no_leaks):
    """vram_views=0: no budget goes to dense views, a fetch may ask for as many experts as VRAM
    holds, and each expert comes back as its stored tensors, equal to the store's bytes."""
    st = StoreCheckpoint(stores["mxfp4"])
    E = st.spec.num_experts
    budget = stored_budget(st, E + 1, 3 * E)
    slot = VramArena.slot_bytes_for(st, "stored")
    with ExpertPipeline.open(stores["mxfp4"], vram_views=0, device="cpu", readers=1, **budget) as pipe:
        assert pipe.stats().vram_slots == min(budget["vram"] // slot, st.spec.num_layers * E) > E + 1
        assert pipe.stats().vram_views is None  # no views: nothing bounds a fetch but the slots
        for layer in range(st.spec.num_layers):
            for e, tensors in enumerate(pipe.fetch(layer, list(range(E)))):
                want = st.stored_views(st.read_expert_tensor(layer, e))
                assert list(tensors) == list(want)
                assert all(torch.equal(tensors[r], want[r]) for r in want), (layer, e)
    with pytest.raises(ValueError, match="vram_views=0 hands out the stored MXFP4 tensors.*vram_form='stored'"):
        ExpertPipeline.open(stores["mxfp4"], vram_views=0, device="cpu", readers=1,
                            **{**budget, "vram_form": "dense"})
