"""The expert MLP of each store family, run on the dense tensors `ExpertPipeline.fetch` returns.

    expert_forward(family, tensors, x) -> y          x [n, H] -> y [n, H], in the weights' dtype
    moe_forward(family, experts, x, weights, rows=None, ready=None, order=None) -> y
        router-weighted sum of several experts; `rows[i]` (optional) selects which rows of x
        expert i sees (a prefill pass routes each row to its own experts); `order` and
        `ready(i)` (optional) compute the experts in another order, each once it is ready
    router_weights(weights, like) -> w        the weights as a float32 tensor beside `like`
    weighted_sum(ys, w) -> y                  sum_i w[i] * ys[i] of a stack ys [k, n, H]
    rms_norm(h, eps) -> x                     a layer's normalised input

Families and roles (adapters/base.py):
  gpt-oss : mlp1_weight [2I, H] (+ bias) -> interleaved gate x[..., ::2] / linear x[..., 1::2];
            gate clamped max=7, linear to [-7, 7]; (linear + 1) * gate * sigmoid(1.702 gate);
            mlp2_weight [H, I] (+ bias)
  fused   : the same maths with transformers' GptOss layout: gate_up_proj [H, 2I] (+ bias),
            down_proj [I, H] (+ bias), x @ W instead of x @ W.T
  mixtral : w2(silu(w1 x) * w3 x)
  qwen-moe: down_proj(silu(gate_proj x) * up_proj x)
Nothing here allocates beyond the activations of the math itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import glu_kernel

GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0
FAMILIES = ("gpt-oss", "fused", "mixtral", "qwen-moe")


def _gpt_oss_glu(h: torch.Tensor) -> torch.Tensor:
    if glu_kernel.supported(h):  # CUDA: one kernel (pipeline/kernels/glu_kernel.py)
        return glu_kernel.gpt_oss_glu(h, GPT_OSS_ALPHA, GPT_OSS_LIMIT)
    gate, linear = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(max=GPT_OSS_LIMIT)
    linear = linear.clamp(min=-GPT_OSS_LIMIT, max=GPT_OSS_LIMIT)
    return (linear + 1) * (gate * torch.sigmoid(gate * GPT_OSS_ALPHA))


def expert_forward(family: str, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One expert on activations x [n, H] (cast to the weights' dtype); returns [n, H]."""
    if family == "gpt-oss":
        w1 = t["mlp1_weight"]
        x = x.to(w1.dtype)
        h = F.linear(x, w1, t.get("mlp1_bias"))
        return F.linear(_gpt_oss_glu(h), t["mlp2_weight"], t.get("mlp2_bias"))
    if family == "fused":
        w1 = t["gate_up_proj"]
        x = x.to(w1.dtype)
        h = x @ w1
        if "gate_up_proj_bias" in t:
            h = h + t["gate_up_proj_bias"]
        y = _gpt_oss_glu(h) @ t["down_proj"]
        return y + t["down_proj_bias"] if "down_proj_bias" in t else y
    if family == "mixtral":
        x = x.to(t["w1"].dtype)
        return F.linear(F.silu(F.linear(x, t["w1"])) * F.linear(x, t["w3"]), t["w2"])
    if family == "qwen-moe":
        x = x.to(t["gate_proj"].dtype)
        return F.linear(F.silu(F.linear(x, t["gate_proj"])) * F.linear(x, t["up_proj"]), t["down_proj"])
    raise ValueError(f"expert MLP: family {family!r} unknown; valid: {', '.join(FAMILIES)}")


def moe_forward(family: str, experts: list[dict[str, torch.Tensor]], x: torch.Tensor, weights,
                rows: list[torch.Tensor | None] | None = None, ready=None, order=None) -> torch.Tensor:
    """sum_i weights[i] * expert_i(x[rows[i]]) scattered back to [n, H] (all rows when rows[i] is None).
    `order` (optional): the order the experts are computed in, each after `ready(i)` when given;
    the sum is always taken in router order, so the result does not depend on `order`."""
    if len(weights) != len(experts) or (rows is not None and len(rows) != len(experts)):
        raise ValueError(f"moe_forward: {len(experts)} experts, {len(weights)} weights"
                         f"{'' if rows is None else f', {len(rows)} row sets'}")
    if not experts:
        raise ValueError("moe_forward: no experts")
    if order is not None and sorted(order) != list(range(len(experts))):
        raise ValueError(f"moe_forward: order {list(order)} must list each of the {len(experts)} experts once")
    ys: list[torch.Tensor | None] = [None] * len(experts)
    for i in range(len(experts)) if order is None else order:
        if ready is not None:
            ready(i)
        sel = None if rows is None else rows[i]
        xi = x if sel is None else x.index_select(0, sel)
        ys[i] = expert_forward(family, experts[i], xi)
    w = router_weights(weights, ys[0])
    if rows is None:
        return weighted_sum(torch.stack(ys), w)
    out = torch.zeros(x.shape[0], ys[0].shape[-1], dtype=torch.promote_types(ys[0].dtype, w.dtype),
                      device=ys[0].device)
    for i, y in enumerate(ys):
        wy = y * w[i:i + 1]  # a 1-d weight: a 0-d one would not promote bf16 to float32
        if rows[i] is None:
            out += wy
        else:
            out.index_add_(0, rows[i], wy)
    return out


def rms_norm(h: torch.Tensor, eps: float) -> torch.Tensor:
    """h normalised by its root mean square over the last dim, in float32, back in h's dtype."""
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def router_weights(weights, like: torch.Tensor) -> torch.Tensor:
    """`weights` (floats or a tensor) as a float32 tensor on `like`'s device (float64 when `like`
    is): what weighted_sum multiplies by. A tensor already there is returned as it is; floats
    cost a host-to-device copy, so a decode loop passes tensors it uploaded once."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    if isinstance(weights, torch.Tensor):
        return weights.to(like.device, dtype)
    return torch.tensor(list(weights), dtype=dtype, device=like.device)


def weighted_sum(ys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_i w[i] * ys[i] of a stack ys [k, n, H] in router order: one product and one
    reduction, in float32 (float64 for float64 maths), whatever ys's dtype. Every path of the
    replay (eager, one graph per expert, one graph per layer) sums with this one op on the same
    stack, so they agree bit for bit; and it is two kernels where a sum expert by expert was 2k+1."""
    return (ys * w.view(-1, 1, 1)).sum(0)
