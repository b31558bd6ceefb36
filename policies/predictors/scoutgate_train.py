"""Training and held-out evaluation of ScoutGate on routing traces (CPU, deterministic by seed).

Offers:
- `split_requests(trace, train_frac, seed) -> (train, eval)`: disjoint request ids.
- `split_in_time(trace, train_frac) -> (train_rows, eval_rows)`: for a trace with one
  request, the first decode rows of each request train and the rest evaluate.
- `next_token_examples(trace, target_rows, history) -> Examples`: context = the token ids
  of rows up to t (same request), target = the experts of decode row t+1, all layers.
- `train_scoutgate(trace, *, train_requests | train_rows, epochs, lr, seed, ...) -> ScoutGateModel`.
- `evaluate(model, trace, requests | rows=...) -> dict`: recall@k / precision@k per layer
  and overall for ScoutGate, an EWMA (alpha 0.3) and the training-set frequency prior.
- `require_token_ids(trace, where)`, `trace_identity(trace)`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..traces import DECODE, Trace
from .scoutgate import ScoutGateConfig, ScoutGateModel, token_buckets

EWMA_ALPHA = 0.3


@dataclasses.dataclass(frozen=True)
class Examples:
    contexts: np.ndarray  # int64 [N, m] token ids, oldest first, -1 = none
    targets: np.ndarray  # bool [N, L, E]: experts used at the target row
    rows: np.ndarray  # int64 [N]: the target row t+1 of each example


def trace_identity(trace: Trace) -> str:
    """The model name, row count and a content hash: which trace a model was trained on."""
    digest = hashlib.sha256(trace.experts.tobytes() + trace.token_ids.tobytes()).hexdigest()[:12]
    return f"{trace.meta.model} ({trace.tokens} rows, sha256:{digest})"


def require_token_ids(trace: Trace, where: object = None) -> None:
    """ScoutGate's context is token ids: refuse a trace without them (one-line ValueError)."""
    if not trace.meta.has_token_ids or not (trace.token_ids >= 0).any():
        raise ValueError(f"trace {where or trace.meta.model} has no token ids; ScoutGate needs them")


