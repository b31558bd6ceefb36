"""Summary statistics of a routing trace, to compare synthetic traces with real ones.

`trace_stats(trace) -> dict` over decode rows (requests back to back):
- `gini`, `entropy`: mean over layers of the Gini coefficient and of the normalised
  entropy (1 = uniform) of expert popularity; also per layer (`gini_per_layer`, ...).
- `reuse`: P(an expert chosen at a row is chosen again at the next row of the same
  request, same layer) = mean |S_t & S_t+1| / |S_t|.
- `layer_lift`: consecutive-layer co-occurrence lift, sum over (a at l, b at l+1) of
  P(a, b) * P(a, b) / (P(a) P(b)), averaged over layer pairs: 1 when layers are
  independent, larger when layer l's choice predicts layer l+1's. It is biased upward on
  short traces (sparse counts), so compare traces of similar length.
- `lru_hit_10`: demand hit rate of one LRU cache shared by all layers, unit-size experts,
  capacity 10% of all experts (the reference figure in FORMAT.md).

`most_used(trace, n)`: the n most used (layer, expert) pairs, to warm a pipeline with.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .traces import DECODE, Trace


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0 = equal, -> 1 = concentrated)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * total))


def norm_entropy(counts: np.ndarray) -> float:
    """Shannon entropy of counts / log(n): 1 for uniform use, 0 for a single expert."""
    c = np.asarray(counts, dtype=np.float64)
    if c.size < 2 or c.sum() == 0:
        return 0.0
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum() / np.log(c.size))


def lru_hit_rate(trace: Trace, capacity_share: float) -> float:
    """Hit rate of one shared LRU over decode rows; capacity as a share of all L*E experts."""
    L, E = trace.num_layers, trace.num_experts
    cap = max(1, int(round(capacity_share * L * E)))
    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    ex = trace.experts[trace.phase == DECODE]
    for row in ex:
        for layer in range(L):
            for e in row[layer]:
                if e < 0:
                    continue
                key = layer * E + int(e)
                total += 1
                if key in cache:
                    hits += 1
                    cache.move_to_end(key)
                else:
                    cache[key] = None
                    if len(cache) > cap:
                        cache.popitem(last=False)
    return hits / total if total else 0.0


def _reuse(ex: np.ndarray, req: np.ndarray, E: int) -> float:
    same = req[1:] == req[:-1]
    if not same.any():
        return 0.0
    T, L, _ = ex.shape
    hot = np.zeros((T, L, E + 1), dtype=bool)  # column E absorbs the -1 padding
    np.put_along_axis(hot, np.where(ex < 0, E, ex).astype(np.int64), True, axis=2)
    hot = hot[:, :, :E]
    inter = (hot[:-1] & hot[1:]).sum(axis=2)[same]
    size = hot[:-1].sum(axis=2)[same]
    return float(inter.sum() / max(1, size.sum()))


def _layer_lift(ex: np.ndarray, E: int) -> float:
    T, L, _ = ex.shape
    lifts = []
    for layer in range(L - 1):
        a, b = ex[:, layer], ex[:, layer + 1]
        joint = np.zeros((E, E))
        for i in range(a.shape[1]):
            for j in range(b.shape[1]):
                ok = (a[:, i] >= 0) & (b[:, j] >= 0)
                np.add.at(joint, (a[ok, i], b[ok, j]), 1)
        if joint.sum() == 0:
            continue
        joint /= joint.sum()
        pa, pb = joint.sum(1), joint.sum(0)
        nz = joint > 0
        lifts.append(float((joint[nz] ** 2 / np.outer(pa, pb)[nz]).sum()))
    return float(np.mean(lifts)) if lifts else 1.0


def trace_stats(trace: Trace) -> dict:
    """The statistics above as a JSON-ready dict (floats rounded to 4 places)."""
    dec = trace.phase == DECODE
    ex, req = trace.experts[dec], trace.request[dec]
    L, E = trace.num_layers, trace.num_experts
    counts = np.stack([np.bincount(ex[:, layer][ex[:, layer] >= 0], minlength=E) for layer in range(L)])
    g = [gini(c) for c in counts]
    h = [norm_entropy(c) for c in counts]
    r4 = lambda x: round(float(x), 4)  # noqa: E731
    return {
        "decode_rows": int(dec.sum()), "layers": L, "experts": E, "top_k": trace.top_k,
        "gini": r4(np.mean(g)), "entropy": r4(np.mean(h)),
        "reuse": r4(_reuse(ex, req, E)), "layer_lift": r4(_layer_lift(ex, E)),
        "lru_hit_10": r4(lru_hit_rate(trace, 0.10)),
        "gini_per_layer": [r4(x) for x in g], "entropy_per_layer": [r4(x) for x in h],
    }


def most_used(trace: Trace, n: int, include_prefill: bool = True) -> list[tuple[int, int]]:
    """The `n` (layer, expert) pairs `trace` uses most often, most used first (ties: lower
    layer, then lower expert): what to warm a pipeline with (ExpertPipeline.warm) before
    serving requests like the trace's."""
    if n < 1:
        raise ValueError(f"most_used: n must be >= 1, got {n}")
    rows = trace.experts if include_prefill else trace.experts[trace.phase == DECODE]
    L, E = trace.num_layers, trace.num_experts
    layer_of = np.broadcast_to(np.arange(L)[None, :, None], rows.shape)
    used = rows >= 0
    counts = np.bincount(layer_of[used].astype(np.int64) * E + rows[used].astype(np.int64), minlength=L * E)
    order = np.argsort(-counts, kind="stable")[:n]
    return [(int(k // E), int(k % E)) for k in order if counts[k] > 0]
