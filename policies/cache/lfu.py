"""LFU: evict the expert used least often so far (ties: the least recently used)."""
from __future__ import annotations

import numpy as np

from .base import CachePolicy


class LFUPolicy(CachePolicy):
    """Demand loads only; the keep value is the use count plus a recency tie-break."""

    name = "lfu"

    def __init__(self, config, predictor=None):
        super().__init__(config, predictor)
        self.count = np.zeros((self.L, self.E))
        self.last = np.full((self.L, self.E), -1.0)

    def _touch(self, layer, experts, now):
        self.count[layer, experts] += 1.0
        self.last[layer, experts] = self.step

    def _keep_value(self, tier, layer):
        # The tie-break stays below 1 so it never outweighs one use.
        return self.count + self.last / (self.step + 2.0)
