"""Co-layer predictor: learns which experts follow which across the layers of one token."""
from __future__ import annotations

import numpy as np
import pytest

from policies.cache.registry import make_policy
from policies.events import Activation
from policies.predictors.colayer import CoLayerPredictor
from policies.predictors.registry import make_predictor


def run_pass(p, route):
    for layer, ids in enumerate(route):
        p.observe(Activation(layer=layer, experts=tuple(ids)))


def planted_routes(rng, n, L=4, E=8):
    """Each token picks a 'kind' c; its expert at every layer is (c + layer) % E, so a layer's
    expert names the next layer's exactly; the kinds are uniform, so history says nothing."""
    for _ in range(n):
        c = int(rng.integers(E))
        yield [((c + layer) % E,) for layer in range(L)]


def test_learns_the_next_layer_from_this_token_and_keeps_ewma_elsewhere():
    rng = np.random.default_rng(0)
    p = CoLayerPredictor(4, 8, 1, weight=1.0, evidence=0.0)
    ewma = make_predictor("ewma", 4, 8, 1, alpha=0.05)
    for route in planted_routes(rng, 200):
        run_pass(p, route)
        run_pass(ewma, route)
    # A new token of kind 5, halfway: layer 1 ran expert 6, so layer 2 will run expert 7.
    p.observe(Activation(layer=0, experts=(5,)))
    p.observe(Activation(layer=1, experts=(6,)))
    row = p.predict(2)
    assert row.argmax() == 7 and row[7] == pytest.approx(1.0) and row.sum() == pytest.approx(1.0)
    # depth 1: layer 3 and the next token's layers fall back to the inner EWMA
    ewma.observe(Activation(layer=0, experts=(5,)))
    ewma.observe(Activation(layer=1, experts=(6,)))
    for layer in (0, 1, 3):
        assert np.array_equal(p.predict(layer), ewma.predict(layer)), layer


def test_depth_predicts_further_layers_from_every_known_one():
    rng = np.random.default_rng(1)
    p = CoLayerPredictor(4, 8, 1, weight=1.0, evidence=0.0, depth=3)
    for route in planted_routes(rng, 200):
        run_pass(p, route)
    p.observe(Activation(layer=0, experts=(2,)))
    assert [int(p.predict(j).argmax()) for j in (1, 2, 3)] == [3, 4, 5]
    assert p.horizon == 3


def test_evidence_keeps_a_fresh_predictor_at_its_ewma():
    p = CoLayerPredictor(3, 6, 2, weight=0.8, evidence=4.0)
    ewma = make_predictor("ewma", 3, 6, 2, alpha=0.05)
    run_pass(p, [(0, 1), (2, 3), (4, 5)])
    run_pass(ewma, [(0, 1), (2, 3), (4, 5)])
    p.observe(Activation(layer=0, experts=(0, 1)))
    ewma.observe(Activation(layer=0, experts=(0, 1)))
    # one pass of evidence: w = 0.8 * 1 / (1 + 4) = 0.16 of the conditional (experts 2, 3)
    cond = np.array([0, 0, 1, 1, 0, 0], float)
    assert np.allclose(p.predict(1), 0.16 * cond + 0.84 * ewma.predict(1))


def test_prefill_passes_teach_nothing():
    p = CoLayerPredictor(2, 8, 2, weight=1.0, evidence=0.0)
    ewma = make_predictor("ewma", 2, 8, 2, alpha=0.05)
    # a prefill pass: each layer visited in top_k chunks of the union of many tokens' experts
    for layer in range(2):
        for chunk in ((0, 1), (2, 3), (4, 5)):
            p.observe(Activation(layer=layer, experts=chunk))
            ewma.observe(Activation(layer=layer, experts=chunk))
    assert not p._pairs.any() and not p._follows.any()
    p.observe(Activation(layer=0, experts=(0, 1)))
    ewma.observe(Activation(layer=0, experts=(0, 1)))
    assert np.array_equal(p.predict(1), ewma.predict(1))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="weight"):
        CoLayerPredictor(3, 6, 2, weight=1.5)
    with pytest.raises(ValueError, match="depth"):
        CoLayerPredictor(3, 6, 2, depth=3)
    with pytest.raises(ValueError, match="layer 7"):
        CoLayerPredictor(3, 6, 2).observe(Activation(layer=7, experts=(1,)))


def test_a_policy_sees_the_rows_further_ahead_change():
    # PredictedPolicy refreshes predictor.horizon rows after each visit: with depth 2, the
    # row two layers ahead must be the predictor's after the visit, not last token's copy.
    rng = np.random.default_rng(2)
    pred = CoLayerPredictor(4, 8, 1, weight=1.0, evidence=0.0, depth=2)
    pol = make_policy("nextuse", pred, num_layers=4, num_experts=8, top_k=1, vram_bytes=4, ram_bytes=8,
                      expert_bytes=1)
    for route in planted_routes(rng, 50):
        for layer, ids in enumerate(route):
            pol.on_activation(Activation(layer=layer, experts=ids))
    pol.on_activation(Activation(layer=0, experts=(6,)))
    pol.on_activation(Activation(layer=1, experts=(7,)))
    assert int(pol.p[3].argmax()) == 1 and np.array_equal(pol.p[3], pred.predict(3))
