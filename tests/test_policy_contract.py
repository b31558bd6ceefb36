"""The contract every registered cache policy must keep (cachetools' CacheTestMixin style).

Each test runs for every name in the registry; policies that take a predictor get EWMA.
The driver below plays the executor: it reports transfers done (or failed) in random order
and checks the policy's book after every call.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from policies.cache.base import ABSENT, LOADING, RESIDENT
from policies.cache.registry import make_policy, policy_class, policy_names
from policies.events import Activation, Tier
from policies.predictors.ewma import EwmaPredictor

NAMES = policy_names()


def build(name, L=3, E=8, K=2, vram=6, ram=12, sizes=1, **extra):
    """Budgets in units of `sizes` when it is an int; bytes otherwise."""
    pred = EwmaPredictor(L, E, K) if policy_class(name).uses_predictor else None
    unit = sizes if isinstance(sizes, int) else 1
    return make_policy(name, pred, num_layers=L, num_experts=E, top_k=K, vram_bytes=vram * unit,
                       ram_bytes=ram * unit, expert_bytes=sizes, **extra)


def drive(policy, visits, rng, *, fail_rate=0.0, lag=3):
    """Feed `visits` [(layer, experts)], completing pending transfers with a random lag.

    Checks after every call: byte budgets, containment, demanded experts present in VRAM,
    no eviction of the current access. Returns the plans (for determinism checks).
    """
    pending: list[tuple[int, int, Tier]] = []
    plans = []
    for layer, experts in visits:
        plan = policy.on_activation(Activation(layer=layer, experts=tuple(experts)))
        plans.append(plan)
        policy.check()
        for e in experts:
            assert policy.where(layer, e, Tier.VRAM) in (LOADING, RESIDENT), (layer, e)
            assert policy.where(layer, e, Tier.RAM) in (LOADING, RESIDENT) or not policy.config.containment
        for mv in plan.evictions:
            assert not (mv.layer == layer and mv.expert in experts), f"evicted current expert {mv}"
        for mv in plan.stagings + plan.promotions:
            pending.append((mv.layer, mv.expert, mv.tier))
        # Report some transfers; RAM before VRAM for the same expert, as a real executor does.
        rng.shuffle(pending)
        pending.sort(key=lambda x: x[2] == Tier.VRAM)
        keep = pending[lag:] if len(pending) > lag else []
        for l, e, tier in pending[:lag]:
            policy.complete(l, e, tier, rng.random() >= fail_rate)
            policy.check()
        pending = keep
    return plans


def random_visits(rng, L, E, K, tokens, skew=1.2):
    weights = 1.0 / np.arange(1, E + 1) ** skew
    weights /= weights.sum()
    out = []
    for _ in range(tokens):
        for layer in range(L):
            out.append((layer, sorted(rng.choice(E, size=K, replace=False, p=weights).tolist())))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_random_trace_keeps_every_invariant(name):
    rng = np.random.default_rng(1)
    policy = build(name, L=4, E=16, K=2, vram=8, ram=16)
    drive(policy, random_visits(rng, 4, 16, 2, 60), random.Random(1), fail_rate=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_experts_of_different_sizes(name):
    rng = np.random.default_rng(2)
    L, E, K = 3, 10, 2
    sizes = rng.integers(100, 1000, size=(L, E)).tolist()
    # Just enough for the worst layer's two largest experts in each layer's share.
    worst = max(sum(sorted(row)[-K:]) for row in sizes)
    policy = build(name, L=L, E=E, K=K, vram=worst * L, ram=worst * 2 * L, sizes=sizes)
    drive(policy, random_visits(rng, L, E, K, 50), random.Random(2), fail_rate=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_adversarial_cyclic_scan_and_tight_budget(name):
    # Budget = exactly one layer's working set per layer share; a scan over all experts.
    L, E, K = 2, 6, 2
    policy = build(name, L=L, E=E, K=K, vram=K * L, ram=K * L)
    visits = [(layer, [(2 * t) % E, (2 * t + 1) % E]) for t in range(20) for layer in range(L)]
    drive(policy, visits, random.Random(3), lag=0)  # nothing ever completes: all stays loading
    drive(policy, visits, random.Random(3), lag=100)


@pytest.mark.parametrize("name", NAMES)
def test_failed_transfers_roll_back(name):
    policy = build(name)
    plan = policy.on_activation(Activation(layer=0, experts=(1, 2)))
    assert {(m.layer, m.expert) for m in plan.promotions} >= {(0, 1), (0, 2)}
    used_v, used_r = policy.used_bytes(Tier.VRAM), policy.used_bytes(Tier.RAM)
    assert policy.complete(0, 1, Tier.VRAM, False)
    assert policy.where(0, 1, Tier.VRAM) == ABSENT
    assert policy.used_bytes(Tier.VRAM) == used_v - 1
    # A failed staging also drops the pending promotion that had nothing to copy from.
    assert policy.complete(0, 2, Tier.RAM, False)
    assert policy.where(0, 2, Tier.RAM) == ABSENT and policy.where(0, 2, Tier.VRAM) == ABSENT
    assert policy.used_bytes(Tier.RAM) == used_r - 1
    policy.check()
    # A report for something not pending is ignored.
    assert not policy.complete(0, 2, Tier.VRAM, True)
    # The next access asks for them again.
    plan = policy.on_activation(Activation(layer=0, experts=(1, 2)))
    assert {(m.layer, m.expert) for m in plan.promotions} >= {(0, 1), (0, 2)}


@pytest.mark.parametrize("name", NAMES)
def test_successful_transfer_becomes_resident_and_hits(name):
    policy = build(name)
    policy.on_activation(Activation(layer=1, experts=(3, 4)))
    for e in (3, 4):
        assert policy.complete(1, e, Tier.RAM, True)
        assert policy.complete(1, e, Tier.VRAM, True)
        assert policy.where(1, e, Tier.VRAM) == RESIDENT
    plan = policy.on_activation(Activation(layer=1, experts=(3, 4)))
    assert not [m for m in plan.promotions if m.layer == 1 and m.expert in (3, 4)]


@pytest.mark.parametrize("name", NAMES)
def test_impossible_budgets_raise_with_the_numbers(name):
    def raw(**kw):
        pred = EwmaPredictor(2, 8, kw["top_k"]) if policy_class(name).uses_predictor else None
        return make_policy(name, pred, num_layers=2, num_experts=8, **kw)

    with pytest.raises(ValueError, match=r"vram_bytes=100 .*300"):  # three experts of 100 bytes
        raw(top_k=3, vram_bytes=100, ram_bytes=10_000, expert_bytes=100)
    with pytest.raises(ValueError, match=r"ram_bytes=150 .*200"):
        raw(top_k=2, vram_bytes=200, ram_bytes=150, expert_bytes=100)
    with pytest.raises(ValueError, match=r"ram_bytes=300 < vram_bytes=400"):
        raw(top_k=2, vram_bytes=400, ram_bytes=300, expert_bytes=100)
    with pytest.raises(ValueError, match="shape"):
        raw(top_k=1, vram_bytes=10, ram_bytes=10, expert_bytes=[[1, 1, 1]])


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    visits = random_visits(np.random.default_rng(5), 3, 8, 2, 30)
    a = drive(build(name), visits, random.Random(7), fail_rate=0.1)
    b = drive(build(name), visits, random.Random(7), fail_rate=0.1)
    assert a == b


@pytest.mark.parametrize("name", NAMES)
def test_bad_access_arguments(name):
    policy = build(name)
    with pytest.raises(ValueError, match="layer 9"):
        policy.access(9, [1])
    with pytest.raises(ValueError, match="expert 8"):
        policy.access(0, [8])
    # More experts at once than VRAM holds (6 bytes here) is a caller's error, not a crash.
    with pytest.raises(ValueError, match=r"layer 0 needs 7 experts \(7 bytes\).*VRAM holds 6"):
        policy.access(0, range(7))
    policy.check()


def test_unknown_policy_lists_valid_names():
    with pytest.raises(KeyError) as err:
        make_policy("nope", num_layers=1, num_experts=2, top_k=1, vram_bytes=1, ram_bytes=1)
    for name in NAMES:
        assert name in str(err.value)


def test_bad_config_is_a_value_error():
    with pytest.raises(ValueError, match="num_layers"):
        make_policy("lru", num_layers="x", num_experts=2, top_k=1, vram_bytes=1, ram_bytes=1)
    with pytest.raises(ValueError, match="bogus"):
        make_policy("lru", num_layers=1, num_experts=2, top_k=1, vram_bytes=1, ram_bytes=1, bogus=3)
    with pytest.raises(ValueError, match="predictor"):
        make_policy("nextuse", num_layers=1, num_experts=2, top_k=1, vram_bytes=1, ram_bytes=1)


@pytest.mark.parametrize("name", NAMES)
def test_without_containment_ram_may_drop_vram_experts(name):
    # RAM smaller than VRAM is only legal without containment; the budgets still hold.
    rng = np.random.default_rng(4)
    policy = build(name, L=3, E=8, K=2, vram=9, ram=6, containment=False)
    drive(policy, random_visits(rng, 3, 8, 2, 30), random.Random(4))


@pytest.mark.parametrize("name", NAMES)
def test_without_containment_vram_fills_its_own_budget(name):
    """Only containment ties a VRAM copy to its RAM copy: with a RAM smaller than VRAM (the
    stored form holds 3.8x the experts in the same VRAM bytes), dropping a RAM copy leaves
    VRAM alone, so VRAM fills its own budget instead of shrinking to RAM's."""
    rng = np.random.default_rng(5)
    policy = build(name, L=3, E=8, K=2, vram=9, ram=6, containment=False)
    drive(policy, random_visits(rng, 3, 8, 2, 60), random.Random(5), lag=100)  # every transfer lands at once
    assert policy.used_bytes(Tier.VRAM) == 9 and policy.used_bytes(Tier.RAM) <= 6


