"""A GPT-OSS MoE layer computed straight from experts' stored MXFP4 bytes: two Triton kernels.

    supported(device) -> bool                  CUDA, Triton present, not switched off
    Layout.of(tensors) -> Layout                where an expert's stored tensors sit, relative
                                                to its mlp1 blocks (the same for every expert
                                                of a store)
    moe_up(layout, experts, x, norm_eps=None, act=None) -> act   [k, n, I] float32: each
                                                expert's gated activation of x [n, H] (bf16), into
                                                `act` when given; with norm_eps, x is first
                                                RMS-normalised in the kernel
    moe_down(layout, experts, act, w, out, residual=None) -> out
                                                out [n, H] = residual + sum_e w[e] (mlp2_e act_e
                                                + bias_e), accumulated in float32, rounded once
                                                to out's dtype
    moe_layer(layout, experts, h, w, out, norm_eps, act=None) -> out    both, for a decode layer

`experts` are dicts of stored tensors (`mlp1_weight.blocks` U8 [2I, H/32, 16],
`mlp1_weight.scales` U8 [2I, H/32], `mlp1_bias` BF16 [2I], the same for mlp2): what
`ExpertPipeline.fetch` hands out with vram_form="stored", vram_views=0.

Why: with the stored form, the decode at use writes a 50 MB dense copy of each expert per use
(GPT-OSS-20B dims) and the matmuls read it again, where these kernels read the 13 MB of stored
bytes once. FP4 codes and E8M0 scales are expanded in registers by bit operations (exact in
float32), the products summed in float32.

How the experts are addressed: the experts of one launch must sit at 256-byte aligned distances
from each other, as in one allocation (the pipeline's VRAM arena, or a resident copy of the
store laid out the same way); anything else is refused with a ValueError. The
kernels take one base pointer and each expert's place as a 32-bit count of 256-byte units from
it, plain integers (up to MAX_EXPERTS of them), so a launch needs no upload of addresses and
Triton's launcher can be called directly (pipeline.triton_launch.FixedLaunch): one per
combination of pointer alignments, since Triton specialises on them.

Bits: each output element is one fixed reduction order on the GPU, so a pipeline and a
resident reference computing with these kernels agree bit for bit; they are not the bits of
the dense path (decode to bf16, cuBLAS), which rounds between ops.
MOE_CACHE_MXFP4_KERNEL=0 in the environment switches this path off (the CPU's path is used:
decode each expert, then the dense math).
"""
from __future__ import annotations

import dataclasses
import os

import torch

from ..triton_launch import FixedLaunch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU builds without Triton
    triton = None

MAX_EXPERTS = 8  # experts per launch: a layer's top-k (GPT-OSS: 4)
UNIT = 256  # experts' places are counted in these bytes (the VRAM arena's slot alignment)
BLOCK_H = 1024
# (block of outputs, stored bytes per step, warps) of each kernel, the fastest of 18 each in a
# sweep on an H100 at GPT-OSS-20B dims, k=4, one row (pipeline/bench/mxfp4_tune.py: up 27.0
# us, down 22.2 us per layer; blocks of 16 x 128 gave 32.2 and 28.5).
# MOE_CACHE_MXFP4_TUNE="J,B,W,R,B,W" overrides them (tuning runs).
UP, DOWN = (32, 256, 4), (16, 256, 4)
if os.environ.get("MOE_CACHE_MXFP4_TUNE"):
    _t = [int(v) for v in os.environ["MOE_CACHE_MXFP4_TUNE"].split(",")]
    UP, DOWN = tuple(_t[:3]), tuple(_t[3:6])
ROLES = ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp1_bias",
         "mlp2_weight.blocks", "mlp2_weight.scales", "mlp2_bias")

