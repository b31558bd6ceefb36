"""The timed simulator and `prefetch-bench simulate`: exact small cases, CLI contract, targets."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.bench.simulate_cmd import parse_capacity
from policies.cache.registry import DEFAULT_POLICY, DEFAULT_PREDICTOR, make_policy, parse_predictor_spec
from policies.simulator import access_sequence, simulate, truncate, visit_sequence
from policies.traces import load_trace, make_trace, save_trace
from tests.helpers_traces import tiny_trace

from test_policies_narrated import FixedPredictor

ROOT = Path(__file__).resolve().parent.parent


MS = 1e-3


def run(trace, policy, **kw):
    timing = dict(compute_seconds_per_layer=1 * MS, h2d_bytes_per_s=1e9, disk_bytes_per_s=1e8)
    timing.update(kw)
    return simulate(trace, policy, policy_name="t", **timing)


def lru(L, E, vram, ram):
    return make_policy("lru", num_layers=L, num_experts=E, top_k=1, vram_bytes=vram * 1_000_000,
                       ram_bytes=ram * 1_000_000, expert_bytes=1_000_000)


def test_demand_miss_waits_for_disk_then_h2d():
    # 1 MB expert: disk 10 ms, H2D 1 ms, compute 1 ms. Token 1 misses: stall 11 ms;
    # token 2 hits: no stall. Total 13 ms for 2 tokens.
    r = run(tiny_trace([[[0]], [[0]]]), lru(1, 4, 1, 2))
    assert r.loads_vram == 1 and r.loads_ram == 1
    assert r.bytes_h2d == 1_000_000 and r.bytes_nvme == 1_000_000
    assert r.vram_hit_rate == pytest.approx(0.5)
    assert r.stall_seconds_per_token == pytest.approx(11 * MS / 2)
    assert r.tokens_per_second == pytest.approx(2 / (13 * MS))


def test_ram_hit_skips_the_disk():
    # VRAM holds 1 expert, RAM 2: 0, 1, 0 -> the third access finds 0 in RAM (H2D only).
    r = run(tiny_trace([[[0]], [[1]], [[0]]]), lru(1, 4, 1, 2))
    assert r.loads_ram == 2 and r.loads_vram == 3
    assert r.ram_hit_rate == pytest.approx(1 / 3)
    assert r.stall_seconds_per_token == pytest.approx((11 + 11 + 1) * MS / 3)


def prefetching_policy():
    # 2 layers; layer 1 always wants expert 2 (p = 0.9): after layer 0 runs it is prefetched.
    p = np.full((2, 4), 0.01)
    p[1, 2] = 0.9
    return make_policy("nextuse", FixedPredictor(p), num_layers=2, num_experts=4, top_k=1,
                       vram_bytes=4_000_000, ram_bytes=8_000_000, expert_bytes=1_000_000,
                       frequency_weight=0.0, lookahead=1, stage_lookahead=1)


def test_prefetch_is_a_hit_only_if_it_arrived():
    trace = tiny_trace([[[0], [2]]])
    # Layer 0 misses (11 ms), meanwhile (1,2) is staged and copied after it: it arrives
    # 11 ms after layer 0's own transfers started; with 100 ms of compute it is there.
    slow = run(trace, prefetching_policy(), compute_seconds_per_layer=100 * MS)
    assert slow.vram_hit_rate == pytest.approx(0.5) and slow.loads_vram == 2
    # With no compute time layer 1 runs before the prefetch lands: a miss, but not a second load.
    fast = run(trace, prefetching_policy(), compute_seconds_per_layer=0.0)
    assert fast.vram_hit_rate == 0.0 and fast.loads_vram == 2
    assert fast.stall_seconds_per_token > slow.stall_seconds_per_token


def test_demand_overtakes_queued_prefetches():
    # Staging order on the disk link: (0,0) demand first; the prefetch of (1,2) waits. When
    # layer 1 then needs expert 3 instead, its demand goes before nothing else queued, and
    # the result is the same stall as if no prefetch had been issued at all, except the one
    # prefetch already on the wire.
    trace = tiny_trace([[[0], [3]]])
    with_prefetch = run(trace, prefetching_policy(), compute_seconds_per_layer=0.0)
    # layer 0: 10 + 1 ms. Then the disk is busy with (1,2) staging (10 ms, started when the
    # (0,0) staging ended, at 10 ms) until 20 ms; (1,3) demand staging starts at 20 ms, ends
    # at 30 ms, H2D to 31 ms. Layer 1 started waiting at 11 ms -> 20 ms stall.
    assert with_prefetch.stall_seconds_per_token == pytest.approx((11 + 20) * MS)


def test_prefill_passes_are_chunked_to_top_k():
    rows = [[[0, 1]], [[2, 3]], [[0, 2]]]
    trace = tiny_trace(rows, phase=np.array([0, 0, 1]), request=np.zeros(3))
    policy = make_policy("lru", num_layers=1, num_experts=4, top_k=2, vram_bytes=2, ram_bytes=4)
    r = simulate(trace, policy, policy_name="lru", include_prefill=True)
    assert r.tokens == 3 and r.accesses == 6  # the prefill union {0,1,2,3} + the decode row
    assert access_sequence(trace, include_prefill=True).tolist() == [0, 1, 2, 3, 0, 2]
    assert access_sequence(trace).tolist() == [0, 2]
    # The visits schedules are computed over: the same chunks, in the same order.
    assert visit_sequence(trace, include_prefill=True) == [(0, 1), (2, 3), (0, 2)]
    assert visit_sequence(trace) == [(0, 2)]
    # Each visit tells the policy its pass's rows (prefill-aware policies use them)
    policy = make_policy("lru", num_layers=1, num_experts=4, top_k=2, vram_bytes=2, ram_bytes=4)
    seen = []
    original = policy.on_activation
    policy.on_activation = lambda ev: (seen.append((ev.experts, ev.rows)), original(ev))[1]
    simulate(trace, policy, policy_name="lru", include_prefill=True)
    assert seen == [((0, 1), 2), ((2, 3), 2), ((0, 2), 1)]


@pytest.mark.parametrize("text,expected", [("0.1", 10), ("1.0", 100), ("5MB", 5), ("5000000", 5),
                                          ("3MiB", 3), ("1e-1", 10)])
def test_parse_capacity(text, expected):
    assert parse_capacity(text, what="x", expert_bytes=1_000_000, num_experts_total=100) == expected


@pytest.mark.parametrize("text", ["ten", "1.5", "-1", "0.0", "5 XB"])
def test_parse_capacity_rejects(text):
    with pytest.raises(ValueError, match="x"):
        parse_capacity(text, what="x", expert_bytes=1_000_000, num_experts_total=100)


def cli(bin_env, *args):
    return subprocess.run([sys.executable, str(ROOT / "bin" / "prefetch-bench"), "simulate", *args],
                          capture_output=True, text=True, env=bin_env, timeout=120)


@pytest.fixture
def small_trace_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 8, size=(40, 3, 1))
    path = tmp_path / "t.npz"
    save_trace(tiny_trace(rows, num_experts=8), path)
    return path


def test_cli_writes_json_with_belady(bin_env, small_trace_file, tmp_path):
    out = tmp_path / "r.json"
    res = cli(bin_env, "--trace", str(small_trace_file), "--vram-capacity", "0.25", "--policy", "lru",
              "--policy", "nextuse", "--predictor", "ewma", "--json", str(out))
    assert res.returncode == 0, res.stderr
    rep = json.loads(out.read_text())
    assert rep["tokens"] == 40 and rep["vram_capacity_experts"] == 6 and rep["ram_capacity_experts"] == 12
    assert [(r["policy"], r["predictor"]) for r in rep["runs"]] == [("lru", "-"), ("nextuse", "ewma")]
    for r in rep["runs"]:
        for key in ("vram_hit_rate", "ram_hit_rate", "loads_vram", "loads_ram", "bytes_h2d", "bytes_nvme",
                    "stall_seconds_per_token", "tokens_per_second"):
            assert key in r
        # Nothing beats Belady's loads when every access is a demand access.
        assert r["loads_vram"] >= rep["belady"]["loads_vram"]
        assert r["vram_hit_rate"] <= rep["belady"]["vram_hit_rate"] + 1e-12
    assert "belady" in res.stdout.lower() and "nextuse" in res.stdout
    off = rep["offline_prefetch"]  # perfect knowledge, RAM warm: Belady-like loads, the fastest schedule here
    assert off["loads_vram"] >= rep["belady"]["loads_vram"]
    assert off["tokens_per_second"] >= max(r["tokens_per_second"] for r in rep["runs"])
    assert "offline prefetch" in res.stdout


def test_cli_policy_options_reach_the_policy(bin_env, small_trace_file, tmp_path):
    # A threshold above every probability prefetches nothing; one at 0 prefetches whenever
    # there is room: the option must reach the policy to tell the two runs apart.
    out = tmp_path / "r.json"
    res = cli(bin_env, "--trace", str(small_trace_file), "--vram-capacity", "0.5", "--predictor", "colayer",
              "--policy", "nextuse:prefetch_min_prob=1.0", "--policy", "nextuse:prefetch_min_prob=0.0,lookahead=2",
              "--json", str(out))
    assert res.returncode == 0, res.stderr
    never, eager = json.loads(out.read_text())["runs"]
    assert never["policy"] == "nextuse:prefetch_min_prob=1.0" and never["predictor"] == "colayer"
    assert eager["loads_vram"] > never["loads_vram"]


@pytest.mark.parametrize("args,message", [
    (["--policy", "nope"], "unknown policy 'nope'; valid: hawkeye, lfu, lru"),
    (["--predictor", "nope"], "unknown predictor 'nope'; valid:"),
    (["--predictor", "ewma:beta=2"], "unknown option(s) beta"),
    (["--predictor", "ewma:alpha"], "is not key=value"),
    (["--vram-capacity", "lots"], "--vram-capacity 'lots' does not parse"),
    (["--vram-capacity", "10"], "fewer than one layer's top-1 working set"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--policy", "nextuse:prefetch_min_prb=0.2"], "unknown field `prefetch_min_prb`"),
    (["--policy", "nextuse:top_k=2"], "top_k come from the capacities and the trace"),
    (["--policy", "nextuse:lookahead"], "is not key=value (e.g. nextuse:prefetch_min_prob=0.2)"),
])
def test_cli_bad_input_is_one_line_exit_2_no_output(bin_env, small_trace_file, tmp_path, args, message):
    out = tmp_path / "r.json"
    res = cli(bin_env, "--trace", str(small_trace_file), *args, "--json", str(out))
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.glob(".r.json*")) == []


def test_cli_bad_trace_and_missing_size(bin_env, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    res = cli(bin_env, "--trace", str(bad))
    assert res.returncode == 2 and "bad.npz" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    rows = np.zeros((3, 2, 1))
    t = tiny_trace(rows)
    import msgspec

    nosize = make_trace(t.experts, t.weights, t.token_ids, t.phase, t.request,
                        msgspec.structs.replace(t.meta, expert_bytes_bf16=None))
    save_trace(nosize, tmp_path / "n.npz")
    res = cli(bin_env, "--trace", str(tmp_path / "n.npz"))
    assert res.returncode == 2 and "--expert-bytes" in res.stderr
    prefill_only = tiny_trace(np.zeros((3, 2, 1)), phase=np.zeros(3))
    save_trace(prefill_only, tmp_path / "p.npz")
    res = cli(bin_env, "--trace", str(tmp_path / "p.npz"), "--vram-capacity", "0.5")
    assert res.returncode == 2 and "add --include-prefill" in res.stderr
    res = cli(bin_env, "--trace", str(tmp_path / "p.npz"), "--vram-capacity", "0.5", "--include-prefill")
    assert res.returncode == 0, res.stderr


# ---- targets on the shared traces ------------------------------------------------------------
def ratio_to_belady(trace, name, frac):
    from policies.cache.belady import belady_min
    from policies.predictors.registry import make_predictor

    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    cap = int(frac * L * E)
    _, bel = belady_min(access_sequence(trace), cap)
    pname, opts = parse_predictor_spec(DEFAULT_PREDICTOR)
    pred = make_predictor(pname, L, E, K, **opts) if name == DEFAULT_POLICY else None
    pol = make_policy(name, pred, num_layers=L, num_experts=E, top_k=K, vram_bytes=cap * 10**6,
                      ram_bytes=int(0.5 * L * E) * 10**6, expert_bytes=10**6)
    return simulate(trace, pol, policy_name=name).loads_vram / bel


TARGET_TRACES = [("qwen3.6-35b-a3b", None), ("qwen1.5-moe-a2.7b-chat", 300), ("llama4-maverick-mmlu", 600)]


@pytest.fixture(scope="module")
def ratios(real_traces):
    """{(trace, frac): (default policy's loads / Belady, LRU's loads / Belady)}; prefixes of the
    two long traces keep this under a few seconds (full-trace figures: the final report)."""
    out = {}
    for trace_name, rows in TARGET_TRACES:
        trace = load_trace(real_traces / f"{trace_name}.npz")
        if rows:
            trace = truncate(trace, rows)
        for frac in (0.10, 0.25):
            out[trace_name, frac] = (ratio_to_belady(trace, DEFAULT_POLICY, frac),
                                     ratio_to_belady(trace, "lru", frac))
    return out


@pytest.mark.slow
def test_default_policy_beats_lru_on_real_traces(ratios):
    for key, (default, lru_ratio) in ratios.items():
        assert default < lru_ratio, (key, default, lru_ratio)
        assert 1.0 <= default  # nothing beats Belady on demand loads


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the target of <= 1.25x Belady's VRAM loads is not reached: "
                   "the default policy measures 1.45-2.04x on the full traces at 10%/25% (LRU 1.50-2.20x); "
                   "prefetch-bench horizon's rule, knowing the next token's routing exactly, still "
                   "needs 1.32-2.19x")
def test_default_policy_within_125_percent_of_belady(ratios):
    for key, (default, _) in ratios.items():
        assert default <= 1.25, (key, default)


def test_policies_that_cannot_hold_a_layer_are_skipped_with_the_reason(small_trace_file, bin_env, tmp_path):
    # 3 layers x 8 experts, top-1: 2 experts of VRAM hold one layer's working set but not a
    # per-layer share for each of the 3 layers (lru-per-layer), so only that one is skipped.
    out = tmp_path / "r.json"
    r = cli(bin_env, "--trace", str(small_trace_file), "--vram-capacity", "2000000", "--ram-capacity", "0.5",
            "--json", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert list(report["skipped"]) == ["lru-per-layer"]
    assert "smaller than one layer's top-1 working set" in report["skipped"]["lru-per-layer"]
    ran = {run["policy"] for run in report["runs"]}
    assert "lru" in ran and "nextuse" in ran and "lru-per-layer" not in ran
    assert "lru-per-layer  skipped: lru-per-layer: VRAM share per layer" in r.stdout


def test_simulate_fails_when_no_policy_fits(small_trace_file, bin_env):
    r = cli(bin_env, "--trace", str(small_trace_file), "--vram-capacity", "2000000", "--ram-capacity", "0.5",
            "--policy", "lru-per-layer")
    assert r.returncode == 2
    assert r.stderr.startswith("prefetch-bench simulate: error: no policy fits these budgets: lru-per-layer")
