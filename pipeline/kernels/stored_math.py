"""The replay's expert math on experts handed out in their stored form (a pipeline opened with
vram_form="stored", vram_views=0, or `replay.direct_fetch(..., stored=True)`).

    is_stored(t) -> bool                     t holds MXFP4 `.blocks` / `.scales` tensors
    dense_of(t) -> {role: tensor}            the dense tensors (exact decode; a new copy)
    layer(family, h, experts, weights, norm_eps, out=None, act=None) -> h + sum_i w_i expert_i(norm(h))
    group_sum(family, x, experts, weights, rows=None, ready=None, order=None) -> float32 [n, H]
                                             sum_i w_i expert_i(x[rows[i]]), scattered back

GPT-OSS experts on CUDA run pipeline/kernels/mxfp4_kernel.py: two kernels per layer that read
the stored bytes, the normalisation folded into the first. Elsewhere (the CPU, other families,
MOE_CACHE_MXFP4_KERNEL=0) each expert is decoded, exactly, and the dense math runs
(pipeline/kernels/expert_mlp.py), so on the CPU the values are the dense path's bit for bit.
Either way a pipeline and a resident reference given the same experts agree bit for bit.
"""
from __future__ import annotations

import torch

from adapters.mxfp4 import mxfp4_decode

from . import mxfp4_kernel
from .expert_mlp import moe_forward, rms_norm

BLOCKS, SCALES = ".blocks", ".scales"


def is_stored(t: dict[str, torch.Tensor]) -> bool:
    return any(role.endswith(BLOCKS) for role in t)


def dense_of(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for role, v in t.items():
        if role.endswith(SCALES):
            continue
        if role.endswith(BLOCKS):
            stem = role[: -len(BLOCKS)]
            out[stem] = mxfp4_decode(v, t[stem + SCALES])
        else:
            out[role] = v
    return out


def uses_kernel(family: str, device: torch.device) -> bool:
    return family == "gpt-oss" and mxfp4_kernel.supported(device)


def _weights(weights, device: torch.device) -> torch.Tensor:
    """The router weights as contiguous float32 on `device`: a device tensor as it is (the decode
    loop's, uploaded once), floats with one upload."""
    if isinstance(weights, torch.Tensor):
        return weights.to(device, torch.float32).contiguous()
    return torch.tensor([float(w) for w in weights], dtype=torch.float32, device=device)


def layer(family: str, h: torch.Tensor, experts, weights, norm_eps: float,
          out: torch.Tensor | None = None, act: torch.Tensor | None = None) -> torch.Tensor:
    """A decode layer's MoE block on h [n, H] (bf16): h + the router-weighted sum of the experts
    on norm(h). On the kernel path it is written into `out` and the activations into `act`
    (float32 [k, n, I]) when given, else into new tensors; elsewhere both are ignored."""
    if not uses_kernel(family, h.device):
        y = moe_forward(family, [dense_of(t) for t in experts], rms_norm(h, norm_eps), weights)
        return h + y.to(h.dtype)
    lay = mxfp4_kernel.Layout.of(experts[0])
    w = _weights(weights, h.device)
    h = h.contiguous()
    out = torch.empty_like(h) if out is None else out
    return mxfp4_kernel.moe_layer(lay, experts, h, w, out, norm_eps, act=act)


def group_sum(family: str, x: torch.Tensor, experts, weights, rows=None, ready=None, order=None) -> torch.Tensor:
    """float32 [n, H]: sum_i w_i expert_i(x[rows[i]]) (all rows where rows is None or rows[i]
    is), x already normalised; `ready(i)` before expert i's bytes are read, in `order`."""
    if not uses_kernel(family, x.device):
        if ready is not None:  # the dense math would wait on each; decoding reads the bytes first
            for i in (order or range(len(experts))):
                ready(i)
        return moe_forward(family, [dense_of(t) for t in experts], x, weights, rows)
    lay = mxfp4_kernel.Layout.of(experts[0])
    w = _weights(weights, x.device)
    x = x.contiguous()
    n, H = x.shape
    if rows is None or all(r is None for r in rows):
        for i in (order or range(len(experts))):
            if ready is not None:
                ready(i)
        act = mxfp4_kernel.moe_up(lay, experts, x)
        return mxfp4_kernel.moe_down(lay, experts, act, w, torch.empty(n, H, device=x.device, dtype=torch.float32))
    ys: list[torch.Tensor | None] = [None] * len(experts)
    for i in (order or range(len(experts))):
        if ready is not None:
            ready(i)
        xi = x if rows[i] is None else x.index_select(0, rows[i])
        act = mxfp4_kernel.moe_up(lay, [experts[i]], xi)
        ys[i] = mxfp4_kernel.moe_down(lay, [experts[i]], act, w[i:i + 1],
                                      torch.empty(xi.shape[0], H, device=x.device, dtype=torch.float32))
    out = torch.zeros(n, H, device=x.device, dtype=torch.float32)
    for i, y in enumerate(ys):  # router order, whatever order they were computed in
        if rows[i] is None:
            out += y
        else:
            out.index_add_(0, rows[i], y)
    return out


__all__ = ["dense_of", "group_sum", "is_stored", "layer", "uses_kernel"]