def test_without_containment_ram_drops_copies_of_vram_experts_first():
    """Exclusive caching where RAM cannot contain VRAM: RAM gives up the copy of an expert
    VRAM holds before one VRAM does not hold, whatever their keep values, so a VRAM miss
    can find its expert in RAM (ranked alike, RAM would just mirror VRAM's best)."""
    policy = build("lfu", L=1, E=8, K=1, vram=3, ram=2, containment=False)
    for e in (0, 0, 0, 1, 1, 2, 3):  # 0 and 1 used most; VRAM evicts 2 for 3, RAM kept 2's copy
        drive(policy, [(0, [e])], random.Random(0), lag=100)
    vram = {e for e in range(8) if policy.where(0, e, Tier.VRAM) == RESIDENT}
    ram = {e for e in range(8) if policy.where(0, e, Tier.RAM) == RESIDENT}
    assert vram == {0, 1, 3} and ram - vram, (vram, ram)


def test_watermark_never_exceeds_capacity_on_real_traces(real_traces):
    from policies.traces import load_trace

    for path in sorted(real_traces.glob("*.npz")):
        trace = load_trace(path)
        L, E, K = trace.num_layers, trace.num_experts, trace.top_k
        policy = make_policy("watermark", EwmaPredictor(L, E, K), num_layers=L, num_experts=E, top_k=K,
                             vram_bytes=int(0.1 * L * E), ram_bytes=int(0.5 * L * E))
        rows = trace.experts[trace.phase == 1][:30]
        for row in rows:
            for layer in range(L):
                ids = tuple(int(e) for e in row[layer] if e >= 0)
                plan = policy.on_activation(Activation(layer=layer, experts=ids))
                for mv in plan.stagings + plan.promotions:
                    policy.complete(mv.layer, mv.expert, mv.tier, True)
                assert policy.used_bytes(Tier.VRAM) <= policy.capacity[Tier.VRAM]
                assert policy.used_bytes(Tier.RAM) <= policy.capacity[Tier.RAM]
        policy.check()


