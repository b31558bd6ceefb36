"""Predictors: EWMA's layer-local clock, oracle exactness, fusion's weight order, router
lookahead with synthetic routers, and the registry."""
from __future__ import annotations

import numpy as np
import pytest

from policies.events import Activation
from policies.predictors.ewma import EwmaPredictor
from policies.predictors.registry import make_predictor, predictor_names


def test_ewma_layer_local_clock():
    p = EwmaPredictor(num_layers=2, num_experts=4, top_k=1, alpha=0.5)
    prior = 1 / 4
    assert np.allclose(p.predict_all(), prior)
    # layer 0 runs with expert 2: layer 0 moves toward onehot(2)
    p.observe(Activation(layer=0, experts=(2,)))
    assert np.allclose(p.predict(0), [prior / 2, prior / 2, prior / 2 + 0.5, prior / 2])
    before = p.predict(0).copy()
    # layer 1 runs (three times, expert 3): layer 0's estimate unchanged
    for _ in range(3):
        p.observe(Activation(layer=1, experts=(3,)))
    assert np.array_equal(p.predict(0), before)
    assert np.allclose(p.predict(1), [prior / 8] * 3 + [prior / 8 + 0.5 + 0.25 + 0.125])
    # layer 0 runs again with expert 0: only now does its expert 2 decay
    p.observe(Activation(layer=0, experts=(0,)))
    assert p.predict(0)[2] == pytest.approx((prior / 2 + 0.5) / 2)
    assert p.predict(0)[0] == pytest.approx(prior / 4 + 0.5)
    out = p.predict_all()
    assert out.dtype == np.float64 and out.shape == (2, 4) and (out >= 0).all() and (out <= 1).all()


def test_ewma_multi_hot_and_bad_alpha():
    p = EwmaPredictor(1, 6, 2, alpha=1.0)
    p.observe(Activation(layer=0, experts=(5, 1)))
    assert p.predict(0).tolist() == [0, 1, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="alpha"):
        EwmaPredictor(1, 6, 2, alpha=0.0)


def test_registry_unknown_name_lists_valid():
    with pytest.raises(KeyError) as e:
        make_predictor("ewmaa", 2, 4, 1)
    msg = str(e.value)
    assert "unknown predictor 'ewmaa'" in msg
    for name in ("ewma", "fusion", "lookahead", "oracle", "scoutgate"):
        assert name in msg
    assert set(predictor_names()) >= {"ewma", "fusion", "lookahead", "oracle", "scoutgate"}


def test_registry_makes_with_options_and_rejects_unknown_option():
    p = make_predictor("ewma", 3, 8, 2, alpha=0.7)
    assert isinstance(p, EwmaPredictor) and p.alpha == 0.7
    with pytest.raises(ValueError, match="unknown option.*beta.*valid: alpha"):
        make_predictor("ewma", 3, 8, 2, beta=1)


# --- oracle ------------------------------------------------------------------------------

def _tiny_trace():
    from policies.traces import TraceMeta, make_trace

    # 3 decode rows, L=2, E=5, K=2
    ex = np.array([[[0, 1], [2, 3]], [[4, 0], [1, -1]], [[3, 2], [0, 4]]])
    meta = TraceMeta(format="moe-routing-trace/1", model="t", num_layers=2, num_experts=5, top_k=2, tokens=3)
    return make_trace(ex, np.full(ex.shape, np.nan), [-1] * 3, [1] * 3, [0] * 3, meta)


def test_oracle_is_exact_at_every_visit():
    t = _tiny_trace()
    p = make_predictor("oracle", 2, 5, 2, trace=t)
    for row in range(3):
        for layer in range(2):
            truth = set(t.experts[row, layer].tolist()) - {-1}
            got = p.predict(layer)
            assert set(np.flatnonzero(got).tolist()) == truth and set(got.tolist()) <= {0.0, 1.0}
            other = 1 - layer  # the other layer's next visit: this row if it comes later, else the next row
            nxt = row if other > layer else row + 1
            want = set(t.experts[nxt, other].tolist()) - {-1} if nxt < 3 else set()
            assert set(np.flatnonzero(p.predict(other)).tolist()) == want
            p.observe(Activation(layer=layer, experts=tuple(truth)))
    assert not p.predict_all().any()  # no future left


def test_oracle_refuses_out_of_order_replay():
    p = make_predictor("oracle", 2, 5, 2, trace=_tiny_trace())
    with pytest.raises(ValueError, match="observed layer 1.*runs layer 0"):
        p.observe(Activation(layer=1, experts=(2,)))


# --- fusion ------------------------------------------------------------------------------

def test_fusion_weight_orders_layers_by_next_visit():
    f = make_predictor("fusion", 8, 4, 1, members={"ewma": 1.0}, gamma=0.3)
    # before anything runs, layer 0 is next, then 1, ... 7
    w = [f.layer_weight(layer) for layer in range(8)]
    assert w == sorted(w, reverse=True) and len(set(w)) == 8
    for layer in range(6):
        f.observe(Activation(layer=layer, experts=(0,)))
    # layer 5 is running: 6, 7 come next in this token, then 0..5 of the next token, 5 last
    order = sorted(range(8), key=lambda layer: -f.layer_weight(layer))
    assert order == [6, 7, 0, 1, 2, 3, 4, 5]
    assert [f.distance(layer) for layer in order] == list(range(1, 9))
    assert f.layer_weight(6) == pytest.approx(np.exp(-0.3))


