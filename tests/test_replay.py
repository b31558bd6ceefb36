"""`prefetch-bench replay` in CPU mode on a tiny store: every method runs, the JSON is complete and
structurally right, outputs through the pipeline equal the resident reference bit for bit, bad
input is one line with exit 2 and no JSON, and the lru-lookahead policy prefetches the hinted experts."""
from __future__ import annotations

import json

import pytest
import torch

from adapters.store import StoreCheckpoint
from pipeline.bench.cli import main as bench
from pipeline.bench.methods import baseline_methods, select
from pipeline.assembly import vram_slots_for
from pipeline.bench.replay import (Model, access_keys, build_passes, device_rows, device_weights, direct_fetch, emulate_hints,
                                   run_loop, run_method)
from pipeline.vram_arena import VramArena
from policies.cache.belady import belady_min
from policies.cache.registry import make_policy
from policies.events import Activation, Tier
from policies.synthetic import SyntheticConfig, generate
from policies.traces import first_layers, load_trace, save_trace
from tests.helpers_pipeline import build_tiny_store, no_leaks, run_ours_on_stored_experts  # noqa: F401

# tiny preset: 3 MoE layers x 8 experts, top-2, hidden 64


def _trace(path, layers=3, experts=8, top_k=2, requests=1, **kw):
    cfg = SyntheticConfig(layers=layers, experts=experts, top_k=top_k, requests=requests, prompt_tokens=3,
                          decode_tokens=10, seed=1, **kw)
    save_trace(generate(cfg), path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    store = build_tiny_store(root, "mxfp4")
    return store, _trace(root / "t.npz"), root


def _replay(setup, tmp_path, capsys, *flags) -> tuple[dict, str]:
    """`prefetch-bench replay` on the CPU over the shared tiny store and trace with `flags`;
    (its JSON, what it printed). Fails the test on a non-zero exit, showing stderr."""
    store, trace, _ = setup
    out = tmp_path / "r.json"
    rc = bench(["replay", "--store", str(store), "--trace", str(trace), "--device", "cpu", "--no-progress",
                "--readers", "1", "--json", str(out), *flags])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    return json.loads(out.read_text()), printed.out


def test_baselines_cpu(setup, tmp_path, capsys, no_leaks):  # noqa: F811
    store, trace, _ = setup
    out = tmp_path / "r.json"
    rc = bench(["replay", "--store", str(store), "--trace", str(trace), "--vram", "0.5", "--baselines",
                "--device", "cpu", "--json", str(out), "--no-progress", "--readers", "1"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "STAND-IN" in text and "EMULATED" in text
    res = json.loads(out.read_text())
    assert res["complete"] is True
    for key in ("settings", "environment", "store", "trace", "limits", "budgets", "stand_in", "lookahead"):
        assert key in res
    for key in ("machine", "card", "driver", "torch"):
        assert key in res["environment"]
    assert res["limits"]["h2d_raw_gbps"] > 0 and res["limits"]["disk_raw_gbps"] > 0
    (b,) = res["budgets"]
    rows = {r["method"]: r for r in b["methods"]}
    assert list(rows) == [m.name for m in baseline_methods()]
    # --vram-form auto (the default) is dense on the CPU, for the budget and every row
    assert res["settings"]["vram_form"] == "auto" and b["vram_form"] == "dense" and "stored" not in b
    assert {r["vram_form"] for r in rows.values()} == {"dense"}
    read_bytes = res["store"]["expert_read_bytes"]
    for r in rows.values():
        assert r["skipped"] is None, r
        assert r["tokens"] == res["tokens"] and r["tokens_per_s"] > 0
        assert 0 <= r["vram_hit_rate"] <= 1 and (r["ram_hit_rate"] is None or 0 <= r["ram_hit_rate"] <= 1)
        for k in ("ms_per_token", "stall_ms_per_token", "gb_h2d", "gb_nvme", "h2d_gbps", "nvme_gbps",
                  "ratio_oracle", "ratio_on_demand"):
            assert r[k] is not None and r[k] >= 0, (r["method"], k)
        if r["vram_slots"] == b["vram_slots"]:  # no loading scheme beats Belady's MIN from a warm start
            assert round(r["gb_h2d"] * 1e9) // read_bytes >= b["belady_loads_warm"], r["method"]
        # the phases apart: the prefill pass's seconds plus the decode passes' mean per token
        decode_tokens = r["tokens"] - res["prefill_tokens"]
        assert r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0 and 0 < res["prefill_tokens"] < r["tokens"]
        assert r["prefill_s"] + r["decode_ms_per_token"] * decode_tokens / 1e3 == pytest.approx(r["seconds"])
        assert 0 <= r["evictions_vram_fallback"] <= r["evictions_vram"]
        assert 0 <= r["fetches_via_loop"] <= r["fetches"] and r["fetches"] > 0
        ev = r["actor_events"]  # one event per fetch, handed to the loop (the last may still be on the way)
        assert 0 < ev["received"] <= r["fetches"]
        assert ev["processed"] + ev["coalesced"] + ev["dropped"] <= ev["received"] and ev["processed"] > 0
        # the untimed set-up, apart: opening the pipeline (processes, arenas), the warm-up, the
        # history (here none: only the actor catching up)
        assert set(r["setup_s"]) == {"open", "warm", "history"} and r["setup_s"]["open"] > 0, r["setup_s"]
        assert f"set-up {r['method']} @ 0.5: open" in text
    assert rows["resident"]["vram_hit_rate"] == 1.0 and rows["resident"]["gb_h2d"] == 0
    assert all(r["allocator"] is None for r in rows.values())  # torch's CUDA allocator: off CUDA, none
    assert rows["on-demand"]["vram_hit_rate"] <= 0.05 and rows["on-demand"]["gb_nvme"] == 0
    assert rows["on-demand-disk"]["ram_hit_rate"] <= 0.05 and rows["on-demand-disk"]["gb_nvme"] > 0
    # disk reads are the loop thread's: on-demand-disk hops there, resident never does
    assert rows["on-demand-disk"]["fetches_via_loop"] > 0 and rows["resident"]["fetches_via_loop"] == 0
    assert rows["on-demand"]["ratio_on_demand"] == pytest.approx(1.0)
    # the bound is never above the math with everything resident
    assert b["oracle_tokens_per_s"] <= rows["resident"]["tokens_per_s"] * (1 + 1e-9)
    # Belady from the best warm start: the cold count less the first vram_slots distinct experts
    keys = set()
    for p in build_passes(load_trace(trace), include_prefill=True):
        keys |= {(layer, e) for layer, ids in enumerate(p.ids) for e in ids}
    assert b["belady_loads_warm"] == max(0, b["belady_loads"] - min(b["vram_slots"], len(keys)))
    assert 0 <= b["belady_loads_warm"] < b["belady_loads"]


@pytest.mark.parametrize("per_expert_waits,vram_form", [(False, "dense"), (True, "dense"), (False, "stored"),
                                                        (True, "stored")])
def test_pipeline_outputs_bit_identical_to_resident_reference(setup, per_expert_waits, vram_form):
    store_dir, trace_path, _ = setup
    store = StoreCheckpoint(store_dir)
    spec = store.spec
    passes = build_passes(load_trace(trace_path), include_prefill=True, limit=8)
    assert passes[0].n > 1  # a prefill pass is in the mix
    model = Model(spec, torch.device("cpu"), seed=3)
    ref = run_loop(model, passes, direct_fetch(store, torch.device("cpu")), keep_outputs=True).outputs
    hints = emulate_hints(passes, spec.num_experts, 0.8, 0)
    (m,) = select(baseline_methods(), ["lru-lookahead"])
    vslot = VramArena.slot_bytes_for(store)
    rslot = store.index.max_read_length
    run = run_method(store_dir, store, m, 4 * vslot, 6 * rslot, passes, model, hints, device="cpu",
                     readers=1, keep_outputs=True, per_expert_waits=per_expert_waits, vram_form=vram_form)
    assert run.after.vram_misses > 0  # experts really moved through the tiers
    assert run.vram_slots == vram_slots_for(store, 4 * vslot, vram_form)[0]
    for a, b in zip(ref, run.loop.outputs, strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_warm_passes_times_the_passes_after_the_history(setup, tmp_path, capsys):
    res, text = _replay(setup, tmp_path, capsys, "--warm-passes", "3", "--tokens", "4", "--methods", "ours")
    everything = build_passes(load_trace(setup[1]), include_prefill=True)
    assert res["passes"] == 4 and res["tokens"] == sum(p.n for p in everything[3:7])
    assert res["history"] == {"passes": 3, "tokens": sum(p.n for p in everything[:3])}
    assert "after 3 untimed passes of its history" in text and "RAM holds" not in text
    (row,) = res["budgets"][0]["methods"]
    assert f"history {row['setup_s']['history']:.1f} s" in text
    # the bound is the timed window's: Belady over passes 3..6 alone
    b = res["budgets"][0]
    spec = StoreCheckpoint(setup[0]).spec
    keys = access_keys(everything[3:7], spec.num_experts, spec.top_k)
    assert b["belady_loads"] == belady_min(keys, b["vram_slots"])[1]
    # without history, a RAM tier below the store says what that run measures, and the way round
    _, text = _replay(setup, tmp_path, capsys, "--tokens", "2", "--methods", "ours")
    assert "RAM holds 12 of 24 experts" in text and "--warm-passes N" in text
    _, text = _replay(setup, tmp_path, capsys, "--tokens", "2", "--methods", "ours", "--ram", "1.0")
    assert "RAM holds" not in text


def test_history_leaves_the_tiers_holding_what_it_used(setup):
    """Passes run as history before the timed run: with VRAM for every expert they use (and less
    than the store), an LRU cache then serves the same passes, timed, without a miss. Two slots of
    slack: the policy frees a slot ahead of the next load (with none, 3-4 misses)."""
    from pipeline.bench.methods import extra_methods

    store_dir, trace_path, _ = setup
    store = StoreCheckpoint(store_dir)
    spec = store.spec
    passes = build_passes(load_trace(trace_path), include_prefill=False)
    used = {(layer, e) for p in passes for layer, ids in enumerate(p.ids) for e in ids}
    slots = len(used) + 2
    assert slots < spec.num_layers * spec.num_experts  # else the synthetic warm-up alone would do
    hints = emulate_hints(passes, spec.num_experts, 0.8, 0)
    (lru,) = extra_methods(["lru"], None)
    vslot = VramArena.slot_bytes_for(store)
    rslot = store.index.max_read_length
    model = Model(spec, torch.device("cpu"), seed=3)
    misses = {}
    for name, history in (("cold", None), ("history", (passes, hints))):
        run = run_method(store_dir, store, lru, slots * vslot, 24 * rslot, passes, model, hints,
                         device="cpu", readers=1, history=history)
        misses[name] = run.after.vram_misses - run.before.vram_misses
    assert misses["history"] == 0 and misses["cold"] > 0, misses


@pytest.mark.parametrize("per_expert_waits", [False, True])
def test_experts_handed_out_stored_compute_the_resident_values(setup, per_expert_waits):
    """vram_views=0: fetch hands out each expert's stored MXFP4 tensors and the replay computes
    from them (pipeline/kernels/stored_math.py). On the CPU that is an exact decode and the dense
    math, so the outputs equal both the stored resident reference and the dense one bit for bit."""
    store_dir, trace_path, _ = setup
    store = StoreCheckpoint(store_dir)
    spec = store.spec
    passes = build_passes(load_trace(trace_path), include_prefill=True, limit=8)
    model = Model(spec, torch.device("cpu"), seed=3)
    stored_fetch = direct_fetch(store, torch.device("cpu"), stored=True)
    assert "mlp1_weight.blocks" in stored_fetch(0, [1])[0]
    ref = run_loop(model, passes, stored_fetch, keep_outputs=True).outputs
    dense = run_loop(model, passes, direct_fetch(store, torch.device("cpu")), keep_outputs=True).outputs
    run = run_ours_on_stored_experts(store_dir, store, passes, model, "cpu", per_expert_waits)
    assert run.after.vram_misses > 0
    vslot = VramArena.slot_bytes_for(store)
    assert run.vram_slots == vram_slots_for(store, 2 * vslot, "stored", 0)[0] > vram_slots_for(store, 2 * vslot,
                                                                                               "stored")[0]
    for a, b, c in zip(ref, run.loop.outputs, dense, strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        assert torch.equal(a.view(torch.int16), c.view(torch.int16))


def test_router_weights_uploaded_once_per_run_padded_per_pass(setup):
    """The decode loop slices every pass's weights from one device tensor: each layer's
    weights in router order, zeros past a pass's own width (prefill unions are wider)."""
    _, trace, _ = setup
    passes = build_passes(load_trace(trace), include_prefill=True)
    w = device_weights(passes, torch.device("cpu"))
    width = max(len(x) for p in passes for x in p.weights)
    assert w.shape == (len(passes), len(passes[0].ids), width) and w.dtype == torch.float32
    assert any(len(x) < width for p in passes for x in p.weights)  # padding exercised
    for i, p in enumerate(passes):
        for layer, x in enumerate(p.weights):
            assert w[i, layer, :len(x)].tolist() == torch.tensor(x, dtype=torch.float32).tolist()
            assert not w[i, layer, len(x):].any()


def test_prefill_rows_uploaded_once_per_run(setup):
    """A prefill pass's rows per expert are views of one upload made before timing (a per-chunk
    upload from pageable memory would block the host on the stream each time); decode passes
    have none."""
    _, trace, _ = setup
    passes = build_passes(load_trace(trace), include_prefill=True)
    rows = device_rows(passes, torch.device("cpu"))
    assert len(rows) == len(passes) and any(p.rows for p in passes) and any(p.rows is None for p in passes)
    bases = set()
    for p, r in zip(passes, rows, strict=True):
        if p.rows is None:
            assert r is None
            continue
        assert [[t.tolist() for t in layer] for layer in r] == [[list(x) for x in layer] for layer in p.rows]
        bases |= {t.untyped_storage().data_ptr() for layer in r for t in layer if t.numel()}
        assert all(t.dtype == torch.long for layer in r for t in layer)
    assert len(bases) == 1


def test_emulated_hints_recall(setup):
    _, trace_path, _ = setup
    passes = build_passes(load_trace(trace_path), include_prefill=False)
    exact = emulate_hints(passes, 8, 1.0, 0)
    for p, hs in zip(passes, exact):
        assert hs[-1] is None
        for layer, s in enumerate(hs[:-1]):
            assert set((s > 0).nonzero()[0].tolist()) == set(p.ids[layer + 1])
    blind = emulate_hints(passes, 8, 0.0, 0)
    for p, hs in zip(passes, blind):
        for layer, s in enumerate(hs[:-1]):
            assert not set((s > 0).nonzero()[0].tolist()) & set(p.ids[layer + 1])
    assert all((a is None and b is None) or (a == b).all() for x, y in
               zip(emulate_hints(passes, 8, 0.5, 7), emulate_hints(passes, 8, 0.5, 7)) for a, b in zip(x, y))


@pytest.mark.parametrize("dims,what", [(dict(layers=4), "4 layers"), (dict(experts=9), "9 experts"),
                                       (dict(top_k=3), "top-k")])
def test_trace_larger_than_store_refused(setup, tmp_path, capsys, dims, what):
    store, _, _ = setup
    trace = _trace(tmp_path / "big.npz", **dims)
    out = tmp_path / "r.json"
    rc = bench(["replay", "--store", str(store), "--trace", str(trace), "--device", "cpu", "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and what in err and "bin/make-model" in err and "bin/precompute" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert ("replay its first 3 with --layers 3" in err) == (what == "4 layers")  # the way round, where there is one


def test_layers_replays_a_deeper_traces_first_layers(setup, tmp_path, capsys):
    deep = _trace(tmp_path / "deep.npz", layers=5)
    res, _ = _replay(setup, tmp_path, capsys, "--trace", str(deep), "--layers", "3", "--methods", "resident,ours")
    assert res["trace"]["layers"] == 3 and res["settings"]["layers"] == 3
    whole, cut = load_trace(deep), first_layers(load_trace(deep), 3)
    assert (cut.experts == whole.experts[:, :3]).all() and (cut.weights[:, :3] == whole.weights[:, :3]).all()
    assert cut.meta.num_layers == 3 and cut.tokens == whole.tokens and (cut.request == whole.request).all()


@pytest.mark.parametrize("extra,needle", [
    (["--methods", "nonsense"], "on-demand"),  # the valid names are listed
    (["--policy", "nonsense"], "lru-lookahead"),
    (["--vram", "0"], "--vram"),
    (["--vram", "lots"], "--vram"),
    (["--vram", "1KiB"], "top-k"),
    (["--ram", "-1"], "--ram"),
    (["--profile-passes", "-1"], "--profile-passes"),
    (["--prefetch-copies", "-1"], "--prefetch-copies"),
    (["--vram", "0.1", "--vram-form", "stored"], "--vram-form dense"),
    (["--vram-form", "packed"], "--vram-form"),
    (["--expert-math", "mxfp4", "--vram-form", "dense"], "drop --vram-form dense"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--warm-passes", "-1"], "--warm-passes must be >= 0"),
    (["--warm-passes", "500"], "lower --warm-passes"),
    (["--layers", "0"], "--layers must be in [1, 3]"),
    (["--layers", "4"], "--layers must be in [1, 3]"),
    (["--json", "/nonexistent-folder/r.json"], "--json /nonexistent-folder/r.json: its folder"),
    (["--plot", "/nonexistent-folder/r.png"], "--plot /nonexistent-folder/r.png: its folder"),
])
def test_bad_input_one_line_exit_2(setup, tmp_path, capsys, extra, needle):
    store, trace, _ = setup
    out = tmp_path / "r.json"
    rc = bench(["replay", "--store", str(store), "--trace", str(trace), "--device", "cpu", "--json", str(out),
                *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_trace_with_nothing_to_replay_says_so_without_naming_warm_passes(setup, tmp_path, capsys):
    import dataclasses

    store, trace, _ = setup
    t = load_trace(trace)
    save_trace(dataclasses.replace(t, phase=t.phase * 0), tmp_path / "prompt.npz")  # prefill rows only
    out = tmp_path / "r.json"
    rc = bench(["replay", "--store", str(store), "--trace", str(tmp_path / "prompt.npz"), "--device", "cpu",
                "--no-include-prefill", "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "no forward passes to replay (decode rows); try --include-prefill" in err, err
    assert "--warm-passes" not in err and len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("layers", ["4", "0", "x"])
def test_gpu_replay_script_refuses_layers_the_trace_lacks_before_building(setup, tmp_path, layers):
    import os
    import subprocess
    from pathlib import Path

    trace = setup[1]  # 3 layers
    work = tmp_path / "work"
    script = Path(__file__).resolve().parents[1] / "pipeline" / "bench" / "gpu_replay.sh"
    res = subprocess.run(["bash", str(script), str(trace.parent), str(work), trace.stem], capture_output=True,
                         text=True, env={**os.environ, "LAYERS": layers}, timeout=120)
    assert res.returncode == 2 and f"LAYERS={layers} but {trace.stem} has 3 MoE layers; give 1..3" in res.stderr
    assert list(work.iterdir()) == []  # nothing built


def test_missing_store(setup, tmp_path, capsys):
    _, trace, _ = setup
    out = tmp_path / "r.json"
    rc = bench(["replay", "--store", str(tmp_path / "nope"), "--trace", str(trace), "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_lru_lookahead_prefetches_hinted_next_layer():
    p = make_policy("lru-lookahead", None, num_layers=3, num_experts=8, top_k=2, vram_bytes=6, ram_bytes=8)
    hint = {2: tuple(10.0 if e in (5, 7) else 0.0 for e in range(8))}
    # layer 1 runs experts {0, 1}; the hint says layer 2 needs {5, 7} -> plan prefetches (2,5),(2,7)
    plan = p.on_activation(Activation(layer=1, experts=(0, 1), hint=hint))
    assert {(m.layer, m.expert) for m in plan.promotions} == {(1, 0), (1, 1), (2, 5), (2, 7)}
    assert all(m.priority > 0 for m in plan.promotions if m.layer == 2)
    for m in plan.stagings + plan.promotions:
        p.complete(m.layer, m.expert, m.tier, True)
    # layer 2 then needs exactly them: no demand loads
    plan = p.on_activation(Activation(layer=2, experts=(5, 7)))
    assert plan.promotions == () and plan.stagings == ()
    assert p.where(2, 5, Tier.VRAM) == p.where(2, 7, Tier.VRAM) == 2


def test_plot_without_matplotlib_degrades_to_one_line(setup, tmp_path, capsys):
    pytest.importorskip("pytest")
    try:
        import matplotlib  # noqa: F401
        pytest.skip("matplotlib is installed here")
    except ImportError:
        pass
    store, trace, _ = setup
    out, png = tmp_path / "r.json", tmp_path / "p.png"
    rc = bench(["replay", "--store", str(store), "--trace", str(trace), "--device", "cpu", "--json", str(out),
                "--plot", str(png), "--methods", "ours", "--tokens", "3", "--no-progress", "--readers", "1"])
    err = capsys.readouterr().err
    assert rc == 0 and "matplotlib" in err and out.exists() and not png.exists(), err
    assert json.loads(out.read_text())["settings"]["plot"] is None


def test_vram_sweep_and_extra_policy(setup, tmp_path, capsys):
    res, _ = _replay(setup, tmp_path, capsys, "--vram", "0.25", "--vram", "0.75", "--policy", "lru", "--tokens", "4")
    assert [b["vram_slots"] for b in res["budgets"]] == [6, 18]  # of 3 x 8 experts
    for b in res["budgets"]:
        names = [r["method"] for r in b["methods"]]
        assert names == ["ours", "ours-lookahead", "ours-colayer", "lru"]
        assert all(r["vram_slots"] == b["vram_slots"] for r in b["methods"])
    # more VRAM, never fewer Belady hits
    assert res["budgets"][1]["belady_loads"] <= res["budgets"][0]["belady_loads"]


def test_rows_run_once_carry_each_budgets_own_ratios(setup, tmp_path, capsys, monkeypatch):
    """on-demand runs once and appears under every budget; its ratio to the oracle must be
    the one of the budget it is listed under. A slow link (patched in) makes the oracle
    transfer-bound, so it differs between budgets as on a GPU."""
    import pipeline.bench.replay_cmd as cmd

    real = cmd._limits
    monkeypatch.setattr(cmd, "_limits", lambda *a, **kw: {**real(*a, **kw), "h2d_raw_gbps": 1e-4})
    res, _ = _replay(setup, tmp_path, capsys, "--vram", "0.25", "--vram", "0.75", "--methods",
                     "on-demand,lru-lookahead", "--tokens", "4")
    budgets = res["budgets"]
    assert budgets[0]["oracle_tokens_per_s"] != budgets[1]["oracle_tokens_per_s"]
    for b in budgets:
        assert b["oracle_basis"] == "dense"  # on the CPU vram_form auto keeps dense slots
        for r in b["methods"]:
            assert r["ratio_oracle"] == pytest.approx(r["tokens_per_s"] / b["oracle_tokens_per_s"]), (b["vram"], r)


def test_repeat_runs_methods_in_rounds_and_reports_each_median_run(setup, tmp_path, capsys, monkeypatch):
    """--repeat 3: every method is timed three times, in rounds of all methods (a slow spell
    hits all of them alike); each row is its median run, with every run's tokens/s kept."""
    import pipeline.bench.replay as rp

    order = []
    real = rp.run_method
    monkeypatch.setattr(rp, "run_method", lambda store_dir, store, m, *a, **kw: (order.append(m.name),
                                                                                   real(store_dir, store, m, *a, **kw))[1])
    res, out = _replay(setup, tmp_path, capsys, "--vram", "0.25", "--vram", "0.75", "--methods",
                       "on-demand,lru-lookahead", "--tokens", "4", "--repeat", "3")
    # on-demand's budget is top_k slots whatever --vram says: it runs in the first budget only
    assert order == ["on-demand", "lru-lookahead"] * 3 + ["lru-lookahead"] * 3
    for b in res["budgets"]:
        for r in b["methods"]:
            runs = r["repeats"]["tokens_per_s"]
            assert len(runs) == 3 and r["tokens_per_s"] == sorted(runs)[1], r
            assert r["repeats"]["spread"] == pytest.approx(max(runs) / min(runs) - 1)
    assert out.count("each row is the median run") == 2


def test_repeated_resident_runs_bound_with_their_fastest(setup, tmp_path, capsys):
    """With --repeat the bound takes the fastest resident run, not the median: a bound that a
    run of another method beats on a noisy machine is no bound."""
    res, _ = _replay(setup, tmp_path, capsys, "--methods", "resident,on-demand", "--tokens", "4", "--repeat", "3")
    resident = next(r for r in res["budgets"][0]["methods"] if r["method"] == "resident")
    runs = resident["repeats"]["tokens_per_s"]
    assert len(runs) == 3 and len(resident["repeats"]["decode_ms_per_token"]) == 3
    assert res["limits"]["compute_ms_per_token"] == pytest.approx(1e3 / max(runs))
    assert res["limits"]["compute_source"] == "resident method, fastest of 3 runs"


def test_timed_windows_run_with_the_set_up_heap_frozen(setup, tmp_path, capsys, monkeypatch):
    """Every timed window (each method's passes, the compute-only loop) runs with the heap of
    the set-up frozen, and nothing stays frozen after it: a full collection inside one
    method's window and not another's would reorder them."""
    import gc

    import pipeline.bench.replay as rp

    seen = []
    real = rp.run_loop

    def spy(model, passes, fetch, **kw):
        if kw.get("progress") is not None:  # the timed loops pass their progress bar
            seen.append(gc.get_freeze_count())
        return real(model, passes, fetch, **kw)

    monkeypatch.setattr(rp, "run_loop", spy)
    _replay(setup, tmp_path, capsys, "--methods", "on-demand,ours", "--tokens", "4")
    assert len(seen) == 3 and all(n > 1000 for n in seen), seen  # compute-only, on-demand, ours
    assert gc.get_freeze_count() == 0


def test_freeze_start_up_heap_puts_live_objects_beyond_the_collector():
    import gc

    from adapters.child import freeze_start_up_heap

    assert gc.get_freeze_count() == 0
    try:
        freeze_start_up_heap()
        assert gc.get_freeze_count() > 1000  # the modules imported so far
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("ram, buffered", [("1.0", {"ours"}), ("0.5", set())])
def test_only_methods_whose_ram_holds_every_expert_read_through_the_page_cache(setup, tmp_path, capsys,
                                                                               monkeypatch, ram, buffered):
    """Such a method reads the disk only in its untimed warm-up, which the page cache makes fast
    from the second method on; on-demand-disk (RAM = top_k slots) reads while timed, and so does
    any method at RAM 0.5: they keep O_DIRECT."""
    import pipeline.bench.replay as rp

    seen = {}
    real = rp.open_pipeline

    def recording(store_dir, method, *a, **kw):
        pipe = real(store_dir, method, *a, **kw)
        seen[method.name] = pipe.config.o_direct
        return pipe

    monkeypatch.setattr(rp, "open_pipeline", recording)
    res, _ = _replay(setup, tmp_path, capsys, "--ram", ram, "--methods", "on-demand-disk,ours", "--tokens", "4")
    assert {name for name, direct in seen.items() if not direct} == buffered and len(seen) == 2
    assert {r["method"]: r["o_direct"] for r in res["budgets"][0]["methods"]} == seen


def test_median_row_is_a_real_run_and_ignores_skipped_ones():
    from pipeline.bench.report import median_row

    def row(tps, skipped=None):
        return {"method": "m", "tokens_per_s": tps, "decode_ms_per_token": 1.0, "prefill_s": 0.1, "skipped": skipped}

    assert median_row([row(3.0), row(1.0), row(2.0)])["tokens_per_s"] == 2.0
    # an even count takes the lower middle run, not an average that no run measured
    assert median_row([row(4.0), row(1.0), row(3.0), row(2.0)])["tokens_per_s"] == 2.0
    picked = median_row([row(5.0), row(0.0, skipped="does not fit"), row(7.0)])
    assert picked["tokens_per_s"] == 5.0 and picked["repeats"]["tokens_per_s"] == [5.0, 7.0]
    assert median_row([row(0.0, skipped="does not fit")])["skipped"] == "does not fit"


def test_fastest_run_ratios_are_best_against_best_and_a_run_above_the_bound_is_flagged(capsys):
    from pipeline.bench.report import add_ratios, median_row, print_table

    def runs(name, *tps):
        return median_row([{"method": name, "tokens_per_s": t, "decode_ms_per_token": 1.0, "prefill_s": 0.1,
                            "skipped": None} for t in tps])

    rows = [runs("on-demand", 10.0, 20.0, 15.0), runs("ours", 30.0, 90.0, 60.0), runs("resident", 120.0)]
    add_ratios(rows, oracle_tokens_per_s=100.0)
    ours = rows[1]
    assert ours["ratio_oracle"] == pytest.approx(0.6) and ours["ratio_on_demand"] == pytest.approx(4.0)  # medians
    assert ours["repeats"]["best_ratio_oracle"] == pytest.approx(0.9)
    assert ours["repeats"]["best_ratio_on_demand"] == pytest.approx(4.5)  # 90 over on-demand's fastest 20
    budget = {"vram": "0.1", "vram_slots": 4, "ram_slots": 8, "oracle_tokens_per_s": 100.0, "belady_loads_warm": 1,
              "belady_loads": 2}
    # resident holds every expert (more than the budget's 4 slots) and moves nothing: above the
    # bound by right, never flagged
    rows = [{**r, "ms_per_token": 1.0, "stall_ms_per_token": 0.0, "vram_hit_rate": 1.0, "ram_hit_rate": 1.0,
             "gb_h2d": 0.0, "gb_nvme": 0.0, "h2d_gbps": 0.0, "nvme_gbps": 0.0,
             "vram_slots": 24 if r["method"] == "resident" else 4} for r in rows]
    print_table(budget, rows)
    out = capsys.readouterr().out
    assert "fastest 0.90 x oracle, 4.50 x on-demand's fastest" in out and "note:" not in out
    add_ratios(rows, oracle_tokens_per_s=50.0)  # ours' median run of 60 is above a bound of 50
    print_table(budget, rows)
    notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert len(notes) == 1 and "note: ours ran faster than the oracle bound" in notes[0]


@pytest.mark.parametrize("flag, in_child", [(None, True), ("--policy-process", True), ("--no-policy-process", False)])
def test_policy_process_flag_puts_the_policy_in_a_child_by_default(setup, tmp_path, capsys, no_leaks,  # noqa: F811
                                                                    monkeypatch, flag, in_child):
    from policies.process_actor import PolicyProcess

    real, started = PolicyProcess.start, []
    monkeypatch.setattr(PolicyProcess, "start", lambda self: (started.append(self), real(self))[1])
    res, _ = _replay(setup, tmp_path, capsys, "--vram", "0.5", "--methods", "ours", *([flag] if flag else []))
    (row,) = res["budgets"][0]["methods"]
    assert bool(started) is in_child and res["settings"]["policy_process"] is in_child  # a child really started
    assert row["skipped"] is None and row["tokens_per_s"] > 0
    ev = row["actor_events"]  # settled: every event of the timed passes accounted for
    assert ev["received"] > 0 and ev["processed"] + ev["coalesced"] + ev["dropped"] == ev["received"]


def test_per_expert_waits_and_layer_graphs_flags_reach_every_method(setup, tmp_path, capsys, monkeypatch):
    import pipeline.bench.replay as replay

    store, trace, _ = setup
    real, seen = replay.run_method, []

    def recording(*a, **kw):
        seen.append((kw["per_expert_waits"], kw["layer_graphs"]))
        return real(*a, **kw)

    monkeypatch.setattr(replay, "run_method", recording)
    for flag, want in (([], (False, True)), (["--per-expert-waits"], (True, True)),
                       (["--no-layer-graphs"], (False, False))):
        seen.clear()
        rc = bench(["replay", "--store", str(store), "--trace", str(trace), "--vram", "0.5", "--methods",
                    "on-demand,ours", "--tokens", "3", "--device", "cpu", "--no-progress", "--readers", "1", *flag])
        assert rc == 0, capsys.readouterr().err
        assert seen == [want, want]


def test_prefetch_copies_and_policy_options_reach_each_methods_pipeline(setup, tmp_path, capsys, monkeypatch):
    import pipeline.bench.replay as replay

    store, trace, _ = setup
    real, seen = replay.open_pipeline, []

    def recording(store_dir, method, *a, **kw):
        pipe = real(store_dir, method, *a, **kw)
        seen.append((method.name, pipe.config.prefetch_copies, dict(pipe.config.policy_options)))
        return pipe

    monkeypatch.setattr(replay, "open_pipeline", recording)
    out = tmp_path / "r.json"
    rc = bench(["replay", "--store", str(store), "--trace", str(trace), "--vram", "0.5", "--methods",
                "ours,ours-colayer", "--tokens", "3", "--device", "cpu", "--no-progress", "--readers", "1",
                "--prefetch-copies", "1", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    colayer = {"prefetch_min_prob": 0.2, "max_prefetch": 2}
    assert seen == [("ours", 1, {}), ("ours-colayer", 1, colayer)]
    rows = {r["method"]: r for r in json.loads(out.read_text())["budgets"][0]["methods"]}
    assert rows["ours-colayer"]["policy_options"] == colayer and rows["ours-colayer"]["predictor"] == "colayer"


def test_vram_form_stored_gives_budget_methods_more_slots_and_states_its_bound(setup, tmp_path, capsys):
    res, printed = _replay(setup, tmp_path, capsys, "--vram", "0.5", "--methods", "on-demand,ours", "--tokens", "4",
                           "--vram-form", "stored")
    assert "stored MXFP4 in VRAM" in printed
    (b,) = res["budgets"]
    rows = {r["method"]: r for r in b["methods"]}
    assert rows["on-demand"]["vram_form"] == "dense" and rows["on-demand"]["vram_slots"] == 2  # top_k, as always
    assert rows["ours"]["vram_form"] == "stored"
    assert rows["ours"]["vram_slots"] == b["stored"]["vram_slots"] > b["vram_slots"]
    assert b["stored"]["belady_loads"] <= b["belady_loads"]  # more room, never more loads
    assert b["stored"]["oracle_tokens_per_s"] >= b["oracle_tokens_per_s"]
    # the ratios are to the bound for the experts these bytes hold, stored
    assert b["oracle_basis"] == "stored"
    for r in b["methods"]:
        assert r["ratio_oracle"] == pytest.approx(r["tokens_per_s"] / b["stored"]["oracle_tokens_per_s"])


def test_expert_math_mxfp4_hands_every_method_the_stored_form(setup, tmp_path, capsys):
    """--expert-math mxfp4: every method, the fixed-size ones too, keeps stored slots and no dense
    views, so the budget's methods hold more experts than with decode-at-use views."""
    store, _, _ = setup
    res, printed = _replay(setup, tmp_path, capsys, "--vram", "0.2", "--methods", "resident,on-demand,ours",
                           "--tokens", "4", "--expert-math", "mxfp4")
    assert "computed from their stored MXFP4 bytes" in printed
    (b,) = res["budgets"]
    rows = {r["method"]: r for r in b["methods"]}
    assert {r["vram_form"] for r in rows.values()} == {"stored"} and res["expert_math"] == "mxfp4"
    assert rows["on-demand"]["vram_slots"] == 2  # top_k stored slots
    assert rows["resident"]["vram_slots"] == 24 and rows["resident"]["vram_hit_rate"] == 1.0  # 3 x 8, all
    assert rows["ours"]["vram_slots"] == b["stored"]["vram_slots"] == vram_slots_for(
        StoreCheckpoint(store), b["vram_bytes"], "stored", 0)[0] > vram_slots_for(StoreCheckpoint(store),
                                                                                 b["vram_bytes"], "stored")[0]


def test_expert_math_mxfp4_refuses_a_bf16_store(tmp_path, capsys):
    store = build_tiny_store(tmp_path, "bfloat16")
    trace = _trace(tmp_path / "t.npz")
    capsys.readouterr()  # what building the store printed
    rc = bench(["replay", "--store", str(store), "--trace", str(trace), "--device", "cpu", "--expert-math", "mxfp4"])
    err = capsys.readouterr().err
    assert rc == 2 and "--expert-math dense" in err and len(err.strip().splitlines()) == 1, err


def test_a_run_cut_short_keeps_the_budgets_it_finished(setup, tmp_path, monkeypatch):
    """The JSON is rewritten after each VRAM budget: killed during the second, the first stays."""
    import pipeline.bench.replay as replay

    store, trace, _ = setup
    real, calls = replay.run_method, []

    def dies_in_the_second_budget(*a, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # what a timeout's SIGINT or Ctrl-C raises mid-run
        return real(*a, **kw)

    monkeypatch.setattr(replay, "run_method", dies_in_the_second_budget)
    out = tmp_path / "r.json"
    assert bench(["replay", "--store", str(store), "--trace", str(trace), "--vram", "0.5", "--vram", "0.75",
                  "--methods", "lru-lookahead", "--device", "cpu", "--json", str(out), "--no-progress",
                  "--readers", "1"]) == 130
    res = json.loads(out.read_text())
    assert res["complete"] is False and [b["vram"] for b in res["budgets"]] == ["0.5"]
    assert res["budgets"][0]["methods"][0]["tokens_per_s"] > 0
    assert not list(tmp_path.glob(".r.json.*"))  # no temp file left behind


def test_profile_passes_on_the_cpu_says_so_and_records_no_profile(setup, tmp_path, capsys):
    store, trace, _ = setup
    out = tmp_path / "r.json"
    rc = bench(["replay", "--store", str(store), "--trace", str(trace), "--vram", "0.5", "--methods", "ours",
                "--tokens", "3", "--device", "cpu", "--no-progress", "--readers", "1", "--profile-passes", "2",
                "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "needs a CUDA device" in err
    rows = json.loads(out.read_text())["budgets"][0]["methods"]
    assert [r["gpu_profile"] for r in rows] == [None]


@pytest.mark.gpu
def test_profile_passes_measure_copies_and_compute_on_the_gpu(setup):
    store_dir, trace_path, _ = setup
    store = StoreCheckpoint(store_dir)
    passes = build_passes(load_trace(trace_path), True, 6)
    model = Model(store.spec, torch.device("cuda"))
    (m,) = select(baseline_methods(), ["on-demand"])
    vslot = VramArena.slot_bytes_for(store)
    rslot = store.index.max_read_length
    total = store.spec.num_layers * store.spec.num_experts
    mr = run_method(store_dir, store, m, store.spec.top_k * vslot, total * rslot, passes, model, None,
                    device="cuda", readers=1, profile_passes=3)
    p = mr.profile
    assert p["copies_per_token"] > 0 and p["copy_ms_per_token"] > 0  # on-demand copies every expert it uses
    assert p["compute_ms_per_token"] > 0 and p["kernels_per_token"] > 0
    assert p["busy_ms_per_token"] <= p["copy_ms_per_token"] + p["compute_ms_per_token"] + 1e-9
    assert p["busy_ms_per_token"] <= p["window_ms_per_token"] + 1e-9


@pytest.mark.gpu
def test_allocator_counts_cover_the_timed_passes_on_the_gpu(setup, monkeypatch):
    """On CUDA each run counts torch's allocator over its timed passes: a tensor allocated in
    them (patched into the loop) shows up as device mallocs, and nothing retried."""
    import pipeline.bench.replay as rp

    store_dir, trace_path, _ = setup
    store = StoreCheckpoint(store_dir)
    passes = build_passes(load_trace(trace_path), True, 4)
    model = Model(store.spec, torch.device("cuda"))
    (m,) = select(baseline_methods(), ["on-demand"])
    vslot, rslot = VramArena.slot_bytes_for(store), store.index.max_read_length
    total = store.spec.num_layers * store.spec.num_experts
    args = (store_dir, store, m, store.spec.top_k * vslot, total * rslot, passes, model, None)
    quiet = run_method(*args, device="cuda", readers=1)
    assert set(quiet.allocator) == {"cuda_mallocs", "cuda_frees", "malloc_retries", "syncs"}
    kept = []
    real = rp.run_loop

    def allocating(*a, **kw):
        if kw.get("progress") is not None:  # the timed loop only
            kept.append(torch.empty(3 << 30, dtype=torch.uint8, device="cuda"))  # beyond any cached block
        return real(*a, **kw)

    monkeypatch.setattr(rp, "run_loop", allocating)
    loud = run_method(*args, device="cuda", readers=1, progress=lambda n=1: None)
    assert loud.allocator["cuda_mallocs"] >= 1 and loud.allocator["malloc_retries"] == 0


def test_a_prefill_layers_groups_share_one_input_and_add_once(setup):
    """Every group of a prefill layer's union reads the layer's normalised input (as in a real
    MoE layer), so the pass equals h + the sum over groups, each computed from the same x."""
    from pipeline.kernels.expert_mlp import moe_forward
    from pipeline.bench.replay import Pass

    store_dir, _, _ = setup
    store = StoreCheckpoint(store_dir)
    spec = store.spec  # top_k 2: the 3-expert union below is two groups
    model = Model(spec, torch.device("cpu"), seed=5, attn_matmuls=1)
    L = spec.num_layers
    ids, ws, rows = (0, 3, 5), (0.5, 0.3, 0.2), ((0, 2), (1,), (0, 1, 2))
    p = Pass(0, 3, (1, 2, 3), (ids,) * L, (ws,) * L, (rows,) * L)
    fetch = direct_fetch(store, torch.device("cpu"))
    (got,) = run_loop(model, [p], fetch, keep_outputs=True).outputs
    h = model.embed_rows(p.token_ids)
    for layer in range(L):
        h, _ = model.non_expert(h)
        x = model.norm(h)
        groups = [(ids[:2], ws[:2], rows[:2]), (ids[2:], ws[2:], rows[2:])]
        moe = sum(moe_forward(spec.family, fetch(layer, g), x, torch.tensor(w), [torch.tensor(r) for r in rr])
                  for g, w, rr in groups)
        h = h + moe.to(h.dtype)
    assert torch.equal(got, h)


def test_plot_draws_the_bound_the_ratios_use(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from pipeline.bench import report

    row = {"method": "ours", "skipped": None, "tokens_per_s": 50.0, "vram_hit_rate": 0.5}
    budgets = [{"vram": "0.1", "vram_slots": 10, "oracle_tokens_per_s": 60.0, "oracle_basis": "stored",
                "stored": {"oracle_tokens_per_s": 90.0}, "methods": [row]},
               {"vram": "0.2", "vram_slots": 20, "oracle_tokens_per_s": 70.0, "oracle_basis": "dense",
                "methods": [row]}]
    drawn = {}
    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kw):
        drawn[kw.get("label")] = list(args[1])
        return real(self, *args, **kw)

    png = tmp_path / "p.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.axes.Axes, "plot", spy)
        report.plot(png, budgets)
    assert png.stat().st_size > 0 and drawn["oracle bound"] == [90.0, 70.0]


@pytest.mark.parametrize("args, width", [
    ((1, 128, 24, 768, None), 8),  # llama4-like: eight reads at once
    ((1, 128, 24, 1, None), 1),  # on-demand: one VRAM slot
    ((1, 128, 1, 6, None), 3),  # at most half of VRAM, so the policy can place them
    ((1, 128, 24, 120, None), 5),  # and a layer's even share of it (lru-per-layer)
    ((4, 60, 24, 144, 4), 4),  # stored form decoding into top_k dense views
    ((2, 4, 1, 100, None), 4),  # never more than a layer has
    ((4, 60, 24, 541, None), 8),  # stored tensors handed out (vram_views=0): no views to fit
])
def test_fill_width(args, width):
    from pipeline.warm import fill_width

    assert fill_width(*args) == width


class _NoMathModel:
    """Model's part that warm_up calls, with no math: `math` records each expert group's size."""

    device = torch.device("cpu")

    def __init__(self):
        self.math = []

    def embed_rows(self, ids):
        return None

    def non_expert(self, h):
        return h, None

    def experts(self, h, tensors, weights):
        self.math.append(len(tensors))
        return h


def test_warm_up_fills_ram_wide_and_without_math_then_runs_top_k_groups():
    from types import SimpleNamespace

    from pipeline.bench.replay import warm_up

    spec = SimpleNamespace(top_k=2, num_layers=3, num_experts=8)
    fetched, warmed = [], []

    class Pipe:  # the fill's grouping into wide fetches is pipe.warm's (tests/test_warm.py)
        def stats(self):
            return SimpleNamespace(ram_slots=100)

        def warm(self, experts):
            assert not fetched  # the fill comes first
            warmed.extend(experts)

        def fetch(self, layer, ids):
            fetched.append((layer, tuple(ids)))
            return [None] * len(ids)

    model = _NoMathModel()
    warm_up(Pipe(), spec, model)
    assert warmed == [(l, e) for l in range(3) for e in range(8)]  # RAM holds the store: all of it
    assert len(fetched) == 2 * 3 * 4 and all(len(ids) == 2 for _, ids in fetched)  # top_k groups, twice
    assert {(l, e) for l, ids in fetched for e in ids} == set(warmed)
    assert model.math == [2] * len(fetched)  # the math runs only on the top_k rounds


def test_warm_up_below_all_of_ram_warms_what_ram_holds_and_reads_each_once(setup):
    """A RAM tier smaller than the store is warmed with as many experts as it holds, each layer's
    first ones: rounds over every expert would cycle more than RAM holds, each fetch a disk read."""
    from pipeline.bench.replay import open_pipeline, warm_up

    store_dir = setup[0]
    store = StoreCheckpoint(store_dir)
    spec = store.spec  # 3 layers x 8 experts, top-2
    slot = VramArena.slot_bytes_for(store, "dense")
    read = store.index.max_read_length

    from pipeline.bench.methods import extra_methods

    (lru,) = extra_methods(["lru"], None)  # no staging of its own: every disk read is the warm-up's
    with open_pipeline(str(store_dir), lru, 4 * slot, 13 * read, "cpu", 1) as pipe:
        st = pipe.stats()
        assert st.ram_slots == 13  # 5 + 4 + 4 experts warmed
        warm_up(pipe, spec, _NoMathModel())
        sched = pipe.stats().scheduler
        # each warmed expert read once, in the fill: both rounds are served from RAM (or VRAM)
        assert sched.bytes_nvme == 13 * read, sched
        # fill_width 2 here (VRAM 4 slots): ceil(5 / 2) + 2 x ceil(4 / 2) fetches, then 2 rounds of
        # top-2 groups: 3 + 2 + 2
        assert sched.fetches == 7 + 2 * 7


@pytest.mark.parametrize("policy", ["lru-per-layer", "hawkeye", "lfu"])
def test_every_policy_takes_the_wide_warm_up(setup, tmp_path, capsys, policy):
    """The warm-up's first pass fetches several experts of a layer at once: a policy that splits
    VRAM by layer must still place them (the width stays within a layer's share)."""
    # RAM 1.0: every expert warmed, so a fetch wider than a layer's share of VRAM would show
    res, _ = _replay(setup, tmp_path, capsys, "--vram", "0.5", "--ram", "1.0", "--policy", policy, "--methods",
                     policy, "--tokens", "3")
    (row,) = res["budgets"][0]["methods"]
    assert row["skipped"] is None and row["tokens_per_s"] > 0


def test_a_policy_process_that_cannot_start_is_one_line_naming_the_way_round(setup, tmp_path, capsys, monkeypatch):
    from policies.process_actor import PolicyProcess

    def no_spawn(self):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(PolicyProcess, "start", no_spawn)
    store, trace, _ = setup
    out = tmp_path / "r.json"
    rc = bench(["replay", "--store", str(store), "--trace", str(trace), "--methods", "ours", "--tokens", "2",
                "--device", "cpu", "--no-progress", "--readers", "1", "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("prefetch-bench replay: error:")
    assert "Resource temporarily unavailable" in err and "policy_process=False" in err
    _replay(setup, tmp_path, capsys, "--methods", "ours", "--tokens", "2", "--no-policy-process")  # the way round


def test_a_fixed_size_row_copied_into_two_budgets_keeps_each_budgets_fastest_ratio():
    """replay copies a fixed-size method's row (resident, on-demand) into every budget with
    budget_copy; each budget's bound differs, so each copy must keep its own repeats ratios."""
    from pipeline.bench.report import add_ratios, budget_copy, median_row

    row = median_row([{"method": "resident", "tokens_per_s": t, "decode_ms_per_token": 1.0, "prefill_s": 0.1,
                       "skipped": None} for t in (100.0, 120.0)])
    first, second = budget_copy(row), budget_copy(row)
    add_ratios([first], oracle_tokens_per_s=200.0)
    add_ratios([second], oracle_tokens_per_s=50.0)
    assert first["repeats"]["best_ratio_oracle"] == pytest.approx(0.6)
    assert second["repeats"]["best_ratio_oracle"] == pytest.approx(2.4)


def test_launch_noise_times_every_round_and_refuses_empty_loops(capsys):
    from pipeline.bench.launch_noise import main, round_rates

    rates = round_rates(layers=2, rounds=3, tokens=4, pause_s=0.0, hidden=16, device="cpu")
    assert len(rates) == 3 and all(r > 0 for r in rates)
    assert main(["--layers", "2", "--rounds", "2", "--tokens", "3", "--pause", "0", "--hidden", "16"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("pure torch loop tok/s per round:")
    assert "ms the spread says more about the pause than the machine; raise --tokens" in printed.err  # microseconds
    with pytest.raises(SystemExit) as e:
        main(["--rounds", "0"])
    assert e.value.code == 2 and "--rounds must be >= 1, got 0" in capsys.readouterr().err


def test_kernel_representatives_cover_every_launch_shape_once():
    """One pass per new (prefill?, experts per launch) pair, in order; a pass whose launches
    were all seen already is left out."""
    from pipeline.bench.replay import Pass, kernel_representatives

    def decode(*ids):
        return Pass(1, 1, (0,), tuple((e,) if isinstance(e, int) else e for e in ids), (), None)

    def prefill(*unions):
        return Pass(0, 2, (0, 0), unions, (), tuple(((0,),) * len(u) for u in unions))

    a, b = decode((1, 2), (3, 4)), decode((5, 6), (7, 8))  # two experts per launch, both
    c = prefill((1, 2, 3, 4, 5), (1, 2))  # top_k 2: groups of 2, 2, 1 and 2
    d = prefill((1, 2, 3), (4, 5))  # groups of 2 and 1: nothing new
    e = decode((1,), (2, 3))  # a decode launch of one expert: new
    f = prefill((1, 2, 3, 4), (9, 8, 7, 6))  # all groups of 2: nothing new
    assert kernel_representatives([a, b, c, d, e, f], top_k=2) == [a, c, e]
    assert kernel_representatives([d, c], top_k=2) == [d]  # d alone covers c's (prefill, 2) and (prefill, 1)


def test_replay_warms_every_timed_launch_shape_before_timing(setup, tmp_path, capsys, monkeypatch):
    """The first loop the replay runs is the untimed kernel warm-up, over kernel_representatives
    of the timed passes: a prefill group size first met inside a timed loop would compile there."""
    import pipeline.bench.replay as rp

    loops = []
    real = rp.run_loop

    def spy(model, passes, fetch, **kw):
        loops.append((list(passes), kw.get("progress") is not None))
        return real(model, passes, fetch, **kw)

    monkeypatch.setattr(rp, "run_loop", spy)
    # Two requests of 1 prefill + 10 decode passes; the timed window, passes 5-14, starts with
    # decode passes and meets the second request's prefill at pass 11.
    trace = _trace(tmp_path / "two.npz", requests=2)
    _replay(setup, tmp_path, capsys, "--trace", str(trace), "--methods", "on-demand", "--warm-passes", "5",
            "--tokens", "10", "--include-prefill")
    first, timed = loops[0]
    assert not timed and any(p.rows is not None for p in first) and any(p.rows is None for p in first)
    timed_passes = next(ps for ps, t in loops if t)
    assert first == rp.kernel_representatives(timed_passes, top_k=StoreCheckpoint(setup[0]).spec.top_k)
    # The compute-only bound (no resident method here) captures its graphs on the same passes.
    i = next(i for i, (_, t) in enumerate(loops) if t)
    assert i >= 2 and loops[i - 1] == (first, False)
