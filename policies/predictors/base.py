"""The predictor contract, shared by EWMA, ScoutGate, router lookahead, oracle and fusion."""
from __future__ import annotations

import abc

import numpy as np

from ..events import Activation


class Predictor(abc.ABC):
    """Online predictor over `num_layers` x `num_experts` experts.

    The simulator and the policy actor call `observe` once per layer visit, in execution
    order (layer 0..L-1 for each token), then `predict(layer)` for any layer.
    """

    name: str = "base"
    # How many layers after the visited one a visit can change the prediction of (policies
    # refresh those rows after each visit, and every row once per token).
    horizon: int = 1

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        if num_layers < 1 or num_experts < 1 or not (1 <= top_k <= num_experts):
            raise ValueError(f"{type(self).__name__}: need layers >= 1, experts >= 1, "
                             f"1 <= top_k <= experts; got {num_layers}, {num_experts}, {top_k}")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k

    @abc.abstractmethod
    def observe(self, event: Activation) -> None:
        """Learn from one layer visit."""

    @abc.abstractmethod
    def predict(self, layer: int) -> np.ndarray:
        """float64 [num_experts]: P(expert used at `layer`'s next visit), each in [0, 1]."""

    def predict_all(self) -> np.ndarray:
        """float64 [num_layers, num_experts]."""
        return np.stack([self.predict(layer) for layer in range(self.num_layers)])
