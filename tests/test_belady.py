"""Belady MIN: hand-worked cases, brute-force optimality, and FORMAT.md's reference figures."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from policies.cache.belady import belady_min, next_use, warm_start_loads
from policies.cache.registry import make_policy
from policies.events import Tier
from policies.traces import load_trace


def test_next_use_indices():
    assert next_use([1, 2, 1, 3, 2, 1]).tolist() == [2, 4, 5, 6, 6, 6]


def test_hand_worked_sequence():
    # cache 2: 1 2 (miss miss) 3: evict 2 (next use 6) vs 1 (next use 3) -> evict 2
    # 1 hit; 4: evict 3 (never again) ; 1 hit; 2 miss (evict 4 or 1: both never used again)
    hits, loads = belady_min([1, 2, 3, 1, 4, 1, 2], 2)
    assert (hits, loads) == (2, 5)


def test_capacity_one_hits_only_repeats():
    assert belady_min([5, 5, 6, 6, 6, 5], 1) == (3, 3)


def test_rejects_empty_cache():
    with pytest.raises(ValueError, match="capacity_experts"):
        belady_min([1, 2], 0)


def _brute_force_misses(seq, cap):
    @functools.lru_cache(maxsize=None)
    def best(i, cache):
        if i == len(seq):
            return 0
        x = seq[i]
        if x in cache:
            return best(i + 1, cache)
        if len(cache) < cap:
            return 1 + best(i + 1, cache | {x})
        return 1 + min(best(i + 1, (cache - {v}) | {x}) for v in cache)

    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(12))
def test_matches_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    seq = tuple(rng.integers(0, 5, size=14).tolist())
    cap = int(rng.integers(1, 4))
    hits, loads = belady_min(seq, cap)
    assert hits + loads == len(seq)
    assert loads == _brute_force_misses(seq, cap)


def _decode_keys(trace):
    ex = trace.experts[trace.phase == 1].astype(np.int64)
    keys = np.arange(trace.num_layers)[None, :, None] * trace.num_experts + ex
    return keys.reshape(-1), ex


# FORMAT.md: demand hit rate, one cache shared by all layers, unit-size experts, decode rows.
REFERENCE = {
    "llama4-maverick-mmlu": {0.05: (0.652, 0.795), 0.10: (0.769, 0.870), 0.25: (0.887, 0.949)},
    "qwen1.5-moe-a2.7b-chat": {0.05: (0.000, 0.317), 0.10: (0.168, 0.447), 0.25: (0.357, 0.662)},
    "qwen3.6-35b-a3b": {0.05: (0.357, 0.602), 0.10: (0.526, 0.733), 0.25: (0.779, 0.852)},
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_belady_reproduces_reference_figures(real_traces, name):
    trace = load_trace(real_traces / f"{name}.npz")
    keys, _ = _decode_keys(trace)
    for frac, (_, bel) in REFERENCE[name].items():
        hits, loads = belady_min(keys, int(frac * trace.num_layers * trace.num_experts))
        assert abs(hits / keys.size - bel) <= 0.0015, (name, frac, hits / keys.size)


def _lru_hit_rate(trace, frac):
    """Our LRU policy, every transfer completing at once (pure demand caching)."""
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    cap = int(frac * L * E)
    policy = make_policy("lru", num_layers=L, num_experts=E, top_k=K, vram_bytes=cap, ram_bytes=L * E)
    vram = policy.state[Tier.VRAM]
    hits = total = 0
    for row in trace.experts[trace.phase == 1].tolist():
        for layer, ids in enumerate(row):
            total += len(ids)
            hits += sum(1 for e in ids if vram[layer, e] == 2)
            plan = policy.access(layer, ids)
            for mv in plan.stagings + plan.promotions:
                policy.complete(mv.layer, mv.expert, mv.tier, True)
    return hits / total


@pytest.mark.parametrize("name", ["qwen1.5-moe-a2.7b-chat", "qwen3.6-35b-a3b"])
def test_lru_reproduces_reference_figures(real_traces, name):
    trace = load_trace(real_traces / f"{name}.npz")
    for frac in (0.10, 0.25):
        assert abs(_lru_hit_rate(trace, frac) - REFERENCE[name][frac][0]) <= 0.002


@pytest.mark.slow
def test_lru_reproduces_llama4_reference(real_traces):
    trace = load_trace(real_traces / "llama4-maverick-mmlu.npz")
    assert abs(_lru_hit_rate(trace, 0.10) - REFERENCE["llama4-maverick-mmlu"][0.10][0]) <= 0.0015


def _min_loads_from(initial: frozenset, seq: list[int], cap: int) -> int:
    """MIN (evict the furthest next use) starting with `initial` already cached."""
    cache, loads = set(initial), 0
    for i, k in enumerate(seq):
        if k in cache:
            continue
        loads += 1
        if len(cache) >= cap:
            def nxt(x):
                return next((j for j in range(i + 1, len(seq)) if seq[j] == x), len(seq))
            cache.remove(max(cache, key=nxt))
        cache.add(k)
    return loads


@pytest.mark.parametrize("seed", range(6))
def test_the_best_warm_start_saves_exactly_the_first_capacity_distinct_loads(seed):
    """The replay's oracle lets Belady start warm, as every method does: over every possible
    initial cache content, the fewest loads are what warm_start_loads makes of the cold MIN's."""
    import itertools

    rng = np.random.default_rng(seed)
    seq = rng.integers(0, 6, size=14).tolist()
    distinct = sorted(set(seq))
    for cap in (1, 2, 3):
        _, cold = belady_min(seq, cap)
        best = min(_min_loads_from(frozenset(s), seq, cap)
                   for n in range(cap + 1) for s in itertools.combinations(range(6), n))
        assert best == warm_start_loads(cold, cap, len(distinct)), (seq, cap)
