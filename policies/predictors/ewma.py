"""EWMA predictor: per-layer exponentially weighted frequency of use, on a layer-local clock.

Layer l's estimate moves only when layer l runs: p_l <- (1 - alpha) p_l + alpha * used_l,
where used_l is the multi-hot vector of the experts the router chose. Other layers keep
their estimates, so a layer that runs rarely is not decayed by the traffic of the others.
The estimate starts at the uninformed prior top_k / num_experts.
"""
from __future__ import annotations

import numpy as np

from ..events import Activation
from .base import Predictor


class EwmaPredictor(Predictor):
    name = "ewma"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, alpha: float = 0.2):
        super().__init__(num_layers, num_experts, top_k)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"ewma: alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self._p = np.full((num_layers, num_experts), top_k / num_experts, dtype=np.float64)

    def observe(self, event: Activation) -> None:
        if not 0 <= event.layer < self.num_layers:
            raise ValueError(f"ewma: layer {event.layer} out of range [0, {self.num_layers})")
        row = self._p[event.layer]
        row *= 1.0 - self.alpha
        ids = [e for e in event.experts if 0 <= e < self.num_experts]  # -1 = no entry
        row[ids] += self.alpha

    def predict(self, layer: int) -> np.ndarray:
        # A convex combination of values in [0, 1] stays there; the minimum only guards
        # rounding, and is one cheap ufunc (this runs once per layer visit).
        return np.minimum(self._p[layer], 1.0)

    def predict_all(self) -> np.ndarray:
        return np.minimum(self._p, 1.0)
