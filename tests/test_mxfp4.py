"""MXFP4 decode is bit-exact against an independent per-element reference, on CPU and CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.mxfp4 import mxfp4_decode, mxfp4_decode_into, mxfp4_encode
from tests.helpers_models import ref_mxfp4_decode


def _random_case(rng: np.random.Generator, rows: int, g: int, lo: int, hi: int):
    blocks = rng.integers(0, 256, size=(rows, g, 16), dtype=np.uint8)
    scales = rng.integers(lo, hi + 1, size=(rows, g), dtype=np.uint8)
    return blocks, scales


def _all_bytes_case():
    # Every byte value under the extreme scales that keep every code finite in bf16:
    # 0 (2**-127, subnormal results) and 252 (6 * 2**125 < 2**128); bf16 overflows at 2**128.
    blocks = np.arange(256, dtype=np.uint8).reshape(16, 1, 16).repeat(4, axis=1)  # [16, 4, 16]
    scales = np.array([[0, 1, 127, 252]] * 16, dtype=np.uint8)
    return blocks, scales


def _top_scale_case():
    # Scales 253 and 254 stay finite only for |fp4| <= 1.5 (codes 0-3 and 8-11) resp. < 2.
    small = np.array([c for c in range(16) if c & 7 <= 3], dtype=np.uint8)
    pairs = (small[:, None] | (small[None, :] << 4)).reshape(-1)  # all 64 bytes of small codes
    blocks = pairs.reshape(2, 2, 16)
    scales = np.array([[253, 254], [254, 253]], dtype=np.uint8)
    return blocks, scales


def _check(device: str):
    rng = np.random.default_rng(1234)
    cases = [_all_bytes_case(), _top_scale_case(), _random_case(rng, 7, 3, 0, 252), _random_case(rng, 5, 2, 110, 140)]
    for blocks, scales in cases:
        want = ref_mxfp4_decode(blocks, scales)
        got = mxfp4_decode(torch.from_numpy(blocks).to(device), torch.from_numpy(scales).to(device))
        assert got.dtype == torch.bfloat16 and got.device.type == device
        assert torch.isfinite(want.float()).all()
        # torch.equal treats +0 and -0 as equal, so compare the bit patterns.
        assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


def test_decode_bit_exact_cpu():
    _check("cpu")


@pytest.mark.gpu
def test_decode_bit_exact_cuda():
    _check("cuda")


def test_decode_into_chunks_and_leading_dims(monkeypatch):
    import adapters.mxfp4 as mx

    # A chunk smaller than one tensor forces the multi-chunk path (rows of 2 blocks = 32 bytes).
    monkeypatch.setattr(mx, "CHUNK_BYTES", 64)
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, size=(3, 5, 2, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, size=(3, 5, 2), dtype=np.uint8)
    out = torch.full((3, 5, 64), 99.0, dtype=torch.bfloat16)
    ret = mxfp4_decode_into(out, torch.from_numpy(blocks), torch.from_numpy(scales))
    assert ret is out
    assert torch.equal(out.view(torch.int16), ref_mxfp4_decode(blocks, scales).view(torch.int16))


def test_scale_255_is_nan():
    got = mxfp4_decode(torch.full((1, 1, 16), 0x22, dtype=torch.uint8), torch.tensor([[255]], dtype=torch.uint8))
    assert torch.isnan(got.float()).all()


@pytest.mark.parametrize("bad", [
    lambda: mxfp4_decode(torch.zeros(2, 15, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8)),
    lambda: mxfp4_decode(torch.zeros(2, 1, 16, dtype=torch.uint8), torch.zeros(3, 1, dtype=torch.uint8)),
    lambda: mxfp4_decode(torch.zeros(2, 1, 16, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.uint8)),
    lambda: mxfp4_decode_into(torch.empty(2, 31, dtype=torch.bfloat16), torch.zeros(2, 1, 16, dtype=torch.uint8),
                              torch.zeros(2, 1, dtype=torch.uint8)),
    lambda: mxfp4_decode_into(torch.empty(2, 32, dtype=torch.float32), torch.zeros(2, 1, 16, dtype=torch.uint8),
                              torch.zeros(2, 1, dtype=torch.uint8)),
])
def test_bad_shapes_and_dtypes_raise(bad):
    with pytest.raises(ValueError):
        bad()


def test_encode_round_trip():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 128, generator=g) * torch.logspace(-6, 2, 16).unsqueeze(1)
    x[3] = 0.0  # an all-zero row: zero blocks must round-trip to zero
    blocks, scales = mxfp4_encode(x)
    assert blocks.shape == (16, 4, 16) and scales.shape == (16, 4)
    y = mxfp4_decode(blocks, scales).float()
    assert torch.equal(y[3], torch.zeros(128))
    # Per block the error is at most half the widest FP4 step (2 between 4 and 6) times the scale.
    step = torch.ldexp(torch.ones(16, 4), scales.int() - 127).repeat_interleave(32, dim=1)
    assert ((y - x).abs() <= step * 1.0 + 1e-30).all()
    # Values that are exactly FP4 * 2**k come back unchanged.
    exact = torch.tensor([0.5, -1.5, 6.0, -4.0] * 8).reshape(1, 32) * 2.0**-3
    assert torch.equal(mxfp4_decode(*mxfp4_encode(exact)).float(), exact)


def test_encode_rejects_non_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4_encode(torch.zeros(2, 48))
