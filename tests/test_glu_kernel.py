"""The fused GPT-OSS activation (pipeline/kernels/glu_kernel.py): its math in Triton's CPU
interpreter, when it is used, and on the GPU against the same formula in float32."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.kernels import glu_kernel
from pipeline.kernels.expert_mlp import GPT_OSS_ALPHA, GPT_OSS_LIMIT, expert_forward

ROOT = Path(__file__).resolve().parents[1]


def reference(h: torch.Tensor) -> torch.Tensor:
    """The activation in float32 from h's values: what the kernel computes before its one rounding."""
    gate = h[..., ::2].float().clamp(max=GPT_OSS_LIMIT)
    linear = h[..., 1::2].float().clamp(min=-GPT_OSS_LIMIT, max=GPT_OSS_LIMIT)
    return (linear + 1) * (gate * torch.sigmoid(gate * GPT_OSS_ALPHA))


INTERPRETED = """
import torch
from pipeline.kernels import glu_kernel as G
torch.manual_seed(0)
h = (torch.randn(5, 2 * 1500) * 4).to(torch.bfloat16)   # beyond one block; clamps exercised
out = torch.empty(5, 1500, dtype=torch.float32)         # float32 out: the interpreter's own
n = out.numel()                                         # bf16 rounding is not the GPU's
G._glu[(G.triton.cdiv(n, G.BLOCK),)](h, out, n, {alpha}, {limit}, BLOCK=G.BLOCK)
gate = h[..., ::2].float().clamp(max={limit}); lin = h[..., 1::2].float().clamp({lo}, {limit})
ref = (lin + 1) * (gate * torch.sigmoid(gate * {alpha}))
print(float(((out - ref).abs() / ref.abs().clamp(min=1e-6)).max()))
"""


@pytest.mark.skipif(glu_kernel.triton is None, reason="needs Triton")
def test_the_kernels_math_in_the_interpreter():
    code = INTERPRETED.format(alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT, lo=-GPT_OSS_LIMIT)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-6


def test_used_only_on_cuda_and_switched_off_by_the_environment(monkeypatch):
    assert not glu_kernel.supported(torch.zeros(2, 8))  # the CPU keeps PyTorch's ops
    if torch.cuda.is_available():
        h = torch.zeros(2, 8, device="cuda", dtype=torch.bfloat16)
        assert glu_kernel.supported(h)
        assert not glu_kernel.supported(h[:, 1:7])  # not contiguous
        monkeypatch.setenv("MOE_CACHE_FUSED_GLU", "0")
        assert not glu_kernel.supported(h)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 7])
def test_on_the_gpu_it_is_the_float32_formula_rounded_once(rows):
    torch.manual_seed(1)
    h = (torch.randn(rows, 2 * 2880, device="cuda") * 4).to(torch.bfloat16)
    got = glu_kernel.gpt_oss_glu(h, GPT_OSS_ALPHA, GPT_OSS_LIMIT)
    want = reference(h)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 2880)
    # sigmoid's exp may differ in the last float32 bit from PyTorch's: at most one bf16 step
    step = want.abs().clamp(min=1e-30) * 2.0 ** -7
    assert ((got.float() - want).abs() <= step).all()
    assert (got == want.to(torch.bfloat16)).float().mean() > 0.99


@pytest.mark.gpu
def test_the_gpt_oss_expert_on_the_gpu_runs_the_fused_activation():
    torch.manual_seed(2)
    H, inter = 256, 128
    t = {"mlp1_weight": (torch.randn(2 * inter, H) * 0.05).to("cuda", torch.bfloat16),
         "mlp1_bias": torch.randn(2 * inter).to("cuda", torch.bfloat16),
         "mlp2_weight": (torch.randn(H, inter) * 0.05).to("cuda", torch.bfloat16),
         "mlp2_bias": torch.randn(H).to("cuda", torch.bfloat16)}
    x = torch.randn(3, H, device="cuda", dtype=torch.bfloat16)
    h = torch.nn.functional.linear(x, t["mlp1_weight"], t["mlp1_bias"])
    act = glu_kernel.gpt_oss_glu(h, GPT_OSS_ALPHA, GPT_OSS_LIMIT)
    want = torch.nn.functional.linear(act, t["mlp2_weight"], t["mlp2_bias"])
    assert torch.equal(expert_forward("gpt-oss", t, x), want)