def test_fusion_blends_members_with_weights():
    t = _tiny_trace()
    f = make_predictor("fusion", 2, 5, 2, members={"oracle": 3.0, "ewma": 1.0},
                       member_options={"oracle": {"trace": t}}, gamma=0.0)
    prior = 2 / 5
    want = (3.0 * np.isin(np.arange(5), [0, 1]) + 1.0 * prior) / 4
    assert np.allclose(f.predict(0), want)
    with pytest.raises(ValueError, match="weights"):
        make_predictor("fusion", 2, 5, 2, members={"ewma": -1.0})


# --- router lookahead --------------------------------------------------------------------

def _routers(seed, L=6, E=32, H=64):
    rng = np.random.default_rng(seed)
    return rng, [rng.standard_normal((E, H)) for _ in range(L)]


def _lookahead_recall(hint_fn, steps=60, E=32, K=2, L=6, H=64):
    """Residual-stream toy: hidden drifts slowly across layers; layer l+1's router picks top-K."""
    from policies.predictors.lookahead import router_scores

    rng, W = _routers(1, L, E, H)
    p = make_predictor("lookahead", L, E, K, fallback="uniform", temperature=1.0)
    hits = total = 0
    for _ in range(steps):
        h = rng.standard_normal(H)
        for layer in range(L):
            truth = np.argsort(-router_scores(h, W[layer]))[:K]
            if layer > 0:  # score the layer before it runs
                pred = np.argsort(-p.predict(layer))[:K]
                hits += np.isin(pred, truth).sum()
                total += K
            hint = None
            if layer + 1 < L:
                hint = {layer + 1: tuple(hint_fn(rng, h, W[layer + 1]).tolist())}
            p.observe(Activation(layer=layer, experts=tuple(truth.tolist()), hint=hint))
            h = h + 0.3 * rng.standard_normal(H)  # the residual stream changes a little per layer
    return hits / total


def test_lookahead_recall_high_with_router_hints_and_low_with_random_ones():
    from policies.predictors.lookahead import router_scores

    good = _lookahead_recall(lambda rng, h, w: router_scores(h, w))
    rand = _lookahead_recall(lambda rng, h, w: rng.standard_normal(w.shape[0]))
    assert good > 0.6, good
    assert rand < 0.2, rand  # chance is K/E = 1/16


def test_lookahead_hint_is_spent_and_falls_back():
    p = make_predictor("lookahead", 3, 4, 1, fallback="uniform")
    p.observe(Activation(layer=0, experts=(1,), hint={2: (0.0, 0.0, 9.0, 0.0)}))
    assert p.has_hint(2) and np.argmax(p.predict(2)) == 2
    assert np.allclose(p.predict(1), 0.25)  # no hint: the uniform prior K/E
    p.observe(Activation(layer=1, experts=(0,)))
    p.observe(Activation(layer=2, experts=(2,)))
    assert not p.has_hint(2) and np.allclose(p.predict(2), 0.25)
    with pytest.raises(ValueError, match="hint for layer 5"):
        p.observe(Activation(layer=0, experts=(1,), hint={5: (0.0,) * 4}))


def test_router_scores_shape_check():
    from policies.predictors.lookahead import router_scores

    assert router_scores(np.ones(3), np.eye(3)[:2]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="does not match"):
        router_scores(np.ones(4), np.eye(3))


@pytest.mark.parametrize("name", ["ewma", "lookahead", "fusion", "colayer"])
def test_contract_probabilities_in_unit_interval(name):
    p = make_predictor(name, 3, 6, 2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        for layer in range(3):
            p.observe(Activation(layer=layer, experts=tuple(rng.choice(6, 2, replace=False).tolist())))
            out = p.predict_all()
            assert out.shape == (3, 6) and out.dtype == np.float64 and (out >= 0).all() and (out <= 1).all()


@pytest.mark.parametrize("name", ["lookahead", "fusion", "colayer"])
def test_predict_all_is_bit_identical_to_predict_per_layer(name):
    # predict_all is the fast path a policy uses once per token; it must give exactly the rows
    # that predict(layer) gives, hints included.
    L, E, K = 5, 7, 2
    p = make_predictor(name, L, E, K)
    rng = np.random.default_rng(3)
    for step in range(30):
        layer = step % L
        hint = {(layer + 1) % L: tuple(rng.normal(size=E).tolist())} if step % 3 else None
        p.observe(Activation(layer=layer, experts=tuple(rng.choice(E, K, replace=False).tolist()), hint=hint))
        rows = np.stack([p.predict(l) for l in range(L)])
        assert np.array_equal(p.predict_all(), rows), step
