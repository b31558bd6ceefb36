"""Next-use distance policy: evict the expert expected to be needed last (approximate Belady).

Layers run in a fixed order, so the time until expert (l, e) is needed again can be
estimated in layer steps:  d(l, e) = D(l | now) + L * (1/q - 1), where D = steps until layer
l runs next and q = probability that (l, e) is used at a visit of layer l. Belady evicts the
largest true next-use distance; this policy evicts the largest expected one.

q blends the predictor's short-memory estimate (recency, the current request's experts)
with the long-run frequency of (l, e) per visit of layer l; on the real traces (data/traces) neither
alone is as good as the blend (see the simulator report).

A prefill pass (events with `rows` = n > 1) needs, at each later layer of the same pass,
the union of n rows' experts, fetched in several events per layer: there (l, e) is used
with probability 1 - (1 - q)^n, close to 1 for a long prompt, and so is an expert of the
current layer that its earlier events of this pass did not fetch. Their distances count
with that probability. Without this they look as cold as in decoding, and a prefill that
scans more experts than VRAM holds evicts each one just before it is needed (LRU's worst
case: the replay measured no VRAM hit in a 57-row prefill with 523 slots).

Prefetch: after each visit it looks `lookahead` layers ahead and promotes the likeliest
missing experts (by q per byte) only when each is expected to be used before the victim it
would displace (d(candidate) < d(victim)) and q >= `prefetch_min_prob`; RAM staging does
the same `stage_lookahead` layers ahead, since disk reads take far longer.
"""
from __future__ import annotations

import numpy as np

from ..events import Activation, Plan, Tier
from .base import ABSENT, CacheConfig
from .predicted import PredictedPolicy


