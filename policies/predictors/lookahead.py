"""Router lookahead: score a later layer's experts ahead of time from the current hidden state.

Because the residual stream changes slowly, applying layer l+d's router to the hidden
state at layer l ranks l+d's experts well before l+d runs. The decode loop computes those
scores (`router_scores(hidden, router_weight)` = hidden @ W.T) and sends them as
`Activation.hint = {layer: scores}`.

Calibration (scores -> probability of use at that layer's next visit): softmax top-k
mass, p_e = min(1, K * softmax(scores / temperature)_e). It sums to K before clipping,
matching the K experts the router will pick, and keeps the router's own ranking.

A hint is used for its layer's next visit only and is dropped once that layer runs. A
layer without a live hint falls back to the `fallback` prior: "uniform" (K / E) or
"ewma" (an inner EWMA predictor fed every observation).
"""
from __future__ import annotations

import numpy as np

from ..events import Activation
from .base import Predictor
from .ewma import EwmaPredictor


def router_scores(hidden: np.ndarray, router_weight: np.ndarray) -> np.ndarray:
    """Router logits: hidden [..., H] @ router_weight[E, H].T -> [..., E] (float64)."""
    hidden, w = np.asarray(hidden, dtype=np.float64), np.asarray(router_weight, dtype=np.float64)
    if w.ndim != 2 or hidden.shape[-1] != w.shape[1]:
        raise ValueError(f"router_scores: hidden {hidden.shape} does not match router weight {w.shape} [E, H]")
    return hidden @ w.T


def softmax_topk_mass(scores: np.ndarray, top_k: int, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(scores, dtype=np.float64) / temperature
    z = np.exp(z - z.max())
    return np.minimum(1.0, top_k * z / z.sum())


class LookaheadPredictor(Predictor):
    name = "lookahead"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, temperature: float = 1.0,
                 fallback: str = "ewma", alpha: float = 0.2):
        super().__init__(num_layers, num_experts, top_k)
        if temperature <= 0:
            raise ValueError(f"lookahead: temperature must be > 0, got {temperature}")
        if fallback not in ("uniform", "ewma"):
            raise ValueError(f"lookahead: fallback {fallback!r} unknown; valid: ewma, uniform")
        self.temperature = float(temperature)
        self._inner = EwmaPredictor(num_layers, num_experts, top_k, alpha=alpha) if fallback == "ewma" else None
        self._hint: dict[int, np.ndarray] = {}  # layer -> calibrated probabilities for its next visit

    def observe(self, event: Activation) -> None:
        if self._inner is not None:
            self._inner.observe(event)
        self._hint.pop(event.layer, None)  # that visit has happened: its hint is spent
        for layer, scores in (event.hint or {}).items():
            if not 0 <= layer < self.num_layers or len(scores) != self.num_experts:
                raise ValueError(f"lookahead: hint for layer {layer} with {len(scores)} scores; "
                                 f"need a layer in [0, {self.num_layers}) and {self.num_experts} scores")
            self._hint[layer] = softmax_topk_mass(np.asarray(scores), self.top_k, self.temperature)

    def has_hint(self, layer: int) -> bool:
        return layer in self._hint

    def predict(self, layer: int) -> np.ndarray:
        if layer in self._hint:
            return self._hint[layer].copy()
        if self._inner is not None:
            return self._inner.predict(layer)
        return np.full(self.num_experts, self.top_k / self.num_experts)

    def predict_all(self) -> np.ndarray:
        out = (self._inner.predict_all() if self._inner is not None else
               np.full((self.num_layers, self.num_experts), self.top_k / self.num_experts))
        for layer, p in self._hint.items():
            out[layer] = p
        return out
