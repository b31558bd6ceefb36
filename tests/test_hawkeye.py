"""Hawkeye: OPTgen reconstructs Belady, the predictor learns a hot set, bad config is refused."""
from __future__ import annotations

import numpy as np
import pytest

from policies.cache.belady import belady_min
from policies.cache.hawkeye import OptGen
from policies.cache.registry import make_policy
from policies.events import Activation, Tier


def optgen_hits(seq, capacity, window=None):
    og = OptGen(capacity, window or len(seq) + 1, int(max(seq)) + 1)
    return [og.access(int(k)) for k in seq]


def test_optgen_narrated():
    # Two slots. A B A: A stays across B -> hit. C then B: OPT dropped A (never reused) for C.
    assert optgen_hits([0, 1, 0, 2, 1], 2) == [-1, -1, 1, -1, 1]
    # One slot holds only the expert in use: just an immediate repeat hits.
    assert optgen_hits([0, 0, 1, 0, 1, 1], 1) == [-1, 1, -1, 0, 0, 1]


@pytest.mark.parametrize("seed", range(6))
def test_optgen_agrees_with_belady_min(seed):
    rng = np.random.default_rng(seed)
    for _ in range(10):
        n, keys = int(rng.integers(5, 300)), int(rng.integers(2, 40))
        cap = int(rng.integers(1, keys + 1))
        # Skewed keys so that some are hot and reuse distances vary.
        seq = rng.zipf(1.3, size=n) % keys
        hits = sum(1 for o in optgen_hits(seq, cap) if o == 1)
        assert hits == belady_min(seq, cap)[0], (seed, n, keys, cap)


def test_optgen_window_and_sizes():
    # A reuse farther back than the window is unknown, not a hit.
    og = OptGen(4, 3, 8)
    assert [og.access(k) for k in (0, 1, 2, 3, 0)] == [-1, -1, -1, -1, -1]
    assert og.access(0) == 1
    # Sizes in bytes: a 6-byte expert cannot stay beside a 5-byte one in 10 bytes; a 4-byte one can.
    og = OptGen(10, 100, 4)
    assert [og.access(k, s) for k, s in ((0, 6), (1, 5), (0, 6))] == [-1, -1, 0]
    assert [og.access(k, s) for k, s in ((2, 4), (3, 5), (2, 4))] == [-1, -1, 1]
    # Sliding many times over its buffer keeps the answers: every reuse here lies within 5
    # steps, so a window of 5 must answer as an unbounded one does.
    rng = np.random.default_rng(0)
    seq = np.concatenate([rng.permutation(3) for _ in range(200)])
    og = OptGen(2, 5, 3)
    assert [og.access(int(k)) for k in seq] == optgen_hits(seq, 2)


def _replay(name, visits, vram, E):
    """Demand replay with every transfer completing at once; returns hits per visit."""
    policy = make_policy(name, num_layers=1, num_experts=E, top_k=1, vram_bytes=vram, ram_bytes=E)
    hits = []
    for e in visits:
        hits.append(policy.where(0, e, Tier.VRAM) == 2)
        plan = policy.on_activation(Activation(layer=0, experts=(e,)))
        for mv in plan.stagings + plan.promotions:
            policy.complete(mv.layer, mv.expert, mv.tier, True)
        policy.check()
    return np.array(hits), policy


def test_learns_to_keep_a_planted_hot_set():
    # Rounds of: hot experts 0..5, then 10 cold experts from a pool of 58 (a scan). Between
    # two uses of a hot expert come 15 others, more than the 8 slots: LRU always misses them,
    # OPT keeps all six. Hawkeye must learn from OPTgen that they are the ones worth keeping.
    E, hot = 64, list(range(6))
    visits, c = [], 0
    for _ in range(150):
        visits += hot
        for _ in range(10):
            visits.append(6 + c % (E - 6))
            c += 1
    is_hot = np.array([v < 6 for v in visits])
    late = np.arange(len(visits)) >= len(visits) // 2
    hk, policy = _replay("hawkeye", visits, 8, E)
    lru, _ = _replay("lru", visits, 8, E)
    assert lru[is_hot & late].mean() < 0.05  # the trap is real
    assert hk[is_hot & late].mean() > 0.95
    assert policy.friendly[0, :6].all() and not policy.friendly[0, 6:].any()


def _cfg(**kw):
    return dict(num_layers=2, num_experts=8, top_k=2, vram_bytes=4, ram_bytes=8, **kw)


@pytest.mark.parametrize("kw, exc, match", [
    ({"features": ["expert", "pc"]}, KeyError, r"unknown hawkeye feature 'pc'; valid: .*expert.*gap"),
    ({"features": []}, ValueError, "features is empty"),
    ({"order": "fifo"}, KeyError, r"unknown hawkeye order 'fifo'; valid: class, score"),
    ({"window_factor": 0}, ValueError, "window_factor must be > 0, got 0"),
    ({"weight_max": 0}, ValueError, "weight_max must be >= 1"),
    ({"train_margin": -1}, ValueError, "train_margin >= 0"),
    ({"window_factor": "big"}, ValueError, "window_factor"),
])
def test_bad_config_is_one_line_error(kw, exc, match):
    with pytest.raises(exc, match=match) as err:
        make_policy("hawkeye", **_cfg(**kw))
    assert "\n" not in str(err.value)


def test_optgen_bad_arguments():
    with pytest.raises(ValueError, match="capacity, window and num_keys must be >= 1; got 0, 5, 3"):
        OptGen(0, 5, 3)


def test_features_all_run_and_keep_the_book():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 5, size=(3, 10)).tolist()
    policy = make_policy("hawkeye", num_layers=3, num_experts=10, top_k=2, vram_bytes=20, ram_bytes=40,
                         expert_bytes=sizes, features=["expert", "layer", "gap", "rank", "expert-gap"],
                         order="score")
    for t in range(200):
        layer = t % 3
        ids = tuple(int(e) for e in rng.choice(10, size=2, replace=False))
        plan = policy.on_activation(Activation(layer=layer, experts=ids))
        for mv in plan.stagings + plan.promotions:
            policy.complete(mv.layer, mv.expert, mv.tier, True)
        policy.check()
        assert policy.used_bytes(Tier.VRAM) <= 20
    assert any(np.abs(w).sum() > 0 for w in policy.weights)  # it trained
