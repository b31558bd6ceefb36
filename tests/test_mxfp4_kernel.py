"""The MoE layer computed from stored MXFP4 bytes (pipeline/kernels/mxfp4_kernel.py): its math in
Triton's CPU interpreter and on the GPU against float64 maths on the decoded weights, its
refusals, and on the GPU a pipeline handing out stored experts against the resident reference."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.kernels import mxfp4_kernel
from pipeline.bench.mxfp4_tune import synthetic_experts
from pipeline.kernels.stored_math import dense_of

ROOT = Path(__file__).resolve().parents[1]


def reference(experts, h, w, norm: bool, residual: bool, round_x=None):
    """float64 maths on the exactly decoded weights. `round_x`: how the normalised input is
    rounded to bf16 (the GPU rounds to nearest; Triton's interpreter truncates)."""
    x = h.double()
    if norm:
        xf = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        x = (round_x or (lambda v: v.to(torch.bfloat16).float()))(xf).double()
    out = h.double() if residual else torch.zeros_like(h, dtype=torch.float64)
    for wi, t in zip(w.tolist(), experts):
        d = {k: v.double().cpu() for k, v in dense_of({k: v.cpu() for k, v in t.items()}).items()}
        a1 = x.cpu() @ d["mlp1_weight"].T + d["mlp1_bias"]
        gate, lin = a1[:, ::2].clamp(max=7), a1[:, 1::2].clamp(-7, 7)
        out = out + wi * (((lin + 1) * gate * torch.sigmoid(1.702 * gate)) @ d["mlp2_weight"].T + d["mlp2_bias"])
    return out


INTERPRETED = """
import torch
from pipeline.bench.mxfp4_tune import synthetic_experts
from tests.test_mxfp4_kernel import reference
from pipeline.kernels import mxfp4_kernel as K
truncate = lambda v: (v.view(torch.int32) & -65536).view(torch.float32)
worst = 0.0
cases = ((96, 64, 3, 2, True, True, 32), (64, 96, 1, 3, False, False, 16), (64, 64, 4, 1, True, True, None))
for H, inter, k, n, norm, res, step in cases:  # step 32 over 48 bytes a row: two steps, the second masked
    ex = synthetic_experts(H, inter, k, "cpu", seed=H + k)
    lay = K.Layout.of(ex[0])
    h = (torch.randn(n, H, generator=torch.Generator().manual_seed(k)) * 2).to(torch.bfloat16)
    w = torch.tensor([0.5, 0.25, 0.125, 0.125][:k])
    act = K.moe_up(lay, ex, h, 1e-6 if norm else None, block_j=8 if step else None, block_b=step)
    out = torch.empty(n, H, dtype=torch.float32)   # float32 out: the interpreter rounds bf16 its own way
    K.moe_down(lay, ex, act, w, out, residual=h if res else None, block_r=8 if step else None, block_b=step)
    want = reference(ex, h, w, norm, res, round_x=truncate)
    worst = max(worst, float(((out.double() - want).abs() / want.abs().clamp(min=1.0)).max()))
print(worst)
"""


@pytest.mark.skipif(mxfp4_kernel.triton is None, reason="needs Triton")
def test_the_kernels_math_in_the_interpreter():
    """Row tails (H/2 bytes not a multiple of the block), 1 to 4 experts, several rows, with
    and without the folded normalisation and the residual."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-5


def test_refuses_experts_it_cannot_address():
    ex = synthetic_experts(64, 64, 2, "cpu")
    lay = mxfp4_kernel.Layout.of(ex[0])
    stride = ex[1]["mlp1_weight.blocks"].data_ptr() - ex[0]["mlp1_weight.blocks"].data_ptr()
    askew = synthetic_experts(64, 64, 2, "cpu", stride=stride + 16)  # 16 bytes off the 256-byte grid
    moved = {r: v[1:] if v.dim() == 1 else v for r, v in ex[1].items()}  # mlp2_bias off its layout
    for bad in (askew, [ex[0], moved]):
        with pytest.raises(ValueError, match="256-byte aligned distances"):
            mxfp4_kernel._places(lay, bad)
    with pytest.raises(ValueError, match="1..8"):
        mxfp4_kernel._places(lay, ex * 5)
    with pytest.raises(ValueError, match="missing"):
        mxfp4_kernel.Layout.of({"mlp1_weight.blocks": ex[0]["mlp1_weight.blocks"]})
    assert mxfp4_kernel._places(lay, ex)[1][:2] == [0, (ex[1]["mlp1_weight.blocks"].data_ptr()
                                                        - ex[0]["mlp1_weight.blocks"].data_ptr()) // 256]


@pytest.mark.skipif(mxfp4_kernel.triton is None, reason="needs Triton")
def test_refuses_wrong_arguments_before_launching():
    """Every argument is checked on the host, so a wrong one is a ValueError, never a kernel
    reading out of bounds (these fire before any launch, so they run on the CPU)."""
    ex = synthetic_experts(64, 96, 2, "cpu")
    lay = mxfp4_kernel.Layout.of(ex[0])
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    act = torch.zeros(2, 1, 96)
    w = torch.ones(2)
    out = torch.zeros(1, 64)
    for msg, kw in (("x must be a contiguous bf16", dict(x=x.float())),
                    ("x must be a contiguous bf16", dict(x=torch.zeros(1, 32, dtype=torch.bfloat16))),
                    ("act must be a contiguous float32", dict(act=torch.zeros(2, 1, 95)))):
        with pytest.raises(ValueError, match=msg):
            mxfp4_kernel.moe_up(lay, ex, kw.get("x", x), act=kw.get("act", act))
    for msg, kw in (("act must be float32", dict(act=act.double())),
                    ("router weights must be 2", dict(w=torch.ones(1))),
                    ("out must be a contiguous", dict(out=torch.zeros(2, 64))),
                    ("residual must be a contiguous", dict(residual=torch.zeros(1, 32)))):
        with pytest.raises(ValueError, match=msg):
            mxfp4_kernel.moe_down(lay, ex, kw.get("act", act), kw.get("w", w), kw.get("out", out),
                                  residual=kw.get("residual"))


def test_used_only_on_cuda_and_switched_off_by_the_environment(monkeypatch):
    assert not mxfp4_kernel.supported(torch.device("cpu"))
    monkeypatch.setenv("MOE_CACHE_MXFP4_KERNEL", "0")
    assert not mxfp4_kernel.supported(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("H,inter,k,n", [(2880, 2880, 4, 1), (2880, 2880, 1, 5), (96, 64, 3, 2)])
def test_on_the_gpu_against_float64(H, inter, k, n):
    ex = synthetic_experts(H, inter, k, "cuda", seed=k)
    lay = mxfp4_kernel.Layout.of(ex[0])
    h = (torch.randn(n, H, generator=torch.Generator().manual_seed(n)) * 2).to("cuda", torch.bfloat16)
    w = torch.tensor([0.4, 0.3, 0.2, 0.1][:k], device="cuda")
    act = mxfp4_kernel.moe_up(lay, ex, h, 1e-6)
    out = mxfp4_kernel.moe_down(lay, ex, act, w, torch.empty(n, H, device="cuda", dtype=torch.float32), residual=h)
    want = reference(ex, h.cpu(), w.cpu(), True, True)
    # float32 sums of H products and a norm whose rounding may differ by one bf16 step
    assert float(((out.cpu().double() - want).abs() / want.abs().clamp(min=1.0)).max()) < 2e-2
    again = mxfp4_kernel.moe_down(lay, ex, mxfp4_kernel.moe_up(lay, ex, h, 1e-6), w, torch.empty_like(out),
                                  residual=h)
    assert torch.equal(out, again)  # one fixed order of sums: the same bits every time


@pytest.mark.gpu
@pytest.mark.parametrize("per_expert_waits", [False, True])
def test_on_the_gpu_a_pipeline_of_stored_experts_equals_the_resident_reference(tmp_path, per_expert_waits):
    from adapters.store import StoreCheckpoint
    from pipeline.bench.replay import Model, build_passes, direct_fetch, run_loop
    from policies.synthetic import SyntheticConfig, generate
    from policies.traces import load_trace, save_trace
    from tests.helpers_pipeline import build_tiny_store, run_ours_on_stored_experts

    store_dir = build_tiny_store(tmp_path, "mxfp4")
    store = StoreCheckpoint(store_dir)
    spec = store.spec
    save_trace(generate(SyntheticConfig(layers=spec.num_layers, experts=spec.num_experts, top_k=spec.top_k,
                                        requests=1, prompt_tokens=3, decode_tokens=10, seed=1)), tmp_path / "t.npz")
    passes = build_passes(load_trace(tmp_path / "t.npz"), include_prefill=True, limit=8)
    dev = torch.device("cuda")
    model = Model(spec, dev, seed=3)
    ref = run_loop(model, passes, direct_fetch(store, dev, stored=True), keep_outputs=True).outputs
    run = run_ours_on_stored_experts(store_dir, store, passes, model, "cuda", per_expert_waits)
    assert run.after.vram_misses > 0
    for a, b in zip(ref, run.loop.outputs, strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_the_tuning_tool_says_it_needs_a_gpu(capsys):
    from pipeline.bench.mxfp4_tune import main

    assert main([]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["--hidden", "48"], ["--inter", "40"], ["--top-k", str(mxfp4_kernel.MAX_EXPERTS + 1)],
                                  ["--top-k", "0"]])
def test_the_tuning_tool_refuses_dims_its_kernels_cannot_take(capsys, argv):
    from pipeline.bench.mxfp4_tune import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"dims must be multiples of 32 and top-k 1..{mxfp4_kernel.MAX_EXPERTS}" in err
    assert len(err.strip().splitlines()) == 1
