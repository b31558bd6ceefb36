"""MXFP4 (OCP microscaling FP4) decode and encode, the same torch code on CPU and CUDA.

Layout as in GPT-OSS checkpoints: `blocks` U8 [..., G, 16] hold 32 FP4 E2M1 codes per
block, two per byte, LOW nibble first; `scales` U8 [..., G] hold one E8M0 exponent per
block. Value = fp4(code) * 2**(scale - 127). Output is bf16 [..., G*32].

Every product fp4 * 2**k (k in -127..127) is exactly representable in bf16 (2 mantissa
bits, bf16 keeps 7, subnormals included) until it overflows above ~2**128, so the decode
is exact: the multiply happens in bf16 on exactly representable operands. Scale byte 255
(NaN in E8M0) decodes to NaN.
"""
from __future__ import annotations

import torch

# FP4 E2M1 values by code: sign bit 3, then 2 exponent bits, 1 mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Bound on the scratch one decode call allocates, in bytes of input blocks per chunk.
# Scratch per input byte is ~10 bytes (int32 index + 2 bf16 values + slack), so 8 MiB of
# blocks costs ~80 MiB of temporaries at most, whatever the tensor size.
CHUNK_BYTES = 8 << 20

_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _luts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte -> [low value, high value] bf16 [256, 2], scale byte -> 2**(s-127) bf16 [256]) on `device`."""
    t = _tables.get(device)
    if t is None:
        pairs = [(FP4_VALUES[b & 0xF], FP4_VALUES[b >> 4]) for b in range(256)]
        byte_lut = torch.tensor(pairs, dtype=torch.bfloat16, device=device)
        # Python floats hold 2**-127 exactly; bf16 keeps it as a subnormal.
        pow2 = torch.tensor([2.0 ** (s - 127) for s in range(255)] + [float("nan")],
                            dtype=torch.float32).to(torch.bfloat16).to(device)
        t = _tables[device] = (byte_lut, pow2)
    return t


def _check(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} must be [..., G, 16] with scales [..., G], "
                         f"got scales {list(scales.shape)}")
    if blocks.device != scales.device:
        raise ValueError(f"MXFP4 blocks on {blocks.device} but scales on {scales.device}")


def mxfp4_decode_into(out: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Decode into a preallocated contiguous bf16 `out` [..., G*32] on the blocks' device; returns `out`.

    Works chunk by chunk of rows, so temporaries stay below ~10 * CHUNK_BYTES whatever
    the size, and never synchronises with the GPU.
    """
    _check(blocks, scales)
    *lead, g, _ = blocks.shape
    if out.dtype != torch.bfloat16 or tuple(out.shape) != (*lead, g * 32) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous bf16 tensor of shape {[*lead, g * 32]}, "
                         f"got {out.dtype} {list(out.shape)}")
    if out.device != blocks.device:
        raise ValueError(f"out on {out.device} but blocks on {blocks.device}")
    byte_lut, pow2 = _luts(blocks.device)
    rows = 1
    for d in lead:
        rows *= d
    b2 = blocks.reshape(rows, g, 16)
    s2 = scales.reshape(rows, g)
    o2 = out.view(rows, g, 32)
    step = max(1, CHUNK_BYTES // max(1, g * 16))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        vals = byte_lut[b2[r0:r1].int()]  # [r, g, 16, 2]: low nibble first, as stored
        scale = pow2[s2[r0:r1].int()].unsqueeze(-1)  # [r, g, 1]
        torch.mul(vals.view(r1 - r0, g, 32), scale, out=o2[r0:r1])
    return out


def mxfp4_decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks U8 [..., G, 16] + scales U8 [..., G] -> new bf16 [..., G*32] on the same device."""
    _check(blocks, scales)
    out = torch.empty((*blocks.shape[:-2], blocks.shape[-2] * 32), dtype=torch.bfloat16, device=blocks.device)
    return mxfp4_decode_into(out, blocks, scales)


# Midpoints between consecutive FP4 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6: bucketize gives the
# nearest magnitude's code (ties go to the lower magnitude).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def mxfp4_encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x [..., K] (K a multiple of 32) to MXFP4 (blocks U8 [..., K/32, 16], scales U8 [..., K/32]).

    Per 32-value block the scale is the smallest power of two that brings max|x| within
    6 (the largest FP4 magnitude); each value is rounded to the nearest FP4 value.
    """
    if x.shape[-1] % 32:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of 32, got {list(x.shape)}")
    *lead, k = x.shape
    g = k // 32
    xb = x.reshape(*lead, g, 32).float()
    amax = xb.abs().amax(dim=-1)
    # exponent e with amax / 2**e <= 6; zero blocks get e = 0 (scale 127).
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax))
    e = e.clamp(-127, 127)
    q = xb * torch.exp2(-e).unsqueeze(-1)  # exact: a power-of-two scaling
    mids = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=x.device)
    mag = torch.bucketize(q.abs().clamp(max=6.0), mids).to(torch.uint8)
    codes = mag | (torch.signbit(q).to(torch.uint8) << 3)
    codes = codes.view(*lead, g, 16, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    scales = (e + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
