"""Co-layer predictor: the experts a token chose at earlier layers predict its later layers.

A token's route through the layers is strongly correlated: on the real traces (data/traces) the experts
most often seen at layer l+d after this token's layer-l experts cover 39-45% of its true
layer-(l+d) experts for d = 1..6 on Qwen1.5 and Qwen3.6 (32% on Llama-4), where the previous
token's choice at l+d covers 17-34%. The predictor learns those pair counts online, so it
needs no hidden state and no router weights: it is the causal stand-in for router lookahead
when the decode loop cannot compute router scores ahead.

`prefetch-bench quality` (decode visits, online), recall@top_k of the next visit:
qwen1.5 0.396 (EWMA alpha 0.05: 0.146), qwen3.6 0.406 (0.302), llama4 0.310 (0.332; depth=4
0.353). It barely changes demand loads (the cache holds ~1.5 tokens of experts at 10%, and
which ones come back next token is what Belady knows); it is for prefetching one layer ahead.

After layer l runs, each layer j = l+1 .. l+depth of the same pass gets

    cond_i(b) = pairs[j-i, j, S_i, b].sum() / follows[j-i, j, S_i].sum()   for each layer i
                in [j-depth, l] this pass has run (S_i: its experts at layer i)
    p_j(b)    = w_n * mean_i cond_i(b) + (1 - w_n) * ewma_j(b),   w_n = weight * n / (n + evidence)

where pairs[d, j, a, b] counts passes with a at layer j-d and b at layer j, follows[d, j, a]
counts passes with a at layer j-d that reached layer j, and n is the mean follows count
behind the conditionals: with little evidence the row stays the EWMA. Each cond_i sums to
the experts per token, so p_j is calibrated like the EWMA. Every other layer (and every
layer of the next token) gets the inner EWMA.

Pairs are learnt only from single-token passes (at most top_k experts at a layer): a prefill
pass visits the union of many tokens' experts, which would pair everything with everything.
Memory: depth * L * E^2 float32 counts (40 x 256^2 x 4 B = 10.5 MB per unit of depth).
"""
from __future__ import annotations

import numpy as np

from ..events import Activation
from .base import Predictor
from .ewma import EwmaPredictor


class CoLayerPredictor(Predictor):
    name = "colayer"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, alpha: float = 0.05,
                 weight: float = 0.8, evidence: float = 4.0, depth: int = 1):
        super().__init__(num_layers, num_experts, top_k)
        if not 0.0 <= weight <= 1.0 or evidence < 0:
            raise ValueError(f"colayer: weight must be in [0, 1] and evidence >= 0; got {weight}, {evidence}")
        if not 1 <= depth < max(2, num_layers):
            raise ValueError(f"colayer: depth must be in [1, {max(1, num_layers - 1)}], got {depth}")
        self.weight, self.evidence, self.depth = float(weight), float(evidence), int(depth)
        self.horizon = self.depth
        self._inner = EwmaPredictor(num_layers, num_experts, top_k, alpha=alpha)
        L, E = num_layers, num_experts
        self._pairs = np.zeros((depth + 1, L, E, E), np.float32)  # [d, j, a, b]; d = 0 unused
        self._follows = np.zeros((depth + 1, L, E), np.float32)  # [d, j, a]
        self._route: list[list[int] | None] = [None] * L  # this pass's experts per layer so far
        self._layer = -1  # the layer running now
        self._ahead: dict[int, np.ndarray] = {}  # layer -> row predicted for its visit in this pass

    def observe(self, event: Activation) -> None:
        L = self.num_layers
        if not 0 <= event.layer < L:
            raise ValueError(f"colayer: layer {event.layer} out of range [0, {L})")
        self._inner.observe(event)
        ids = sorted({e for e in event.experts if 0 <= e < self.num_experts})
        layer = event.layer
        if layer == self._layer:  # another visit of the same layer (a prefill pass in chunks)
            ids = sorted(set(self._route[layer] or ()) | set(ids))
        elif layer < self._layer:  # a new pass (before the first, the route is empty already)
            self._route = [None] * L
        self._route[layer], self._layer = ids, layer
        self._ahead.clear()
        if len(ids) > self.top_k:
            return  # a multi-token pass: neither learn nor predict from it
        self._learn(layer, ids)
        for j in range(layer + 1, min(L, layer + self.depth + 1)):
            row = self._conditional(j)
            if row is not None:
                self._ahead[j] = row

    def _learn(self, j: int, ids: list[int]) -> None:
        for d in range(1, self.depth + 1):
            src = self._route[j - d] if j - d >= 0 else None
            if src and ids and len(src) <= self.top_k:
                self._pairs[d, j][np.ix_(src, ids)] += 1.0
                self._follows[d, j, src] += 1.0

    def _conditional(self, j: int) -> np.ndarray | None:
        conds, evidence = [], 0.0
        for d in range(j - self._layer, self.depth + 1):
            src = self._route[j - d] if j - d >= 0 else None
            if not src or len(src) > self.top_k:
                continue
            total = float(self._follows[d, j, src].sum())
            if total > 0:
                conds.append(self._pairs[d, j, src].sum(axis=0) / total)
                evidence += total / len(src)
        if not conds:
            return None
        n = evidence / len(conds)
        w = self.weight * n / (n + self.evidence)
        cond = np.mean(conds, axis=0, dtype=np.float64)
        return np.minimum(w * cond + (1.0 - w) * self._inner.predict(j), 1.0)

    def predict(self, layer: int) -> np.ndarray:
        row = self._ahead.get(layer)
        return row.copy() if row is not None else self._inner.predict(layer)

    def predict_all(self) -> np.ndarray:
        out = self._inner.predict_all()
        for layer, row in self._ahead.items():
            out[layer] = row
        return out
