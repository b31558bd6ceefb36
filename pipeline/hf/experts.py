"""The pipeline as a transformers experts implementation: one registered forward, one tag per module.

    register() -> str                      puts `moe_forward` in transformers' ExpertsInterface under
                                           IMPLEMENTATION, once, on first use (never at import)
    ExpertsTag(pipe, layer, ...)           what an experts module carries as `module._moe_cache`:
                                           its MoE layer in the store, the next MoE layer's router
                                           (the lookahead), the shared counters
    moe_forward(module, hidden_states, top_k_index, top_k_weights)   the registered forward

One forward call is one MoE layer of one forward pass: the experts that any row picked are fetched
(at most `at_once` per fetch, in ascending order, so a prefill or a batch whose union exceeds the
VRAM budget runs in groups) and each is computed by the modeling file's own loop body
(pipeline.kernels.hf_experts), so the output is the bits of the resident model's eager experts.
The routing is read on the host once per layer (with the lookahead's scores), and each expert's
rows are found there: in a one-row pass its top-k slot, in a prefill or a batch its token and
slot indices, moved to the device in one copy. So the loop body runs without the eager loop's
torch.where per expert, each of which waits for the GPU (on an H100, GPT-OSS-20B dimensions,
those waits cost a decode step about a third more time).
Before the fetch, the next MoE layer's router scores this layer's input: the policy receives them
with this layer's activation event (`ExpertPipeline.hint_scores`) and can move that layer's
experts while this one computes.
"""
from __future__ import annotations

import threading
from time import perf_counter

import torch
import torch.nn.functional as F

from ..kernels.hf_experts import Rows, add_expert, as_transformers, expert_rows, row_zero

IMPLEMENTATION = "moe_cache"
_registered = False
_lock = threading.Lock()


def register() -> str:
    """Register the forward with transformers (idempotent); returns its name."""
    global _registered
    with _lock:
        if not _registered:
            from transformers.integrations.moe import ExpertsInterface

            ExpertsInterface.register(IMPLEMENTATION, moe_forward)
            _registered = True
    return IMPLEMENTATION


class Counters:
    """Shared by every layer of one model: what `stats()` reports beside the pipeline's own."""

    def __init__(self):
        self.forward_calls = 0
        self.fetches = 0
        self.lookahead_hits = 0  # next-layer experts the lookahead's top-k named, one-row passes
        self.lookahead_total = 0
        self.pending: dict[int, set[int]] = {}  # layer -> the top-k the lookahead named for it
        # Host seconds inside the experts forwards, by what they went to (see TimeSplit)
        self.routing_wait_s = self.lookahead_s = self.fetch_s = self.math_s = 0.0


class ExpertsTag:
    def __init__(self, pipe, layer: int, family: str, top_k: int, at_once: int, counters: Counters,
                 next_layer: int | None = None, next_router: torch.nn.Module | None = None):
        self.pipe, self.layer, self.family, self.top_k = pipe, layer, family, top_k
        self.at_once = at_once
        self.counters = counters
        self.next_layer, self.next_router = next_layer, next_router

    @property
    def lookahead(self) -> bool:
        return self.next_router is not None

    def scores_for_next(self, x: torch.Tensor) -> torch.Tensor:
        """The next MoE layer's router logits for this layer's input rows, one score per expert
        (the highest over rows: a batch or prefill needs the union of its rows' experts)."""
        r = self.next_router
        logits = F.linear(x.to(r.weight.dtype), r.weight, getattr(r, "bias", None))
        bias = getattr(r, "e_score_correction_bias", None)  # DeepSeek ranks by sigmoid + this bias
        if bias is not None:
            logits = torch.sigmoid(logits.float()) + bias.float()
        return logits.float().amax(0)


def _tag(module) -> ExpertsTag:
    tag = getattr(module, "_moe_cache", None)
    if tag is None:
        raise RuntimeError(f"{type(module).__name__} runs the '{IMPLEMENTATION}' experts implementation but was "
                           "not prepared by pipeline.hf.offload_experts; load the model with load_offloaded() "
                           "or call offload_experts(model, ...)")
    return tag


@torch.no_grad()
def moe_forward(module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
    tag = _tag(module)
    c = tag.counters
    c.forward_calls += 1
    rows = hidden_states.shape[0]
    picked = top_k_index.reshape(-1)
    t0 = perf_counter()
    # One copy to the host per layer: the experts picked and, behind them, the next layer's
    # scores (ids < 2**24 are exact as float32); the unique ids are then taken on the host.
    scores = tag.scores_for_next(hidden_states) if tag.lookahead else None
    t1 = perf_counter()
    host = (picked if scores is None else torch.cat([picked.float(), scores])).cpu()  # waits for the GPU
    t2 = perf_counter()
    routing = host[:picked.numel()].long()
    row = routing.tolist()
    ids = sorted(set(row))  # ascending: the loop's order of experts
    # Each expert's rows found on the host, so add_expert needs no torch.where (a wait per expert):
    # one row, each expert once in it: its top-k slot; more rows: one copy of all their indices.
    if rows == 1 and len(ids) == len(row):
        zero = row_zero(hidden_states.device)
        at = {e: Rows(p, zero) for p, e in enumerate(row)}
    else:
        at = expert_rows(routing.view(top_k_index.shape), ids, hidden_states.device)
    t2b = perf_counter()
    predicted = c.pending.pop(tag.layer, None)
    if predicted is not None and rows == 1:
        c.lookahead_hits += len(predicted & set(ids))
        c.lookahead_total += len(ids)
    if scores is not None:
        next_scores = host[picked.numel():]
        tag.pipe.hint_scores({tag.next_layer: next_scores.tolist()})
        if rows == 1:
            c.pending[tag.next_layer] = set(torch.topk(next_scores, tag.top_k).indices.tolist())
    t3 = perf_counter()
    c.routing_wait_s += t2 - t1
    c.lookahead_s += (t1 - t0) + (t3 - t2b)
    c.math_s += t2b - t2  # finding each expert's rows: the loop body's own work, done up front
    final = torch.zeros_like(hidden_states)
    for start in range(0, len(ids), tag.at_once):
        group = ids[start:start + tag.at_once]
        t4 = perf_counter()
        experts = tag.pipe.fetch(tag.layer, group, rows=rows)
        t5 = perf_counter()
        c.fetches += 1
        for e, tensors in zip(group, experts):
            add_expert(module, final, hidden_states, top_k_index, top_k_weights, e,
                       as_transformers(tag.family, tensors), at.get(e))
        c.fetch_s += t5 - t4
        c.math_s += perf_counter() - t5
    return final
