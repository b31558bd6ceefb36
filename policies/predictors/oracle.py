"""Oracle predictor: reads the future of a trace. For upper bounds only, never for serving.

Built with the trace (and whether prefill passes are replayed, as in `decode_steps`), it
counts the layer visits observed so far; `predict(l)` is 1 for the experts used at layer
l's next visit in the replay and 0 elsewhere (all 0 once the trace has no further visit).
It checks that observations come in the replay's layer order, so a mismatched replay
fails loudly instead of giving a wrong bound.
"""
from __future__ import annotations

import numpy as np

from ..events import Activation
from ..traces import Trace, decode_steps
from .base import Predictor


class OraclePredictor(Predictor):
    name = "oracle"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, trace: Trace,
                 include_prefill: bool = False):
        super().__init__(num_layers, num_experts, top_k)
        if (trace.num_layers, trace.num_experts) != (num_layers, num_experts):
            raise ValueError(f"oracle: trace has {trace.num_layers} layers x {trace.num_experts} experts, "
                             f"predictor {num_layers} x {num_experts}")
        steps = [s.experts for s in decode_steps(trace, include_prefill=include_prefill)]
        width = max((s.shape[1] for s in steps), default=1)
        self._future = np.full((len(steps), num_layers, width), -1, dtype=np.int16)  # [S, L, W]
        for i, s in enumerate(steps):
            self._future[i, :, : s.shape[1]] = s
        self._seen = 0  # layer visits observed

    def observe(self, event: Activation) -> None:
        expected = self._seen % self.num_layers
        if event.layer != expected:
            raise ValueError(f"oracle: observed layer {event.layer}, the trace's replay runs layer {expected} now")
        self._seen += 1

    def predict(self, layer: int) -> np.ndarray:
        L = self.num_layers
        step = max(0, -(-(self._seen - layer) // L))  # first step s with s*L + layer >= seen
        out = np.zeros(self.num_experts, dtype=np.float64)
        if step < self._future.shape[0]:
            ids = self._future[step, layer]
            out[ids[ids >= 0]] = 1.0
        return out
