"""The h-token horizon rule (`policies.horizon_bound`) and `prefetch-bench horizon`: the fast rule
against an O(n * C) brute force, h = 0 against the project's LRU, the whole-trace window against
set-constrained Belady, the CLI contract, and one check on a real trace."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.bench.cli import main as bench
from policies.cache.belady import belady_min
from policies.cache.registry import make_policy
from policies.horizon_bound import TIE_BREAKS, horizon_loads, trace_visits
from policies.simulator import access_sequence, count_passes, layer_visits, simulate, truncate, visit_sequence
from policies.synthetic import SyntheticConfig, generate
from policies.traces import decode_steps, first_layers, load_trace, make_trace, save_trace
from tests.helpers_traces import tiny_trace

ROOT = Path(__file__).resolve().parent.parent


def random_trace(rng, *, prefill=False):
    """A small random trace: distinct experts per (row, layer), some -1 entries, a few requests,
    each a run of prefill rows (only with `prefill`) then decode rows."""
    L, E = int(rng.integers(1, 4)), int(rng.integers(2, 9))
    K = int(rng.integers(1, min(3, E) + 1))
    T = int(rng.integers(1, 26))
    ex = np.array([[rng.permutation(E)[:K] for _ in range(L)] for _ in range(T)])
    ex[rng.random(ex.shape) < 0.2] = -1
    request = np.sort(rng.integers(0, 3, size=T))
    phase = np.ones(T)
    if prefill:
        for r in np.unique(request):
            rows = np.flatnonzero(request == r)
            phase[rows[: int(rng.integers(0, rows.size + 1))]] = 0
    return tiny_trace(ex, E, phase, request)


def decode_sets(trace):
    """[(slot, keys)] of the decode visits, straight from the arrays: one per (decode row, layer)."""
    L, E = trace.num_layers, trace.num_experts
    rows = trace.experts[trace.phase == 1]
    return [(p * L + layer, [layer * E + int(e) for e in rows[p, layer] if e >= 0])
            for p in range(rows.shape[0]) for layer in range(L)]


def brute_force(sets, num_layers, capacity, horizon, tie):
    """The rule by its definition, O(n * C): at each miss with a full cache, among the cached
    experts the visit does not need, evict the least recently used (lru) or least often
    needed (freq, then LRU) of those with no use up to the same layer `horizon` passes ahead; if every
    one has such a use, the one used furthest ahead. `horizon=None`: the whole trace."""
    acc = [(slot, key) for slot, members in sets for key in members]
    n = len(acc)
    nxt, later = [n] * n, {}
    for i in range(n - 1, -1, -1):
        nxt[i], later[acc[i][1]] = later.get(acc[i][1], n), i
    cache: dict[int, int] = {}  # key -> position of its last access
    count: Counter = Counter()
    loads = pos = 0
    for slot, members in sets:
        end = math.inf if horizon is None else slot + horizon * num_layers
        for key in members:
            if key in cache:
                continue
            loads += 1
            if len(cache) >= capacity:
                candidates = [k for k in cache if k not in members]
                next_slot = {k: acc[nxt[cache[k]]][0] if nxt[cache[k]] < n else math.inf for k in candidates}
                outside = [k for k in candidates if next_slot[k] > end]
                if outside:
                    victim = min(outside, key=lambda k: cache[k] if tie == "lru" else (count[k], cache[k]))
                else:
                    victim = max(candidates, key=lambda k: nxt[cache[k]])
                del cache[victim]
            cache[key] = -1  # needed by this visit: not a candidate until its position is set below
        for key in members:
            cache[key] = pos
            count[key] += 1
            pos += 1
    return loads


# ---- the rule --------------------------------------------------------------------------------
def test_visits_are_the_simulators():
    rng = np.random.default_rng(7)
    for _ in range(20):
        trace = random_trace(rng, prefill=True)
        for prefill in (False, True):
            v = trace_visits(trace, prefill)
            assert np.array_equal(v.keys, access_sequence(trace, prefill))
            assert [tuple(v.keys[a:b].tolist()) for a, b in zip(v.starts[:-1], v.starts[1:])] \
                == visit_sequence(trace, prefill)
            # the window's clock, checked apart from how trace_visits builds it: pass * L + layer,
            # never going back, the layer that of the visit's keys, one pass per forward pass
            L, E = trace.num_layers, trace.num_experts
            assert (np.diff(v.slot) >= 0).all()
            nonempty = np.diff(v.starts) > 0
            assert np.array_equal((v.slot % L)[nonempty], v.keys[v.starts[:-1][nonempty]] // E)
            assert len(np.unique(v.slot // L)) == count_passes(trace, prefill)


def test_narrated_one_token_ahead_keeps_the_expert_needed_next():
    # One layer, room for 2: experts 0, 1, 2, 0, 1. At 2, LRU evicts 0, needed next, then 0
    # evicts 1 and 1 evicts 2: 5 loads. h=1 sees 0 in the next token and evicts 1 instead;
    # at the last 1, neither 0 nor 2 is used again, so LRU order evicts 2: 4 loads, Belady's.
    v = trace_visits(tiny_trace([[[0]], [[1]], [[2]], [[0]], [[1]]], num_experts=4))
    assert horizon_loads(v, 2, 0, "lru") == 5
    assert horizon_loads(v, 2, 1, "lru") == 4 == belady_min(v.keys, 2)[1]


@pytest.mark.parametrize("prefill", [False, True])
def test_fast_rule_equals_brute_force(prefill):
    rng = np.random.default_rng(1 + prefill)
    for trial in range(40):
        trace = random_trace(rng, prefill=prefill)
        v = trace_visits(trace, prefill)
        if prefill:  # a prefill pass's chunks share their (pass, layer) slot
            L = trace.num_layers
            sets = [(p * L + layer, [layer * trace.num_experts + e for e in ids])
                    for p, step in enumerate(decode_steps(trace, include_prefill=True))
                    for layer, ids in layer_visits(step, trace.top_k)]
        else:
            sets = decode_sets(trace)
        L, K = trace.num_layers, trace.top_k
        for capacity in sorted({K, int(rng.integers(K, L * trace.num_experts + 1))}):
            for h in range(4):
                for tie in ("lru", "freq"):
                    assert horizon_loads(v, capacity, h, tie) == brute_force(sets, L, capacity, h, tie), \
                        (trial, capacity, h, tie)
            assert horizon_loads(v, capacity, None) == brute_force(sets, L, capacity, None, "lru")


def test_an_expert_named_twice_in_one_row_is_one_member_of_its_visit():
    # The format does not forbid it; the visit needs the expert once, so the loads are those of
    # the row without the repeat (and the repeat is a hit for Belady too).
    rng = np.random.default_rng(5)
    for _ in range(20):
        trace = random_trace(rng)
        if trace.top_k < 2:
            continue
        once = trace.experts.copy()
        twice = trace.experts.copy()
        twice[:, :, 1] = np.where(twice[:, :, 0] >= 0, twice[:, :, 0], twice[:, :, 1])
        once[:, :, 1] = np.where(twice[:, :, 0] >= 0, -1, once[:, :, 1])
        a, b = (trace_visits(tiny_trace(x, trace.num_experts, trace.phase, trace.request)) for x in (once, twice))
        capacity = int(rng.integers(trace.top_k, trace.num_layers * trace.num_experts + 1))
        assert belady_min(a.keys, capacity)[1] == belady_min(b.keys, capacity)[1]
        for h in (0, 1, 2, None):
            for tie in ("lru", "freq"):
                assert horizon_loads(a, capacity, h, tie) == horizon_loads(b, capacity, h, tie)


def test_whole_trace_window_is_set_constrained_belady_and_never_beats_belady():
    rng = np.random.default_rng(3)
    for trial in range(40):
        trace = random_trace(rng)
        v = trace_visits(trace)
        rows = trace.tokens
        capacity = int(rng.integers(trace.top_k, trace.num_layers * trace.num_experts + 1))
        set_belady = brute_force(decode_sets(trace), trace.num_layers, capacity, None, "lru")
        _, belady = belady_min(access_sequence(trace), capacity)
        assert set_belady >= belady
        for tie in ("lru", "freq"):
            assert horizon_loads(v, capacity, rows, tie) == set_belady, trial
            for h in range(4):  # not monotone in h, but never below Belady
                assert horizon_loads(v, capacity, h, tie) >= belady


def test_h0_lru_is_the_projects_lru():
    # The project's LRU stamps all experts of one visit with the same step and breaks that tie
    # by the lowest id; the rule keeps the access order. Rows sorted by id make the two agree.
    for seed in range(4):
        t = generate(SyntheticConfig(layers=3, experts=8, top_k=2, requests=2, prompt_tokens=2,
                                     decode_tokens=40, seed=seed))
        trace = make_trace(np.sort(t.experts, axis=2), t.weights, t.token_ids, t.phase, t.request, t.meta)
        L, E, K = trace.num_layers, trace.num_experts, trace.top_k
        v = trace_visits(trace)
        for capacity in (K, 5, 9, 16):
            policy = make_policy("lru", num_layers=L, num_experts=E, top_k=K, vram_bytes=capacity,
                                 ram_bytes=L * E, expert_bytes=1)
            assert horizon_loads(v, capacity, 0, "lru") == simulate(trace, policy, policy_name="lru").loads_vram, \
                (seed, capacity)


@pytest.mark.parametrize("kwargs,message", [
    (dict(capacity=2, horizon=1, tie_break="mru"), "unknown tie-break 'mru'; valid: freq, lru"),
    (dict(capacity=2, horizon=-1), "horizon must be >= 0"),
    (dict(capacity=1, horizon=1), "capacity 1 experts is below the widest visit (2 experts)"),
])
def test_bad_arguments_raise_with_the_numbers(kwargs, message):
    v = trace_visits(tiny_trace([[[0, 1]], [[2, 3]]], num_experts=4))
    with pytest.raises(ValueError, match=re.escape(message)):
        horizon_loads(v, **kwargs)


# ---- prefetch-bench horizon ---------------------------------------------------------------------
@pytest.fixture
def synthetic_trace_file(tmp_path):
    path = tmp_path / "t.npz"
    save_trace(generate(SyntheticConfig(layers=3, experts=8, top_k=2, requests=2, prompt_tokens=3,
                                        decode_tokens=30, seed=1)), path)
    return path


def test_cli_prints_the_table_and_writes_the_figures(synthetic_trace_file, tmp_path, capsys):
    out = tmp_path / "h.json"
    rc = bench(["horizon", "--trace", str(synthetic_trace_file), "--vram-capacity", "0.25", "--vram-capacity",
                "0.5", "--horizon", "0", "--horizon", "2", "--json", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    lines = printed.out.splitlines()
    assert "Belady" in lines[1] and "h=0" in lines[1] and "h=2" in lines[1] and "all" in lines[1]
    assert len(lines) == 4 and lines[2].startswith("t ") and lines[3].split()[1:3] == ["0.5", "12"]
    rep = json.loads(out.read_text())
    trace = load_trace(synthetic_trace_file)
    v = trace_visits(trace)
    assert rep["passes"] == 60 and rep["tie_break"] == "best" and rep["accesses"] == v.keys.size
    assert [r["capacity_experts"] for r in rep["capacities"]] == [6, 12]
    for row in rep["capacities"]:
        c = row["capacity_experts"]
        assert row["belady_loads"] == belady_min(access_sequence(trace), c)[1]
        assert row["whole_trace_loads"] == horizon_loads(v, c, None)
        assert [h["horizon"] for h in row["horizons"]] == [0, 2]
        for h in row["horizons"]:
            lru, freq = horizon_loads(v, c, h["horizon"], "lru"), horizon_loads(v, c, h["horizon"], "freq")
            assert (h["lru"], h["freq"], h["loads"]) == (lru, freq, min(lru, freq))
            assert h["x_belady"] == pytest.approx(h["loads"] / row["belady_loads"])
            assert f"{h['x_belady']:.3f}" in printed.out


def test_cli_layers_measures_the_first_layers_as_replay_replays_them(synthetic_trace_file, tmp_path, capsys):
    out = tmp_path / "h.json"
    rc = bench(["horizon", "--trace", str(synthetic_trace_file), "--layers", "2", "--vram-capacity", "0.5",
                "--horizon", "1", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(out.read_text())
    v = trace_visits(first_layers(load_trace(synthetic_trace_file), 2))
    (row,) = rep["capacities"]
    assert rep["layers"] == 2 and rep["accesses"] == v.keys.size and row["capacity_experts"] == 8  # 0.5 x 2 x 8
    assert row["horizons"][0]["loads"] == min(horizon_loads(v, 8, 1, t) for t in ("lru", "freq"))


def test_cli_from_bin_with_one_tie_break(bin_env, synthetic_trace_file, tmp_path):
    out = tmp_path / "h.json"
    res = subprocess.run([sys.executable, str(ROOT / "bin" / "prefetch-bench"), "horizon", "--trace",
                          str(synthetic_trace_file), "--tie-break", "lru", "--max-tokens", "20", "--include-prefill",
                          "--json", str(out)], capture_output=True, text=True, env=bin_env, timeout=60)
    assert res.returncode == 0, res.stderr
    rep = json.loads(out.read_text())
    assert rep["rows"] == 20 and rep["passes"] == 1 + 17 and rep["include_prefill"]
    assert [r["fraction"] for r in rep["capacities"]] == [0.1, 0.25]
    assert [h["horizon"] for h in rep["capacities"][0]["horizons"]] == [0, 1, 2, 4, 8]
    assert all("freq" not in h and h["tie_break"] == "lru" for r in rep["capacities"] for h in r["horizons"])


@pytest.mark.parametrize("args,message", [
    (["--trace", "MISSING"], "no such file"),
    (["--vram-capacity", "0"], "--vram-capacity '0': give a fraction of all experts strictly between 0 and 1"),
    (["--vram-capacity", "1"], "strictly between 0 and 1"),
    (["--vram-capacity", "-0.1"], "strictly between 0 and 1"),
    (["--vram-capacity", "lots"], "--vram-capacity 'lots'"),
    (["--vram-capacity", "6GiB"], "bytes and counts are not accepted"),
    (["--vram-capacity", "0.05"], "holds 1 of 24 experts, fewer than one layer's top-2 working set"),
    (["--horizon", "-1"], "--horizon must be >= 0"),
    (["--tie-break", "mru"], "--tie-break 'mru' is unknown; valid: best, freq, lru"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--layers", "4"], "--layers must be in [1, 3]"),
    (["--max-tokens", "2"], "nothing to measure"),
    (["--json", "/nonexistent-folder/h.json"],
     "--json /nonexistent-folder/h.json: its folder /nonexistent-folder does not exist"),
])
def test_cli_bad_input_is_one_line_exit_2_no_json(synthetic_trace_file, tmp_path, capsys, args, message):
    out = tmp_path / "h.json"
    trace = [] if "--trace" in args else ["--trace", str(synthetic_trace_file)]
    json_out = [] if "--json" in args else ["--json", str(out)]
    rc = bench(["horizon", *trace, *args, *json_out])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and list(tmp_path.glob(".h.json*")) == []


def test_cli_malformed_trace(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    rc = bench(["horizon", "--trace", str(bad), "--json", str(tmp_path / "h.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.npz" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "h.json").exists()


# ---- a real trace ------------------------------------------------------------------------------
def test_one_token_of_foresight_lies_between_belady_and_lru_on_qwen15(real_traces):
    trace = truncate(load_trace(real_traces / "qwen1.5-moe-a2.7b-chat.npz"), 300)
    v = trace_visits(trace)
    capacity = int(0.1 * trace.num_layers * trace.num_experts)
    _, belady = belady_min(v.keys, capacity)
    h1 = horizon_loads(v, capacity, 1, "freq")
    lru = horizon_loads(v, capacity, 0, "lru")
    assert belady < h1 < lru, (belady, h1, lru)


def test_the_cli_offers_the_rules_tie_breaks_and_best():
    from pipeline.bench.horizon_cmd import TIE_BREAK_CHOICES

    assert sorted(TIE_BREAK_CHOICES) == sorted(("best", *TIE_BREAKS))
