"""MXFP4 (OCP microscaling FP4) decode and encode, the same torch code on CPU and CUDA.

Layout as in GPT-OSS checkpoints: `blocks` U8 [..., G, 16] hold 32 FP4 E2M1 codes per
block, two per byte, LOW nibble first; `scales` U8 [..., G] hold one E8M0 exponent per
block. Value = fp4(code) * 2**(scale - 127). Output is bf16 [..., G*32].

Decoding is one gather from a table of every (scale, byte) pair: 256 x 256 x 2 bf16
values (256 KiB per device), so there is no multiply at all. Every product fp4 * 2**k
(k in -127..127) is exactly representable in bf16 (2 significant bits, bf16 keeps 8,
subnormals included) until it overflows at 2**128, so the table and the decode are exact.
Scale byte 255 (NaN in E8M0) decodes to NaN.
"""
from __future__ import annotations

import torch

# FP4 E2M1 values by code: sign bit 3, then 2 exponent bits, 1 mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Bound on the scratch one decode call allocates, in bytes of input blocks per chunk:
# the only temporary is an int32 table index per input byte (4 bytes), so 8 MiB of
# blocks costs 32 MiB of scratch at most, whatever the tensor size.
CHUNK_BYTES = 8 << 20

_tables: dict[torch.device, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    """bf16 [65536, 2]: row (scale << 8 | byte) = (low-nibble value, high-nibble value) * 2**(scale-127)."""
    t = _tables.get(device)
    if t is None:
        vals = torch.tensor(FP4_VALUES, dtype=torch.float64)
        b = torch.arange(256)
        pairs = torch.stack([vals[b & 15], vals[b >> 4]], dim=1)  # [256, 2], low nibble first as stored
        # float64 holds 2**-127 and every product exactly; the cast to bf16 is then exact too.
        pow2 = torch.tensor([2.0 ** (k - 127) for k in range(255)] + [float("nan")], dtype=torch.float64)
        t = (pow2[:, None, None] * pairs[None]).to(torch.bfloat16).reshape(65536, 2).to(device)
        _tables[device] = t
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

    Works chunk by chunk of rows, so temporaries stay below 4 * CHUNK_BYTES whatever
    the size, and never synchronises with the GPU.
    """
    _check(blocks, scales)
    *lead, g, _ = blocks.shape
    if out.dtype != torch.bfloat16 or tuple(out.shape) != (*lead, g * 32) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous bf16 tensor of shape {[*lead, g * 32]}, "
                         f"got {out.dtype} {list(out.shape)}")
    if out.device != blocks.device:
        raise ValueError(f"out on {out.device} but blocks on {blocks.device}")
    table = _table(blocks.device)
    rows = 1
    for d in lead:
        rows *= d
    b2 = blocks.reshape(rows, g, 16)
    s2 = scales.reshape(rows, g)
    o2 = out.view(rows, g * 16, 2)
    step = max(1, CHUNK_BYTES // max(1, g * 16))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        idx = (s2[r0:r1].int() << 8).unsqueeze(-1) + b2[r0:r1]  # [r, g, 16] int32
        torch.index_select(table, 0, idx.view(-1), out=o2[r0:r1].view(-1, 2))
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
