"""Narrated policy tests: each says what it touches and what must be evicted or fetched."""
from __future__ import annotations

import numpy as np

from policies.cache.base import RESIDENT
from policies.cache.registry import make_policy
from policies.events import Activation, Tier
from policies.predictors.base import Predictor


class FixedPredictor(Predictor):
    """Predicts a matrix the test sets; learns nothing."""

    name = "fixed"

    def __init__(self, p):
        p = np.asarray(p, dtype=float)
        super().__init__(p.shape[0], p.shape[1], 1)
        self.p = p

    def observe(self, event):
        pass

    def predict(self, layer):
        return self.p[layer].copy()


def touch(policy, layer, *experts, complete=True):
    """One visit; transfers complete at once (pure demand caching). Returns the plan."""
    plan = policy.on_activation(Activation(layer=layer, experts=tuple(experts)))
    if complete:
        for mv in plan.stagings + plan.promotions:
            policy.complete(mv.layer, mv.expert, mv.tier, True)
    policy.check()
    return plan


def evicted(plan, tier=Tier.VRAM):
    return [(m.layer, m.expert) for m in plan.evictions if m.tier == tier]


def promoted(plan):
    return [(m.layer, m.expert) for m in plan.promotions]


def lru(name="lru", L=1, E=10, vram=3, ram=10):
    return make_policy(name, num_layers=L, num_experts=E, top_k=1, vram_bytes=vram, ram_bytes=ram)


def test_lru_evicts_least_recently_used():
    p = lru()
    for e in (5, 6, 7):
        assert evicted(touch(p, 0, e)) == []
    assert promoted(touch(p, 0, 5)) == []  # touch 5 again: a hit, 6 is now the oldest
    assert evicted(touch(p, 0, 8)) == [(0, 6)]  # touch 8 -> evicts 6
    assert evicted(touch(p, 0, 9)) == [(0, 7)]  # touch 9 -> evicts 7


def test_lru_shared_cache_crosses_layers():
    p = lru(L=2, E=4, vram=2, ram=8)
    touch(p, 0, 1)
    touch(p, 1, 1)
    assert evicted(touch(p, 0, 2)) == [(0, 1)]  # layer 0's expert is the oldest overall


def test_lru_per_layer_evicts_only_inside_the_layer():
    p = lru("lru-per-layer", L=2, E=4, vram=4, ram=8)  # 2 experts per layer
    touch(p, 0, 1)  # oldest overall
    touch(p, 1, 1)
    touch(p, 1, 2)
    assert evicted(touch(p, 1, 3)) == [(1, 1)]  # not (0, 1): that is layer 0's share
    assert evicted(touch(p, 0, 2)) == []  # layer 0 still has room


def test_lfu_evicts_least_frequently_used_then_oldest():
    p = make_policy("lfu", num_layers=1, num_experts=10, top_k=1, vram_bytes=3, ram_bytes=10)
    for e in (5, 5, 5, 6, 7, 7):
        touch(p, 0, e)
    assert evicted(touch(p, 0, 8)) == [(0, 6)]  # counts 5:3 6:1 7:2 -> evicts 6
    # 8 has count 1, the same as nothing else; 7 (count 2) and 5 (count 3) stay
    assert evicted(touch(p, 0, 9)) == [(0, 8)]
    # ties in count: the least recently used of them goes (9 and 4 both at 1; 9 older)
    assert evicted(touch(p, 0, 4)) == [(0, 9)]


def nextuse(p, vram, **extra):
    pred = FixedPredictor(p)
    L, E = pred.p.shape
    extra.setdefault("frequency_weight", 0.0)  # q = the predictor's p, to narrate exactly
    return make_policy("nextuse", pred, num_layers=L, num_experts=E, top_k=1, vram_bytes=vram,
                       ram_bytes=L * E, **extra)


def test_nextuse_evicts_the_largest_expected_distance():
    p = np.full((2, 4), 0.01)
    p[0, 1], p[1, 2] = 0.1, 0.5
    pol = nextuse(p, vram=2, lookahead=0, stage_lookahead=0)
    touch(pol, 0, 1)
    touch(pol, 1, 2)
    # after layer 0 runs: (0,1) is needed in 2 + 2*(1/0.1 - 1) = 20 steps,
    # (1,2) in 1 + 2*(1/0.5 - 1) = 3 steps -> evicts (0,1), although (1,2) is more recent
    assert evicted(touch(pol, 0, 3)) == [(0, 1)]


def test_nextuse_layer_order_breaks_equal_probabilities():
    p = np.full((3, 4), 0.5)
    pol = nextuse(p, vram=2, lookahead=0, stage_lookahead=0)
    touch(pol, 1, 0)
    touch(pol, 2, 0)
    # equal p: after layer 0 runs, layer 1 comes in 1 step, layer 2 in 2 -> evicts (2,0)
    assert evicted(touch(pol, 0, 3)) == [(2, 0)]


def test_nextuse_prefetches_only_what_comes_before_the_victim():
    p = np.full((3, 4), 0.01)
    p[1, 2] = 0.9
    pol = nextuse(p, vram=2, lookahead=1, stage_lookahead=0)
    plan = touch(pol, 0, 0)
    # (1,2) is likely at the next layer and VRAM has room -> prefetched, priority = its time
    pre = [m for m in plan.promotions if (m.layer, m.expert) == (1, 2)]
    assert pre and pre[0].priority > 0.0
    # Now VRAM holds (0,0) and (1,2). Make (2,3) likely but (1,2) even sooner and likelier:
    pol.predictor.p[2, 3] = 0.6
    plan = touch(pol, 1, 2)  # after layer 1: (2,3) expected in 1 + 3*(1/0.6-1) = 3 steps,
    # the victim (0,0) in 2 + 3*(1/0.01-1) = 299 -> prefetch (2,3), evicting (0,0)
    assert promoted(plan) == [(2, 3)] and evicted(plan) == [(0, 0)]
    pol.predictor.p[0, 1] = 0.6
    pol.predictor.p[2, 3] = 0.95
    pol.predictor.p[1, 2] = 0.95
    plan = touch(pol, 2, 3)  # after layer 2: (0,1) at 0.6 is due in 1 + 3*(1/0.6-1) = 3;
    # victim (1,2) at 0.95 is due in 2 + 3*(1/0.95-1) = 2.16 -> sooner: no prefetch
    assert promoted(plan) == [] and evicted(plan) == []


