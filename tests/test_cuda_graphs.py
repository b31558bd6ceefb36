"""The replay's CUDA graphs (pipeline/bench/cuda_graphs.py, Model.graphs): a graph replays the
eager math bit for bit, follows a slot's new contents after a reload, is captured once per
slot, and on the CPU the scope changes nothing."""
from __future__ import annotations

import pytest
import torch

from adapters.store import StoreCheckpoint
from pipeline.bench.cuda_graphs import GraphCache, kernel_copy
from pipeline.bench.methods import baseline_methods, select
from pipeline.bench.replay import Model, build_passes, direct_fetch, emulate_hints, run_loop, run_method
from pipeline.vram_arena import VramArena
from policies.synthetic import SyntheticConfig, generate
from policies.traces import load_trace, save_trace
from tests.helpers_pipeline import build_tiny_store

# tiny preset: 3 MoE layers x 8 experts, top-2, hidden 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    store = build_tiny_store(root, "mxfp4")
    cfg = SyntheticConfig(layers=3, experts=8, top_k=2, requests=2, prompt_tokens=3, decode_tokens=12, seed=4)
    save_trace(generate(cfg), root / "t.npz")
    return store, root / "t.npz"


def _bits(outputs):
    return [o.view(torch.int16) for o in outputs]


def test_graph_cache_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        GraphCache(torch.device("cpu"))


def test_graphs_scope_is_a_no_op_on_cpu(setup):
    store_dir, trace = setup
    store = StoreCheckpoint(store_dir)
    model = Model(store.spec, torch.device("cpu"), seed=2)
    passes = build_passes(load_trace(trace), include_prefill=True, limit=6)
    plain = run_loop(model, passes, direct_fetch(store, torch.device("cpu")), keep_outputs=True).outputs
    with model.graphs():
        scoped = run_loop(model, passes, direct_fetch(store, torch.device("cpu")), keep_outputs=True).outputs
        assert model.graph_captures == 0
    assert all(torch.equal(a, b) for a, b in zip(_bits(plain), _bits(scoped), strict=True))


@pytest.mark.gpu
def test_graph_follows_the_tensors_it_reads_and_captures_once():
    dev = torch.device("cuda")
    cache = GraphCache(dev)
    a = torch.arange(8, dtype=torch.float32, device=dev)
    out = torch.empty_like(a)
    (y,) = cache.run("k", lambda: (a * 2 + 1,), (out,))
    assert torch.equal(y, a * 2 + 1) and y is out
    a.copy_(torch.full_like(a, 5.0))  # new contents at the same address, like a reloaded slot
    cache.run("k", lambda: (a * 2 + 1,), (out,))
    assert torch.equal(out, torch.full_like(a, 11.0)) and cache.captures == 1
    cache.run("other", lambda: (a - 1,), (out,))
    assert torch.equal(out, torch.full_like(a, 4.0)) and cache.captures == 2


@pytest.mark.gpu
def test_graphed_replay_is_bit_identical_to_eager(setup):
    """Through a pipeline with 3 VRAM slots for 24 experts (every slot reloaded many times),
    with the graphs on and off, each expert after its own copy or after all, against the eager
    resident reference."""
    store_dir, trace = setup
    store = StoreCheckpoint(store_dir)
    spec = store.spec
    dev = torch.device("cuda")
    passes = build_passes(load_trace(trace), include_prefill=True)
    assert passes[0].n > 1 and any(p.n == 1 for p in passes)  # prefill (eager) and decode (graphs)
    model = Model(spec, dev, seed=3)
    ref = run_loop(model, passes, direct_fetch(store, dev), keep_outputs=True).outputs
    hints = emulate_hints(passes, spec.num_experts, 0.8, 0)
    vslot = VramArena.slot_bytes_for(store)
    rslot = store.index.max_read_length
    # (VRAM slots hold decoded tensors, or the stored MXFP4 decoded at each use into views)
    for name, form, vram in (("on-demand", "dense", 3 * vslot), ("lru-lookahead", "dense", 3 * vslot),
                             ("lru-lookahead", "stored", 4 * vslot)):
        (m,) = select(baseline_methods(), [name])
        runs = {(g, w): run_method(store_dir, store, m, vram, 24 * rslot, passes, model, hints,
                                   device="cuda", readers=1, keep_outputs=True, cuda_graphs=g, per_expert_waits=w,
                                   vram_form=form)
                for g in (True, False) for w in (False, True)}
        assert runs[True, False].after.vram_misses > 20  # slots really were reloaded under the graphs
        for key, r in runs.items():
            assert all(torch.equal(a, b) for a, b in zip(_bits(ref), _bits(r.loop.outputs), strict=True)), \
                (name, form, key)


@pytest.mark.gpu
def test_one_graph_per_slot(setup):
    store_dir, trace = setup
    store = StoreCheckpoint(store_dir)
    dev = torch.device("cuda")
    passes = [p for p in build_passes(load_trace(trace), include_prefill=False)]
    model = Model(store.spec, dev, seed=3)
    cache: dict = {}

    def fetch(layer, ids, rows=1):  # 8 distinct weight sets, reused across layers
        for e in ids:
            if e not in cache:
                cache[e] = store.load_expert(0, e, dev)
        return [cache[e] for e in ids]

    with model.graphs():
        run_loop(model, passes, fetch)
        assert model.graph_captures == 1 + len(cache) + 1  # the stand-in, one per weight set, the weighted sum


@pytest.mark.gpu
def test_stored_form_runs_a_layer_as_one_graph(setup):
    """Stored-form fetches land in the same dense views, so each decode layer is one graph
    (the stand-in, one layer graph per view tuple); dense slots need one graph per slot."""
    store_dir, trace = setup
    store = StoreCheckpoint(store_dir)
    passes = build_passes(load_trace(trace), include_prefill=False)
    model = Model(store.spec, torch.device("cuda"), seed=3)
    vslot = VramArena.slot_bytes_for(store)
    rslot = store.index.max_read_length
    (m,) = select(baseline_methods(), ["lru-lookahead"])
    runs = {form: run_method(store_dir, store, m, 4 * vslot, 24 * rslot, passes, model, None, device="cuda",
                             readers=1, vram_form=form) for form in ("stored", "dense")}
    assert runs["stored"].graphs == 2  # the stand-in + the layer over views (0, 1)
    assert runs["dense"].graphs == 1 + runs["dense"].vram_slots + 1


def _every_bf16() -> torch.Tensor:
    """All 65536 bf16 bit patterns but NaNs (whose payload a kernel may quieten)."""
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return x[~torch.isnan(x)].reshape(1, -1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_kernel_copy_is_bit_exact_for_every_value(device):
    src = _every_bf16().to(device)
    dst = torch.zeros_like(src)
    assert kernel_copy(dst, src) is dst
    assert torch.equal(dst.cpu().view(torch.int16), src.cpu().view(torch.int16))

