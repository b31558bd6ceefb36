"""LRU per layer with next-layer router lookahead: the baseline of the best-known Mixtral
offloading demo (an LRU cache of experts per layer, plus speculative loads of the experts
the *next* layer's gate picks when applied to the current hidden state).

Keep value: when the expert was last used, counted in visits *of its own layer* (a per-layer
clock), so every layer ages at the same pace and the cache behaves like equal per-layer LRU
partitions without fixed partition sizes (a fixed split cannot hold top-k per layer at small
budgets). Experts just prefetched for the next layer count as used now, so they are not the
next victims.

Speculation: on each activation whose `hint` scores a later layer, prefetch that layer's
top-k experts by score into VRAM, displacing only experts older than the current token
(never another prefetch of this token). The hint is read from the event itself, so the
policy works with any predictor (it takes none: `uses_predictor` is False).
"""
from __future__ import annotations

import numpy as np

from ..events import Activation, Plan, Tier
from .base import ABSENT, CachePolicy


class LRULookaheadPolicy(CachePolicy):
    name = "lru-lookahead"

    def __init__(self, config, predictor=None):
        super().__init__(config, predictor)
        self.visits = np.zeros(self.L, dtype=np.int64)  # visits of each layer so far
        self.last = np.full((self.L, self.E), -1.0)  # layer-clock of the last use (or prefetch)
        self._hint: dict[int, tuple[float, ...]] = {}

    def on_activation(self, event: Activation) -> Plan:
        # The hint is only good for its layer's next visit; keep the latest one per layer.
        self._hint.pop(event.layer, None)
        for layer, scores in (event.hint or {}).items():
            if 0 <= int(layer) < self.L and len(scores) == self.E:
                self._hint[int(layer)] = tuple(scores)
        return super().on_activation(event)

    def _touch(self, layer, experts, now):
        self.visits[layer] += 1
        self.last[layer, experts] = self.visits[layer]

    def _keep_value(self, tier, layer):
        return self.last

    def _speculate(self, layer, now, call):
        nl = layer + 1  # router lookahead sees the next layer of the same token only
        scores = self._hint.get(nl)
        if scores is None:
            return
        top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[: self.K]
        stamp = float(self.visits[nl] + 1)  # "used" at its coming visit
        # Displace only experts not used (nor prefetched) during the current token.
        below = float(self.visits[nl]) + 0.5
        for e in top.tolist():
            if self.state[Tier.VRAM][nl, e] != ABSENT or self._prefetch(nl, e, 1e-3, call, below=below):
                self.last[nl, e] = stamp
