"""GPT-OSS's gated activation as one Triton kernel on CUDA, for the replay's expert MLP.

    supported(h) -> bool            CUDA tensor, Triton present, not switched off
    gpt_oss_glu(h, alpha, limit)    h [n, 2I] (gate and linear interleaved) -> [n, I], h's dtype

Why: in PyTorch the activation is seven elementwise kernels per expert (two clamps, a scale,
a sigmoid, two products, an add). At batch 1 each is a few microseconds of GPU time inside
the decode graphs (~670 kernels per token at top-4 x 24 layers), and in an eager prefill
each is a launch from the host, which is what bounds a prefill pass on an H100 (its profile:
17k launches, GPU busy 8 of 21 ms per token). One kernel reads h once and writes the output
once.

The values: computed in float32 from the bf16 inputs and rounded once, where PyTorch rounds
after every op. Every path of the replay on CUDA (eager, graphs, the pipeline and the
resident reference) runs this same kernel, so they still agree bit for bit; the CPU keeps
PyTorch's ops. MOE_CACHE_FUSED_GLU=0 in the environment switches back to PyTorch (A/B runs).
"""
from __future__ import annotations

import os

import torch

from ..triton_launch import FixedLaunch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU builds without Triton
    triton = None

BLOCK = 1024

if triton is not None:
    @triton.jit(do_not_specialize=["n_out"])
    def _glu(h_ptr, out_ptr, n_out, alpha, limit, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_out
        # out[r, j] <- h[r, 2j] (gate), h[r, 2j + 1] (linear): flat index k <- 2k, 2k + 1
        gate = tl.load(h_ptr + 2 * offs, mask=mask, other=0.0).to(tl.float32)
        linear = tl.load(h_ptr + 2 * offs + 1, mask=mask, other=0.0).to(tl.float32)
        gate = tl.minimum(gate, limit)
        linear = tl.minimum(tl.maximum(linear, -limit), limit)
        out = (linear + 1.0) * (gate * tl.sigmoid(gate * alpha))
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

_launches: dict[tuple, FixedLaunch] = {}


def supported(h: torch.Tensor) -> bool:
    # 16-byte aligned like every tensor the allocator hands out: the launcher's kernel was
    # specialised for such pointers.
    return (triton is not None and h.is_cuda and h.is_contiguous() and h.shape[-1] % 2 == 0
            and h.data_ptr() % 16 == 0 and os.environ.get("MOE_CACHE_FUSED_GLU", "1") != "0")


def gpt_oss_glu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    out = torch.empty(*h.shape[:-1], h.shape[-1] // 2, device=h.device, dtype=h.dtype)
    n = out.numel()
    if n == 0:
        return out
    # One launcher per dtype and device: the pointers' alignment is the allocator's (>= 16
    # bytes) and n_out is not specialised on, so the first call's kernel serves every call.
    key = (h.dtype, h.device)
    launch = _launches.get(key)
    if launch is None:
        launch = _launches[key] = FixedLaunch(_glu, {"BLOCK": BLOCK}, device=h.device)
    launch.launch((triton.cdiv(n, BLOCK),), h, out, n, float(alpha), float(limit))
    return out


__all__ = ["supported", "gpt_oss_glu"]