@pytest.mark.parametrize("name", NAMES)
def test_forget_follows_the_executors_own_evictions(name):
    # The pipeline evicted (0, 3) to serve a demand before the policy planned anything.
    policy = build(name)
    policy.on_activation(Activation(layer=0, experts=(3, 4)))
    for e in (3, 4):
        policy.complete(0, e, Tier.RAM, True)
        policy.complete(0, e, Tier.VRAM, True)
    used_v, used_r = policy.used_bytes(Tier.VRAM), policy.used_bytes(Tier.RAM)
    assert policy.forget(0, 3, Tier.VRAM)
    assert policy.where(0, 3, Tier.VRAM) == ABSENT and policy.where(0, 3, Tier.RAM) == RESIDENT
    assert policy.used_bytes(Tier.VRAM) == used_v - 1
    assert not policy.forget(0, 3, Tier.VRAM)  # already absent: nothing changes
    # Leaving RAM also leaves VRAM under containment (the VRAM copy had its RAM backing).
    assert policy.forget(0, 4, Tier.RAM)
    assert policy.where(0, 4, Tier.RAM) == ABSENT and policy.where(0, 4, Tier.VRAM) == ABSENT
    assert policy.used_bytes(Tier.RAM) == used_r - 1 and policy.used_bytes(Tier.VRAM) == used_v - 2
    policy.check()
    # The next access asks for both again.
    plan = policy.on_activation(Activation(layer=0, experts=(3, 4)))
    assert {(m.layer, m.expert) for m in plan.promotions} >= {(0, 3), (0, 4)}


