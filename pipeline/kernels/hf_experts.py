"""transformers' experts math on experts handed out by the pipeline, bit for bit its eager forward.

    as_transformers(family, tensors) -> ExpertWeights      a fetched expert's dense tensors in the
                                         layout of one slice of the experts module's parameters
    add_expert(module, final, x, top_k_index, top_k_weights, expert, weights, at=None)
                                         final += expert's weighted output on its rows, the ops and
                                         their order those of the modeling file's own loop
    expert_rows(top_k_index_on_host, experts, device) -> {expert: Rows}
                                         each expert's rows as the loop finds them, for `at`
    Rows(slot, row_zero(device))         `at` in a one-row pass: the expert's top-k slot

Why the eager loop: it is the one transformers implementation that touches one expert at a time,
so it runs on just the experts a step needs, in any number of groups, and a model with every expert
resident (`experts_implementation="eager"`) computes the same bits. The layouts differ by family:
  mixtral, qwen-moe : gate_up_proj [2I, H] = gate rows then up rows, down_proj [H, I]; a store keeps
                      gate and up adjacent, so gate_up is one view of both, no copy
  gpt-oss           : gate_up_proj [H, 2I] (rows of mlp1 interleaved gate/linear), down_proj [I, H],
                      biases; the module holds the transposes contiguous and a matmul's bits depend on
                      strides, so the decoded [2I, H] and [H, I] are copied transposed per use
  fused             : transformers' own bf16 GPT-OSS layout, as stored
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ExpertWeights(NamedTuple):
    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def joined_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a; b] along dim 0: a view when b starts where a ends in one storage, else a copy."""
    if (a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype and a.shape[1:] == b.shape[1:]
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset() + a.numel()):
        return a.as_strided((a.shape[0] + b.shape[0], *a.shape[1:]), a.stride())
    return torch.cat([a, b])


def _per_expert_roles(gate: str, up: str, down: str):
    def layout(t: dict[str, torch.Tensor]) -> ExpertWeights:
        return ExpertWeights(joined_rows(t[gate], t[up]), t[down])
    return layout


def _gpt_oss(t: dict[str, torch.Tensor]) -> ExpertWeights:
    return ExpertWeights(t["mlp1_weight"].t().contiguous(), t["mlp2_weight"].t().contiguous(),
                         t["mlp1_bias"], t["mlp2_bias"])


def _fused(t: dict[str, torch.Tensor]) -> ExpertWeights:
    return ExpertWeights(t["gate_up_proj"], t["down_proj"], t.get("gate_up_proj_bias"), t.get("down_proj_bias"))


LAYOUTS = {
    "mixtral": _per_expert_roles("w1", "w3", "w2"),
    "qwen-moe": _per_expert_roles("gate_proj", "up_proj", "down_proj"),
    "gpt-oss": _gpt_oss,
    "fused": _fused,
}


def as_transformers(family: str, tensors: dict[str, torch.Tensor]) -> ExpertWeights:
    try:
        layout = LAYOUTS[family]
    except KeyError:
        raise ValueError(f"transformers experts: store family {family!r} unknown; valid: {', '.join(LAYOUTS)}") from None
    return layout(tensors)


class Rows(NamedTuple):
    """Where one expert's rows are, found on the host before its loop body runs."""
    top_k_pos: torch.Tensor | int  # an int: a one-row pass, the expert's slot in the row's top-k
    token_idx: torch.Tensor  # on the device: index_add_'s index (row_zero for one row)


def add_expert(module, final: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor, expert: int, w: ExpertWeights, at: Rows | None = None) -> None:
    """The eager loop's body for one expert: its rows of x through it, weighted, added into final.
    The loop finds the expert's rows with torch.where, which waits for the device once per expert;
    `at` gives them found beforehand on the host (expert_rows, or one row's slot with row_zero), so
    the same ops run on the same values; for one row, on views of it."""
    if at is None:
        top_k_pos, token_idx = torch.where(top_k_index.t() == expert)  # the order of the loop's one_hot mask
        current, weight = x[token_idx], top_k_weights[token_idx, top_k_pos, None]
    elif isinstance(at.top_k_pos, int):
        token_idx = at.token_idx
        current, weight = x.contiguous(), top_k_weights[:, at.top_k_pos, None]
    else:
        token_idx = at.token_idx
        current, weight = x[token_idx], top_k_weights[token_idx, at.top_k_pos, None]
    if module.is_transposed:
        gate_up = current @ w.gate_up
        if w.gate_up_bias is not None:
            gate_up = gate_up + w.gate_up_bias
        out = module._apply_gate(gate_up) @ w.down
        if w.down_bias is not None:
            out = out + w.down_bias
    else:
        gate, up = F.linear(current, w.gate_up).chunk(2, dim=-1)
        out = F.linear(module.act_fn(gate) * up, w.down)
    out = out * weight
    final.index_add_(0, token_idx, out.to(final.dtype))


def expert_rows(top_k_index: torch.Tensor, experts: list[int], device: torch.device) -> dict[int, Rows]:
    """Each expert's rows, the eager loop's torch.where on `top_k_index` (a host copy of the
    routing, [rows, top_k]), found on the host and moved to `device` in one copy."""
    t = top_k_index.t()
    pos, tok, spans, n = [], [], {}, 0
    for e in experts:
        p, r = torch.where(t == e)
        pos.append(p)
        tok.append(r)
        spans[e] = (n, n + len(p))
        n += len(p)
    both = torch.stack([torch.cat(pos), torch.cat(tok)])
    if device.type == "cuda":
        both = both.pin_memory().to(device, non_blocking=True)
    return {e: Rows(both[0, a:b], both[1, a:b]) for e, (a, b) in spans.items()}


_ROW_ZERO: dict[torch.device, torch.Tensor] = {}


def row_zero(device: torch.device) -> torch.Tensor:
    """index_add_'s index for a one-row pass, made once per device."""
    index = _ROW_ZERO.get(device)
    if index is None:
        index = _ROW_ZERO[device] = torch.zeros(1, dtype=torch.long, device=device)
    return index


__all__ = ["ExpertWeights", "LAYOUTS", "Rows", "add_expert", "as_transformers", "expert_rows", "joined_rows",
           "row_zero"]