def split_requests(trace: Trace, train_frac: float = 0.7, seed: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shuffle the request ids (by `seed`) and cut: at least one request on each side."""
    if not 0.0 < train_frac < 1.0:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
    ids = np.unique(trace.request)
    if ids.size < 2:
        raise ValueError(f"trace {trace.meta.model} has {ids.size} request(s); holding out requests needs >= 2 "
                         f"(use split_in_time)")
    order = np.random.default_rng(seed).permutation(ids)
    n_train = min(max(int(round(train_frac * ids.size)), 1), ids.size - 1)
    return tuple(sorted(order[:n_train].tolist())), tuple(sorted(order[n_train:].tolist()))


def split_in_time(trace: Trace, train_frac: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Bool row masks [T]: in each request the first `train_frac` of decode rows train, the
    rest evaluate. Contexts still reach back over the cut (past tokens are known online)."""
    if not 0.0 < train_frac < 1.0:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
    train = np.zeros(trace.tokens, dtype=bool)
    decode_rows = np.flatnonzero(trace.phase == DECODE)
    for r in np.unique(trace.request[decode_rows]):
        rows = decode_rows[trace.request[decode_rows] == r]
        train[rows[: int(round(train_frac * rows.size))]] = True
    return train, (trace.phase == DECODE) & ~train


def _row_mask(trace: Trace, requests: Sequence[int] | None, rows: np.ndarray | None, what: str) -> np.ndarray:
    if (requests is None) == (rows is None):
        raise ValueError(f"{what}: give exactly one of requests or rows")
    if rows is not None:
        mask = np.asarray(rows, dtype=bool)
        if mask.shape != (trace.tokens,):
            raise ValueError(f"{what}: rows must be a bool mask of shape ({trace.tokens},), got {mask.shape}")
        return mask
    known = set(np.unique(trace.request).tolist())
    unknown = sorted(set(int(r) for r in requests) - known)
    if unknown:
        raise ValueError(f"{what}: request(s) {unknown} not in the trace (it has {len(known)} requests)")
    return np.isin(trace.request, np.asarray(list(requests), dtype=np.int64))


def next_token_examples(trace: Trace, target_rows: np.ndarray, history: int) -> Examples:
    """One example per decode row t+1 in `target_rows` whose row t is of the same request."""
    T, E = trace.tokens, trace.num_experts
    t1 = np.flatnonzero(target_rows & (trace.phase == DECODE))
    t1 = t1[t1 > 0]
    t1 = t1[trace.request[t1 - 1] == trace.request[t1]]
    t = t1 - 1
    run_start = np.zeros(T, dtype=np.int64)  # first row of each row's request
    starts = np.flatnonzero(np.diff(trace.request)) + 1
    run_start[starts] = starts
    run_start = np.maximum.accumulate(run_start)
    contexts = np.full((t.size, history), -1, dtype=np.int64)
    for j in range(history):  # column j holds row t - (history - 1 - j)
        src = t - (history - 1 - j)
        ok = src >= run_start[t]
        contexts[ok, j] = trace.token_ids[src[ok]]
    ex = trace.experts[t1].astype(np.int64)  # [N, L, K]
    hot = np.zeros((t1.size, trace.num_layers, E + 1), dtype=bool)  # column E absorbs the -1s
    np.put_along_axis(hot, np.where(ex < 0, E, ex), True, axis=2)
    return Examples(contexts, hot[:, :, :E], t1.astype(np.int64))


def train_scoutgate(trace: Trace, *, train_requests: Sequence[int] | None = None, train_rows: np.ndarray | None = None,
                    epochs: int = 60, lr: float = 3e-3, seed: int = 0, batch_size: int = 64,
                    weight_decay: float = 1e-2, cardinality: float = 0.01, token_dropout: float = 0.1,
                    history: int = 8, **dims) -> ScoutGateModel:
    """Train on the next-token examples of `train_requests` (or the `train_rows` mask).

    Loss = BCE(logits, next token's expert set) + cardinality * mean over (token, layer) of
    (sum_e p_e - k)^2. `dims` are `ScoutGateConfig` fields (vocab_buckets, dim, rank, ...).
    Deterministic for a given seed (single CPU thread while training).
    """
    require_token_ids(trace)
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"scoutgate training: need epochs >= 1, lr > 0, batch_size >= 1; "
                         f"got {epochs}, {lr}, {batch_size}")
    mask = _row_mask(trace, train_requests, train_rows, "train_scoutgate")
    config = ScoutGateConfig(num_layers=trace.num_layers, num_experts=trace.num_experts, top_k=trace.top_k,
                             history=history, trained_on=trace_identity(trace), **dims)
    ex = next_token_examples(trace, mask, history)
    if ex.rows.size == 0:
        raise ValueError(f"trace {trace.meta.model}: the training split has no decode rows with a previous row")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # results must not depend on the machine's thread count
    try:
        return _fit(config, ex, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size,
                    weight_decay=weight_decay, cardinality=cardinality, token_dropout=token_dropout)
    finally:
        torch.set_num_threads(threads)


def _fit(config: ScoutGateConfig, ex: Examples, *, epochs: int, lr: float, seed: int, batch_size: int,
         weight_decay: float, cardinality: float, token_dropout: float) -> ScoutGateModel:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ScoutGateModel(config)
    targets = torch.from_numpy(ex.targets).float()
    prior = targets.mean(0)
    with torch.no_grad():
        model.prior.copy_(prior)
        # Start from the frequency prior, so training only has to learn what the context adds.
        p = prior.clamp(1e-3, 1 - 1e-3)
        model.bias.copy_(torch.log(p / (1 - p)))
    buckets = torch.from_numpy(token_buckets(ex.contexts, config.vocab_buckets).reshape(ex.contexts.shape))
    dense = [p for name, p in model.named_parameters() if name != "tokens.weight"]
    opts = [torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay),
            torch.optim.SparseAdam([model.tokens.weight], lr=lr)]
    n, k = targets.shape[0], float(config.top_k)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            b = buckets[idx]
            if token_dropout > 0:  # hide some context tokens: rare tokens must not carry a prediction alone
                drop = torch.rand(b.shape, generator=gen) < token_dropout
                b = b.masked_fill(drop, config.vocab_buckets)
            logits = model(b)
            loss = F.binary_cross_entropy_with_logits(logits, targets[idx])
            if cardinality > 0:
                loss = loss + cardinality * ((torch.sigmoid(logits).sum(-1) - k) ** 2).mean()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in opts:
                opt.step()
    model.eval()
    return model