def test_watermark_price_follows_overload():
    L, E = 2, 8
    pred = FixedPredictor(np.full((L, E), 0.9))
    pol = make_policy("watermark", pred, num_layers=L, num_experts=E, top_k=1, vram_bytes=2,
                      ram_bytes=4, step_size=0.5)
    lam0 = pol.lam[Tier.VRAM]
    for t in range(10):
        touch(pol, t % L, t % E)
    # every expert "wanted" (p=0.9) against room for 2 of 16 -> the VRAM price rises
    assert pol.lam[Tier.VRAM] > lam0
    pred.p[:] = 0.0
    for t in range(200):
        touch(pol, t % L, 0)
    assert pol.lam[Tier.VRAM] == 0.0  # nothing wanted -> the price falls to its floor


def test_watermark_admits_above_price_and_evicts_only_below_it():
    L, E = 3, 8
    pred = FixedPredictor(np.full((L, E), 0.01))
    pol = make_policy("watermark", pred, num_layers=L, num_experts=E, top_k=1, vram_bytes=2,
                      ram_bytes=8, stage_lookahead=0)
    pred.p[1, 5] = 0.9
    plan = touch(pol, 0, 0)  # (1,5) is dense (p=0.9) and VRAM has room -> prefetched
    assert promoted(plan) == [(0, 0), (1, 5)]
    # VRAM: (0,0) p=0.01 (below the low watermark) and (1,5). Touch 5 at layer 1 with
    # (2,6) likely: it may push out (0,0) only.
    pred.p[2, 6] = 0.9
    plan = touch(pol, 1, 5)
    assert promoted(plan) == [(2, 6)] and evicted(plan) == [(0, 0)]
    # VRAM: (1,5) p=0.9 and (2,6) (pinned now). (0,7) is as likely, but (1,5) is above the
    # low watermark -> no eviction, no prefetch.
    pred.p[0, 7] = 0.9
    plan = touch(pol, 2, 6)
    assert promoted(plan) == [] and evicted(plan) == []
    lam = pol.lam[Tier.VRAM]
    assert 0.01 * pol.factor[Tier.VRAM][0, 0] < lam * (1 - pol.config.hysteresis) < 0.9 * pol.factor[Tier.VRAM][0, 0]


def prefill(policy, rows, chunk=2):
    """One forward pass of `rows` token rows that needs every expert of every layer, fetched
    `chunk` at a time in id order (as a decode loop fetches a prefill's union). Returns the
    accesses that found their expert resident in VRAM."""
    hits = 0
    for layer in range(policy.L):
        for c in range(0, policy.E, chunk):
            ids = tuple(range(c, c + chunk))
            hits += sum(policy.where(layer, e, Tier.VRAM) == RESIDENT for e in ids)
            plan = policy.on_activation(Activation(layer=layer, experts=ids, rows=rows))
            for mv in plan.stagings + plan.promotions:
                policy.complete(mv.layer, mv.expert, mv.tier, True)
            policy.check()
    return hits


def test_nextuse_prefill_keeps_what_the_pass_needs_next():
    """A prefill scans every expert while VRAM holds a third of them. Told the pass's rows,
    nextuse evicts what this pass has used already (needed again only next pass) and keeps
    what its later layers and the current layer's later fetches will use: nearly every
    resident expert is a hit before it leaves. As a decode (rows=1), the current layer's
    experts that its later fetches need look a whole pass away, and go just before their turn."""
    L, E = 4, 12
    results = {}
    for rows in (1, 32):
        pol = nextuse(np.full((L, E), 2 / E), vram=16, lookahead=0, stage_lookahead=0)
        for layer in range(L):  # warm VRAM with a few experts of every layer
            touch(pol, layer, 8, 9)
            touch(pol, layer, 10, 11)
        results[rows] = prefill(pol, rows)
    assert results[32] >= 14, results  # of the 16 resident at the start
    assert results[1] <= 8, results  # the warm experts of layers ahead only


def test_nextuse_a_prefill_visit_starts_fresh_after_decoding_the_same_layer():
    """With one layer every visit is layer 0: what decode tokens fetched before a prefill does
    not count as fetched by the prefill's visit, so the rest of its union stays near."""
    pol = nextuse(np.full((1, 6), 0.2), vram=3, lookahead=0, stage_lookahead=0)
    touch(pol, 0, 0)  # decode tokens
    touch(pol, 0, 1)

    def group(e):
        plan = pol.on_activation(Activation(layer=0, experts=(e,), rows=16))
        for mv in plan.stagings + plan.promotions:
            pol.complete(mv.layer, mv.expert, mv.tier, True)
        return plan

    group(2)  # the prefill's first group: VRAM holds 0, 1, 2
    # (0, 0) and (0, 1) are not fetched yet in this pass: both likely soon, so the next
    # group (expert 3) evicts the one this pass has used already, (0, 2)
    assert evicted(group(3)) == [(0, 2)]