def test_options_may_not_override_shape_or_budgets_but_may_change_containment():
    from policies.cache.registry import fixed_options

    base = dict(num_layers=2, num_experts=4, top_k=1, vram_bytes=2, ram_bytes=4, expert_bytes=1, containment=True,
                vram_headroom=1)
    assert fixed_options(base, {"top_k": 2, "vram_bytes": 9, "containment": False, "lookahead": 2}) == \
        ["top_k", "vram_bytes"]
    assert fixed_options(base, {"containment": False, "vram_headroom": 0, "lookahead": 2}) == []


@pytest.mark.parametrize("name", NAMES)
def test_vram_headroom_is_kept_free_by_the_policys_own_evictions(name):
    """With vram_headroom the book ends every access with that many bytes of VRAM free (the
    pipeline's demand misses take them before the actor hears of the visit), emptied by
    the policy's own evictions, and every other invariant holds."""
    L, E, K = 4, 16, 2
    rng = np.random.default_rng(5)
    policy = build(name, L=L, E=E, K=K, vram=8, ram=16, vram_headroom=2)
    visits = random_visits(rng, L, E, K, 40)
    evicted = 0
    for i, (layer, experts) in enumerate(visits):
        plan = policy.on_activation(Activation(layer=layer, experts=tuple(experts)))
        policy.check()
        evicted += sum(mv.tier == Tier.VRAM for mv in plan.evictions)
        assert policy.capacity[Tier.VRAM] - policy.used_bytes(Tier.VRAM) >= 2, (name, i)
        for mv in plan.promotions + plan.stagings:
            policy.complete(mv.layer, mv.expert, mv.tier, True)
    assert evicted > 0  # the budget (8 of 64 experts) forced the policy to choose victims
    # Without headroom the same visits fill VRAM to the brim at some point.
    full = build(name, L=L, E=E, K=K, vram=8, ram=16)
    peak = 0
    for layer, experts in visits:
        plan = full.on_activation(Activation(layer=layer, experts=tuple(experts)))
        for mv in plan.promotions + plan.stagings:
            full.complete(mv.layer, mv.expert, mv.tier, True)
        peak = max(peak, full.used_bytes(Tier.VRAM))
    assert peak == full.capacity[Tier.VRAM]


@pytest.mark.parametrize("headroom", [-1, 7])
def test_vram_headroom_beyond_the_budget_is_refused(headroom):
    with pytest.raises(ValueError, match="vram_headroom=.*lower it or raise VRAM"):
        build("lru", L=3, E=8, K=2, vram=8, ram=12, vram_headroom=headroom)  # 8 - one layer's 2 = 6 at most