def _ewma_predictions(trace: Trace, t1: np.ndarray, alpha: float) -> np.ndarray:
    """[N, L, E]: an EWMA run over every row in trace order, read just before each row in t1."""
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    p = np.full((L, E), k / E)
    out = np.empty((t1.size, L, E))
    want = {int(r): i for i, r in enumerate(t1)}
    layers = np.arange(L)[:, None]
    for t in range(trace.tokens):
        i = want.get(t)
        if i is not None:
            out[i] = p
        p *= 1.0 - alpha
        ex = trace.experts[t].astype(np.int64)
        ok = ex >= 0
        np.add.at(p, (np.broadcast_to(layers, ex.shape)[ok], ex[ok]), alpha)
    return out


def topk_scores(probs: np.ndarray, targets: np.ndarray, k: int) -> dict:
    """recall@k, precision@k (and recall@2k) of the k highest probabilities per (row, layer)."""
    def hits(budget: int) -> np.ndarray:
        top = np.argsort(-probs, axis=-1, kind="stable")[..., :budget]
        return np.take_along_axis(targets, top, axis=-1).sum(-1)  # [N, L]

    true = targets.sum(-1)
    has = true > 0
    h1, h2 = hits(k), hits(min(2 * k, probs.shape[-1]))
    rec = np.where(has, h1 / np.maximum(true, 1), np.nan)
    rec2 = np.where(has, h2 / np.maximum(true, 1), np.nan)
    prec = np.where(has, h1 / k, np.nan)
    return {"recall": float(np.nanmean(rec)), "precision": float(np.nanmean(prec)),
            "recall@2k": float(np.nanmean(rec2)),
            "recall_per_layer": np.nanmean(rec, axis=0).tolist(),
            "precision_per_layer": np.nanmean(prec, axis=0).tolist()}


def evaluate(model: ScoutGateModel, trace: Trace, requests: Sequence[int] | None = None, *,
             rows: np.ndarray | None = None, alpha: float = EWMA_ALPHA, blend: float = 0.5) -> dict:
    """Scores on the next-token examples of `requests` (or the `rows` mask), with baselines:
    `ewma` (per layer p <- (1-alpha) p + alpha onehot over every row of the trace, in order)
    and `prior` (the training set's per-layer expert frequency, `model.prior`)."""
    require_token_ids(trace)
    c = model.config
    if (c.num_layers, c.num_experts, c.top_k) != (trace.num_layers, trace.num_experts, trace.top_k):
        raise ValueError(f"scoutgate model is {c.num_layers}x{c.num_experts} top-{c.top_k}, trace "
                         f"{trace.meta.model} is {trace.num_layers}x{trace.num_experts} top-{trace.top_k}")
    ex = next_token_examples(trace, _row_mask(trace, requests, rows, "evaluate"), c.history)
    if ex.rows.size == 0:
        raise ValueError(f"trace {trace.meta.model}: the evaluation split has no decode rows to score")
    probs = model.probabilities(ex.contexts)
    prior = np.broadcast_to(model.prior.double().numpy(), probs.shape)
    ewma = _ewma_predictions(trace, ex.rows, alpha)
    k = c.top_k
    return {"rows": int(ex.rows.size), "top_k": k, "trained_on": c.trained_on,
            "scoutgate": topk_scores(probs, ex.targets, k),
            # what ScoutGatePredictor(blend=...) serves: the model mixed with the online EWMA
            f"scoutgate+ewma {blend:g}": topk_scores((1 - blend) * probs + blend * ewma, ex.targets, k),
            "ewma": topk_scores(ewma, ex.targets, k),
            "prior": topk_scores(prior, ex.targets, k),
            "prob_sum_per_layer": probs.sum(-1).mean(0).tolist()}
