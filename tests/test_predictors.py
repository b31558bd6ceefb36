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