if triton is not None:
    X_SHIFT = tl.constexpr(2.0 ** 100)  # inputs are scaled by this before meeting the FP4 bits (_fp4_lo)

    @triton.jit
    def _fp4_lo(b):
        # The low nibble's E2M1 code as float32 bits: sign to bit 31, exponent and mantissa bits
        # to 24..22. That float is the FP4 value times 2**-126 exactly (codes with exponent 0
        # become subnormals, the rest normals), so no select is needed; the 2**126 comes back
        # through X_SHIFT and _scale. Subnormals are kept: Triton's float32 math is not FTZ.
        return (((b & 7) << 22) | ((b & 8) << 28)).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp4_hi(b):
        return ((((b >> 4) & 7) << 22) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)

    @triton.jit
    def _scale(s):
        # E8M0 byte s -> 2**(s - 101): the block's 2**(s - 127) times the 2**26 that
        # 2**-126 (the nibbles) * 2**100 (X_SHIFT on the inputs) leave out. s = 255 (NaN in
        # E8M0) is not a scale a checkpoint carries.
        return ((s + 26) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _pick(e, u0, u1, u2, u3, u4, u5, u6, u7):
        u = tl.where(e == 0, u0, tl.where(e == 1, u1, tl.where(e == 2, u2, tl.where(e == 3, u3, u4))))
        u = tl.where(e == 5, u5, tl.where(e == 6, u6, tl.where(e == 7, u7, u)))
        return u.to(tl.int64) * 256

    @triton.jit
    def _dot_rows(w, rows, x_even, x_odd, kb, mask_rows, D_SC: tl.constexpr, IN: tl.constexpr,
                  BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
        # sum over BLOCK_B stored bytes (2 * BLOCK_B inputs) of `rows`: each 16-byte block's
        # products summed first, then times its scale (one scale load per block, not per byte)
        INB: tl.constexpr = IN // 2
        G: tl.constexpr = IN // 32
        kk = kb + tl.arange(0, BLOCK_B)
        gi = kb // 16 + tl.arange(0, BLOCK_B // 16)
        b = tl.load(w + rows[:, None] * INB + kk[None, :], mask=mask_rows[:, None] & (kk < INB)[None, :],
                    other=0).to(tl.int32)
        p = _fp4_lo(b) * x_even[None, :] + _fp4_hi(b) * x_odd[None, :]
        blocks = tl.sum(tl.reshape(p, (BLOCK, BLOCK_B // 16, 16)), axis=2)
        s = tl.load(w + D_SC + rows[:, None] * G + gi[None, :], mask=mask_rows[:, None] & (gi < G)[None, :],
                    other=0).to(tl.int32)
        return tl.sum(blocks * _scale(s), axis=1)

    @triton.jit(do_not_specialize=["n", "u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7"])
    def _up(base, x_ptr, act_ptr, n, u0, u1, u2, u3, u4, u5, u6, u7, eps,
            H: tl.constexpr, I: tl.constexpr, D_SC: tl.constexpr, D_B: tl.constexpr, NORM: tl.constexpr,
            BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
        e = tl.program_id(1)
        m = tl.program_id(2)
        w = base + _pick(e, u0, u1, u2, u3, u4, u5, u6, u7)
        j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
        jm = j < I
        HB: tl.constexpr = H // 2
        xrow = x_ptr + m * H
        r = 1.0
        if NORM:
            ss = tl.zeros([BLOCK_H], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_H):
                k = k0 + tl.arange(0, BLOCK_H)
                v = tl.load(xrow + k, mask=k < H, other=0.0).to(tl.float32)
                ss += v * v
            r = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / H + eps)
        accg = tl.zeros([BLOCK_J], dtype=tl.float32)
        accl = tl.zeros([BLOCK_J], dtype=tl.float32)
        for kb in range(0, HB, BLOCK_B):
            kk = kb + tl.arange(0, BLOCK_B)
            km = kk < HB
            xe = tl.load(xrow + 2 * kk, mask=km, other=0.0).to(tl.float32)
            xo = tl.load(xrow + 2 * kk + 1, mask=km, other=0.0).to(tl.float32)
            if NORM:  # the normalised input, rounded to bf16 as a model's norm would hand it on
                xe = (xe * r).to(tl.bfloat16).to(tl.float32)
                xo = (xo * r).to(tl.bfloat16).to(tl.float32)
            xe = xe * X_SHIFT
            xo = xo * X_SHIFT
            accg += _dot_rows(w, 2 * j, xe, xo, kb, jm, D_SC, H, BLOCK_J, BLOCK_B)  # gate rows
            accl += _dot_rows(w, 2 * j + 1, xe, xo, kb, jm, D_SC, H, BLOCK_J, BLOCK_B)  # linear rows
        bias = (w + D_B).to(tl.pointer_type(tl.bfloat16))
        gate = tl.minimum(accg + tl.load(bias + 2 * j, mask=jm, other=0.0).to(tl.float32), 7.0)
        lin = accl + tl.load(bias + 2 * j + 1, mask=jm, other=0.0).to(tl.float32)
        lin = tl.minimum(tl.maximum(lin, -7.0), 7.0)
        a = (lin + 1.0) * (gate * tl.sigmoid(gate * 1.702))
        tl.store(act_ptr + (e * n + m) * I + j, a, mask=jm)

    @triton.jit(do_not_specialize=["n", "u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7"])
    def _down(base, act_ptr, w_ptr, res_ptr, out_ptr, n, u0, u1, u2, u3, u4, u5, u6, u7,
              H: tl.constexpr, I: tl.constexpr, D_BL: tl.constexpr, D_SC: tl.constexpr, D_B: tl.constexpr,
              K: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
        m = tl.program_id(1)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = r < H
        IB: tl.constexpr = I // 2
        out = tl.zeros([BLOCK_R], dtype=tl.float32)
        for e in tl.static_range(K):  # router order: the sum's order is fixed
            w = base + _pick(e, u0, u1, u2, u3, u4, u5, u6, u7)
            arow = act_ptr + (e * n + m) * I
            acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for kb in range(0, IB, BLOCK_B):
                kk = kb + tl.arange(0, BLOCK_B)
                km = kk < IB
                ae = tl.load(arow + 2 * kk, mask=km, other=0.0) * X_SHIFT
                ao = tl.load(arow + 2 * kk + 1, mask=km, other=0.0) * X_SHIFT
                acc += _dot_rows(w + D_BL, r, ae, ao, kb, rm, D_SC - D_BL, I, BLOCK_R, BLOCK_B)
            bias = (w + D_B).to(tl.pointer_type(tl.bfloat16))
            acc += tl.load(bias + r, mask=rm, other=0.0).to(tl.float32)
            out += tl.load(w_ptr + e) * acc
        if HAS_RES:
            out += tl.load(res_ptr + m * H + r, mask=rm, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * H + r, out.to(out_ptr.dtype.element_ty), mask=rm)


def supported(device: torch.device) -> bool:
    return (triton is not None and torch.device(device).type == "cuda"
            and os.environ.get("MOE_CACHE_MXFP4_KERNEL", "1") != "0")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Byte offsets of an expert's stored tensors from its mlp1 blocks, and the dims."""

    hidden: int
    inter: int
    d_scales1: int
    d_bias1: int
    d_blocks2: int
    d_scales2: int
    d_bias2: int

    @classmethod
    def of(cls, t: dict[str, torch.Tensor]) -> "Layout":
        try:
            b1 = t["mlp1_weight.blocks"]
            p = b1.data_ptr()
            key = (b1.shape[0], b1.shape[1]) + tuple(t[r].data_ptr() - p for r in ROLES[1:])
        except KeyError:
            missing = [r for r in ROLES if r not in t]
            raise ValueError(f"MXFP4 expert kernel: stored tensors {missing} missing; it takes a GPT-OSS "
                             f"expert's stored tensors ({', '.join(ROLES)})") from None
        lay = _layouts.get(key)  # once per store: a decode layer asks for it every time
        if lay is None:
            two_i, g, *deltas = key
            lay = _layouts[key] = cls(g * 32, two_i // 2, *deltas)
        return lay


_layouts: dict[tuple, Layout] = {}


def _places(layout: Layout, experts) -> tuple[torch.Tensor, list[int]]:
    """The base tensor (the experts' lowest mlp1 blocks) and each expert's place from it in UNITs."""
    if not 1 <= len(experts) <= MAX_EXPERTS:
        raise ValueError(f"MXFP4 expert kernel: {len(experts)} experts in one launch; 1..{MAX_EXPERTS}")
    blocks = [t["mlp1_weight.blocks"] for t in experts]
    ptrs = [b.data_ptr() for b in blocks]
    low = min(range(len(ptrs)), key=ptrs.__getitem__)
    places = []
    for t, p in zip(experts, ptrs):
        d = p - ptrs[low]
        if d % UNIT or d // UNIT >= 2 ** 31 or t["mlp2_bias"].data_ptr() - p != layout.d_bias2:
            raise ValueError(f"MXFP4 expert kernel: the experts of one launch must sit at {UNIT}-byte aligned "
                             "distances from each other, with one layout, as in one allocation (a VRAM arena, "
                             "or a resident copy made by pipeline.bench.replay.direct_fetch(..., stored=True))")
        places.append(d // UNIT)
    return blocks[low], places + [0] * (MAX_EXPERTS - len(places))


_launches: dict[tuple, FixedLaunch] = {}


def _launcher(key: tuple, make_consts, tensors, device: torch.device, num_warps: int) -> FixedLaunch:
    # Triton specialises pointers on 16-byte alignment: one compiled kernel per combination.
    # The key is built from plain values on every launch; the constexpr dict only on a miss.
    key = key + (device, num_warps) + tuple([t.data_ptr() % 16 == 0 for t in tensors])
    launch = _launches.get(key)
    if launch is None:
        kernel, consts = make_consts()
        launch = _launches[key] = FixedLaunch(kernel, consts, {"num_warps": num_warps}, device=device)
    return launch


def moe_up(layout: Layout, experts, x: torch.Tensor, norm_eps: float | None = None, *,
           block_j: int | None = None, block_b: int | None = None, num_warps: int | None = None,
           act: torch.Tensor | None = None, placed: tuple | None = None) -> torch.Tensor:
    block_j, block_b, num_warps = block_j or UP[0], block_b or UP[1], num_warps or UP[2]
    base, places = placed or _places(layout, experts)
    n, H, inter = x.shape[0], layout.hidden, layout.inter
    if x.shape != (n, H) or x.dtype != torch.bfloat16 or not x.is_contiguous():
        raise ValueError(f"MXFP4 expert kernel: x must be a contiguous bf16 [n, {H}], got {x.dtype} {list(x.shape)}")
    if act is None:
        act = torch.empty(len(experts), n, inter, device=x.device, dtype=torch.float32)
    elif tuple(act.shape) != (len(experts), n, inter) or act.dtype != torch.float32 or not act.is_contiguous():
        raise ValueError(f"MXFP4 expert kernel: act must be a contiguous float32 [{len(experts)}, {n}, {inter}]")
    norm = norm_eps is not None
    launch = _launcher(("up", layout, norm, block_j, block_b), lambda: (_up, {
        "H": H, "I": inter, "D_SC": layout.d_scales1, "D_B": layout.d_bias1, "NORM": norm,
        "BLOCK_J": block_j, "BLOCK_B": block_b, "BLOCK_H": BLOCK_H}), (base, x, act), x.device, num_warps)
    launch.launch((triton.cdiv(inter, block_j), len(experts), n), base, x, act, n, *places,
                  float(norm_eps or 0.0))
    return act


def moe_down(layout: Layout, experts, act: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
             residual: torch.Tensor | None = None, *, block_r: int | None = None, block_b: int | None = None,
             num_warps: int | None = None, placed: tuple | None = None) -> torch.Tensor:
    block_r, block_b, num_warps = block_r or DOWN[0], block_b or DOWN[1], num_warps or DOWN[2]
    base, places = placed or _places(layout, experts)
    k, n = len(experts), act.shape[1]
    H = layout.hidden
    if tuple(act.shape) != (k, n, layout.inter) or act.dtype != torch.float32:
        raise ValueError(f"MXFP4 expert kernel: act must be float32 [{k}, n, {layout.inter}], got {list(act.shape)}")
    if w.dtype != torch.float32 or w.numel() < k or not w.is_contiguous():
        raise ValueError(f"MXFP4 expert kernel: router weights must be {k} contiguous float32 values")
    if tuple(out.shape) != (n, H) or not out.is_contiguous():
        raise ValueError(f"MXFP4 expert kernel: out must be a contiguous [{n}, {H}], got {list(out.shape)}")
    if residual is not None and (tuple(residual.shape) != (n, H) or not residual.is_contiguous()):
        raise ValueError(f"MXFP4 expert kernel: residual must be a contiguous [{n}, {H}]")
    has_res = residual is not None
    res = residual if has_res else out  # not read without HAS_RES
    launch = _launcher(("down", layout, k, has_res, block_r, block_b, out.dtype), lambda: (_down, {
        "H": H, "I": layout.inter, "D_BL": layout.d_blocks2, "D_SC": layout.d_scales2, "D_B": layout.d_bias2,
        "K": k, "HAS_RES": has_res, "BLOCK_R": block_r, "BLOCK_B": block_b}), (base, act, w, res, out), out.device,
        num_warps)
    launch.launch((triton.cdiv(H, block_r), n), base, act, w, res, out, n, *places)
    return out


def moe_layer(layout: Layout, experts, h: torch.Tensor, w: torch.Tensor, out: torch.Tensor, norm_eps: float,
              act: torch.Tensor | None = None) -> torch.Tensor:
    """A decode layer: out = h + sum_e w[e] expert_e(norm(h)), the experts placed once for both
    kernels (the decode thread pays for every microsecond here, 24 times a token)."""
    placed = _places(layout, experts)
    act = moe_up(layout, experts, h, norm_eps, act=act, placed=placed)
    return moe_down(layout, experts, act, w, out, residual=h, placed=placed)


__all__ = ["Layout", "MAX_EXPERTS", "moe_down", "moe_layer", "moe_up", "supported"]