class NextUseConfig(CacheConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    frequency_weight: float = 0.2  # weight of the long-run frequency in q (rest: predictor)
    prefetch_min_prob: float = 0.5
    lookahead: int = 1  # layers ahead for VRAM promotions
    stage_lookahead: int = 4  # layers ahead for RAM stagings
    max_prefetch: int = 0  # candidates per looked-ahead layer; 0 = top_k


class NextUsePolicy(PredictedPolicy):
    name = "nextuse"
    config_type = NextUseConfig

    def __init__(self, config: NextUseConfig, predictor=None):
        super().__init__(config, predictor)
        c = config
        if not 0.0 <= c.frequency_weight <= 1.0 or not 0.0 <= c.prefetch_min_prob <= 1.0:
            raise ValueError(f"{self.name}: frequency_weight and prefetch_min_prob must be in [0, 1]; "
                             f"got {c.frequency_weight}, {c.prefetch_min_prob}")
        if c.lookahead < 0 or c.stage_lookahead < 0 or c.max_prefetch < 0:
            raise ValueError(f"{self.name}: lookahead, stage_lookahead, max_prefetch must be >= 0")
        self.count = np.zeros((self.L, self.E))
        self.visits = np.zeros(self.L)
        self._q = np.full((self.L, self.E), self.K / self.E)
        self._w, self._prior = float(c.frequency_weight), self.K / self.E
        self._qmax = [self.K / self.E] * self.L  # per-row max of q: most visits prefetch nothing
        # L * (1/q - 1): the part of the expected distance that does not depend on `now`;
        # kept per row, refreshed only for the rows a visit changes.
        self._far = np.full((self.L, self.E), self.L * (self.E / self.K - 1.0))
        self._layer = 0
        self._rows = 1  # token rows of the current forward pass (event.rows)
        self._fetched_now = np.zeros(self.E, dtype=bool)  # experts of `_layer` this (prefill) visit fetched so far
        self._visit = (-1, 0)  # (layer, rows) of the visit _fetched_now belongs to
        self._keep_cache: np.ndarray | None = None

    def on_activation(self, event: Activation) -> Plan:
        self._rows = max(1, int(event.rows))
        return super().on_activation(event)

    def _refresh(self, layer) -> None:
        """Recompute q and the far part for `layer` (an int, or a slice for all rows)."""
        # Hot path (twice per visit): few numpy calls, in place. q <= 1 always (a convex blend
        # of a probability and a frequency <= 1), so only the floor needs enforcing.
        w = self._w
        inv = w / (self.visits[layer] + 1.0)
        if not isinstance(layer, int):
            inv = inv[:, None]
        q = self._q[layer]
        np.multiply(self.p[layer], 1.0 - w, out=q)
        q += (self.count[layer] + self._prior) * inv
        np.maximum(q, 1e-9, out=q)
        far = self._far[layer]
        np.divide(self.L, q, out=far)
        far -= self.L
        if isinstance(layer, int):
            self._qmax[layer] = float(q.max())
        else:
            self._qmax[:] = q.max(axis=1).tolist()

    def _rows_changed(self, layers):
        if len(layers) == self.L:
            self._refresh(slice(None))
        else:
            for layer in layers:
                self._refresh(layer)

    def _touch(self, layer, experts, now):
        self.count[layer, experts] += 1.0
        self.visits[layer] += 1.0
        self._refresh(layer)
        # A new visit: another layer or pass size; a decode visit is always one event.
        if (layer, self._rows) != self._visit or self._rows == 1:
            self._fetched_now[:] = False
            self._visit = (layer, self._rows)
        self._fetched_now[experts] = True
        self._layer = layer
        self._keep_cache = None

    def q(self) -> np.ndarray:
        """[L, E] blended probability of use at the next visit of each layer (a view)."""
        return self._q

    def distance(self) -> np.ndarray:
        """[L, E] expected layer steps until each expert is needed, seen after this visit."""
        now = self._layer
        d = self._steps_ahead[now][:, None] + self._far
        if self._rows > 1:
            # This prefill pass: its later layers, and the current layer's experts not fetched
            # yet (its next event may be the same layer), are used by any of its rows.
            p = -np.expm1(self._rows * np.log1p(-np.minimum(self._q[now:], 1.0 - 1e-12)))
            d_pass = self.L * (1.0 / np.maximum(p, 1e-9) - 1.0)
            d_pass[1:] += self._steps_ahead[now][now + 1:, None]
            d[now + 1:] = d_pass[1:]
            d[now] = np.where(self._fetched_now, d[now], d_pass[0])
        return d

    def _keep_value(self, tier, layer):
        # Computed once per access call: evictions within one call see the same estimate.
        if self._keep_cache is None:
            self._keep_cache = -self.distance()
        return self._keep_cache

    def _speculate(self, layer, now, call):
        # Each visit looks at one layer for VRAM (layer + lookahead) and one for RAM (layer +
        # stage_lookahead): the nearer layers were looked at by the previous visits.
        c = self.config
        top = c.max_prefetch or self.K
        steps = self._steps_ahead[layer]
        for ahead, tier in ((c.lookahead, Tier.VRAM), (c.stage_lookahead, Tier.RAM)):
            if ahead == 0 or ahead >= self.L:
                continue
            nl = (layer + ahead) % self.L
            if self._qmax[nl] < c.prefetch_min_prob:
                continue
            row = self._q[nl]
            want = (self.state[tier][nl] == ABSENT) & (row >= c.prefetch_min_prob)
            if not want.any():
                continue
            cands = np.flatnonzero(want)
            density = row[cands] / self.sizes[nl, cands]
            cands = cands[np.argsort(-density, kind="stable")[:top]]
            when = now + ahead * c.seconds_per_layer
            for e in cands.tolist():
                # Displace only experts expected later than this one: keep < -d(candidate).
                below = -float(steps[nl] + self._far[nl, e])
                if tier == Tier.VRAM:
                    self._prefetch(nl, e, when, call, below=below)
                else:
                    self._stage(nl, e, when, call, below=below)
