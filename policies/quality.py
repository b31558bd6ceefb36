"""Prediction quality on a trace: recall@k and precision@k of each layer's next-visit experts.

`evaluate(trace, predictor, ks)` replays the trace online (`decode_steps`, prefill passes
included so predictors warm up on the prompt as they would when serving). Before layer l
runs, the predictor's top-k experts for l are compared with the experts l then uses;
afterwards the predictor observes the visit. Only decode visits are scored.

recall@k = |top-k & used| / |used|, precision@k = |top-k & used| / k, averaged over the
scored visits (overall and per layer).
"""
from __future__ import annotations

import time

import msgspec
import numpy as np

from .events import Activation
from .predictors.base import Predictor
from .predictors.registry import make_predictor
from .traces import DECODE, Trace, decode_steps

INCLUDE_PREFILL = True


class QualityResult(msgspec.Struct, frozen=True):
    predictor: str
    k: int
    recall: float
    precision: float
    visits: int  # decode layer visits scored
    seconds: float
    recall_per_layer: tuple[float, ...]
    precision_per_layer: tuple[float, ...]


def build_predictor(name: str, trace: Trace, **options) -> Predictor:
    """A registry predictor for `trace`'s shape; the oracle (alone or in a fusion) gets the trace."""
    if name == "oracle":
        options = {"trace": trace, "include_prefill": INCLUDE_PREFILL, **options}
    if name == "fusion" and "oracle" in (options.get("members") or {}):
        mo = dict(options.get("member_options") or {})
        mo["oracle"] = {"trace": trace, "include_prefill": INCLUDE_PREFILL, **mo.get("oracle", {})}
        options = {**options, "member_options": mo}
    return make_predictor(name, trace.num_layers, trace.num_experts, trace.top_k, **options)


def evaluate(trace: Trace, predictor: Predictor, ks: tuple[int, ...] | None = None,
             name: str | None = None) -> list[QualityResult]:
    """One `QualityResult` per k (default: top_k and 2 * top_k, capped at num_experts)."""
    L, E = trace.num_layers, trace.num_experts
    ks = tuple(sorted({min(E, k) for k in (ks or (trace.top_k, 2 * trace.top_k))}))
    if not ks or ks[0] < 1:
        raise ValueError(f"quality: k must be >= 1, got {ks}")
    kmax = ks[-1]
    hits = np.zeros((len(ks), L), dtype=np.int64)  # summed hits per k and layer
    used = np.zeros(L, dtype=np.int64)  # summed |used| per layer
    visits = np.zeros(L, dtype=np.int64)
    has_w = bool(trace.meta.has_weights)
    start = time.perf_counter()
    # The loop body runs ~700k times on the Llama-4 trace: plain Python lists and sets
    # are cheaper here than small numpy arrays.
    for step in decode_steps(trace, include_prefill=INCLUDE_PREFILL):
        scored = step.phase == DECODE
        token = int(step.token_ids[0]) if scored and step.token_ids[0] >= 0 else None
        rows, wrows = step.experts.tolist(), step.weights.tolist() if has_w else None
        for layer in range(L):
            ids = [e for e in rows[layer] if e >= 0]
            if scored and ids:
                p = predictor.predict(layer)
                top = (np.argpartition(-p, kmax - 1)[:kmax] if kmax < E else np.arange(E))
                top = top[np.argsort(-p[top], kind="stable")].tolist() if len(ks) > 1 else top.tolist()
                truth = set(ids)
                for i, k in enumerate(ks):
                    hits[i, layer] += sum(1 for e in top[:k] if e in truth)
                used[layer] += len(ids)
                visits[layer] += 1
            weights = None
            if wrows is not None:
                w = [x for e, x in zip(rows[layer], wrows[layer]) if e >= 0]
                weights = tuple(w) if all(x == x for x in w) else None  # NaN != NaN: unknown weights
            predictor.observe(Activation(layer=layer, experts=tuple(ids), token_id=token, weights=weights))
    seconds = time.perf_counter() - start
    n = max(1, int(visits.sum()))
    out = []
    for i, k in enumerate(ks):
        rec = np.divide(hits[i], used, out=np.zeros(L), where=used > 0)
        prec = np.divide(hits[i], k * visits, out=np.zeros(L), where=visits > 0)
        out.append(QualityResult(predictor=name or predictor.name, k=k,
                                 recall=float(hits[i].sum() / max(1, used.sum())),
                                 precision=float(hits[i].sum() / (k * n)), visits=int(visits.sum()),
                                 seconds=round(seconds, 3),
                                 recall_per_layer=tuple(round(float(x), 4) for x in rec),
                                 precision_per_layer=tuple(round(float(x), 4) for x in prec)))
    return out


def format_table(results: list[QualityResult]) -> str:
    lines = [f"{'predictor':<12} {'k':>3} {'recall@k':>9} {'precision@k':>12} {'visits':>8} {'seconds':>8}"]
    for r in results:
        lines.append(f"{r.predictor:<12} {r.k:>3} {r.recall:>9.3f} {r.precision:>12.3f} {r.visits:>8} "
                     f"{r.seconds:>8.2f}")
    return "\n".join(lines)
