"""Time the MXFP4 expert kernels (pipeline/kernels/mxfp4_kernel.py) on this GPU, block sizes swept.

    python -m pipeline.bench.mxfp4_tune [--hidden 2880] [--inter 2880] [--top-k 4]

One decode layer (one row, top_k experts of random stored bytes at GPT-OSS-20B's dims by
default): each kernel is timed alone for every (block, bytes per step, warps) in the sweep,
then the fastest pair for the whole layer, with the host's time per layer. The last line is
MOE_CACHE_MXFP4_TUNE=... to run the replay with that pair; mxfp4_kernel.UP / DOWN hold the
pair measured on an H100 (docs/results). CUDA only.

    synthetic_experts(H, I, k, device, seed=0) -> [stored tensors]   k experts in one buffer
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import torch

from ..kernels import mxfp4_kernel as K


def synthetic_experts(H: int, inter: int, k: int, device, seed: int = 0, stride: int = 0):
    """k GPT-OSS experts' stored tensors as views of one buffer, `stride` bytes apart (default:
    the smallest multiple of 256 that holds one), each laid out mlp1 blocks, scales, bias, then mlp2's."""
    g = torch.Generator().manual_seed(seed)
    shapes = [("mlp1_weight.blocks", (2 * inter, H // 32, 16), torch.uint8),
              ("mlp1_weight.scales", (2 * inter, H // 32), torch.uint8), ("mlp1_bias", (2 * inter,), torch.bfloat16),
              ("mlp2_weight.blocks", (H, inter // 32, 16), torch.uint8),
              ("mlp2_weight.scales", (H, inter // 32), torch.uint8), ("mlp2_bias", (H,), torch.bfloat16)]
    places, pos = [], 0  # (role, offset, nbytes, shape, dtype), each tensor 16-byte aligned
    for role, shape, dtype in shapes:
        nbytes = dtype.itemsize * math.prod(shape)
        places.append((role, pos, nbytes, shape, dtype))
        pos = -(-(pos + nbytes) // 16) * 16
    stride = stride or -(-pos // 256) * 256
    buf = torch.zeros(k * stride, dtype=torch.uint8)
    for e in range(k):  # random bytes, filled on the CPU (seeded), then moved once
        for role, off, nbytes, _, _ in places:
            view = buf[e * stride + off: e * stride + off + nbytes]
            if role.endswith(".blocks"):
                view.copy_(torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8))
            elif role.endswith(".scales"):  # 2**-6 .. 2**-2: sums of H products stay moderate
                view.copy_(torch.randint(121, 126, (nbytes,), generator=g, dtype=torch.uint8))
            else:
                view.view(torch.bfloat16).copy_(torch.randn(nbytes // 2, generator=g).to(torch.bfloat16))
    buf = buf.to(device)
    return [{role: buf[e * stride + off: e * stride + off + nbytes].view(dtype).view(shape)
             for role, off, nbytes, shape, dtype in places} for e in range(k)]


def _time_us(f, reps: int = 200) -> float:
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        f()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.mxfp4_tune", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2880)
    p.add_argument("--inter", type=int, default=2880)
    p.add_argument("--top-k", type=int, default=4)
    args = p.parse_args(argv)
    if args.hidden % 32 or args.inter % 32 or not 1 <= args.top_k <= K.MAX_EXPERTS:  # before the GPU: anywhere
        print(f"mxfp4_tune: dims must be multiples of 32 and top-k 1..{K.MAX_EXPERTS}", file=sys.stderr)
        return 2
    if not K.supported(torch.device("cuda")) or not torch.cuda.is_available():
        print("mxfp4_tune: needs a CUDA device with Triton", file=sys.stderr)
        return 2
    H, inter, k = args.hidden, args.inter, args.top_k
    ex = synthetic_experts(H, inter, k, "cuda")
    lay = K.Layout.of(ex[0])
    h = torch.randn(1, H, device="cuda").to(torch.bfloat16)
    w = torch.full((k,), 1.0 / k, device="cuda")
    out = torch.empty_like(h)
    act = K.moe_up(lay, ex, h, 1e-6)
    res: dict[str, list] = {"up": [], "down": []}
    for blk, step, warps in itertools.product((8, 16, 32), (64, 128, 256), (4, 8)):
        res["up"].append((_time_us(lambda: K.moe_up(lay, ex, h, 1e-6, block_j=blk, block_b=step, num_warps=warps,
                                                     act=act)), blk, step, warps))
        res["down"].append((_time_us(lambda: K.moe_down(lay, ex, act, w, out, residual=h, block_r=blk, block_b=step,
                                                         num_warps=warps)), blk, step, warps))
    for name, rows in res.items():
        rows.sort()
        print(name, " ".join(f"{us:.1f}us@{b},{s},{nw}" for us, b, s, nw in rows[:6]))
    up, down = res["up"][0][1:], res["down"][0][1:]
    K.UP, K.DOWN = up, down
    t0 = time.perf_counter()
    for _ in range(200):
        K.moe_layer(lay, ex, h, w, out, 1e-6, act=act)
    host = (time.perf_counter() - t0) / 200 * 1e6
    torch.cuda.synchronize()
    gpu = _time_us(lambda: K.moe_layer(lay, ex, h, w, out, 1e-6, act=act))
    nbytes = sum(t.numel() * t.element_size() for e in ex for t in e.values())
    print(f"best layer: {gpu:.1f} us GPU ({nbytes / gpu / 1e3:.0f} GB/s of stored bytes), host {host:.1f} us per layer")
    print(f"MOE_CACHE_MXFP4_TUNE={up[0]},{up[1]},{up[2]},{down[0]},{down[1]},{down[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
