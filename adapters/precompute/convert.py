"""From a source checkpoint's expert to the store's bytes, and what the store must decode to.

Bit-exact contract: a bf16/fp16 store holds `source.load_expert(l, e)` cast to that dtype;
an mxfp4 store holds the source's MXFP4 blocks, scales and biases byte for byte, so its
decode equals the source's decode.
"""
from __future__ import annotations

import torch

from ..base import Checkpoint
from ..errors import CheckpointError, UnknownNameError
from ..spec import ModelSpec, TensorSpec
from ..store_format import STORE_DTYPES

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}


def check_dtype(dtype: str) -> None:
    if dtype not in STORE_DTYPES:
        raise UnknownNameError("store dtype", dtype, list(STORE_DTYPES))


def is_mxfp4_source(spec: ModelSpec) -> bool:
    """Experts stored as MXFP4 blocks + scales (GPT-OSS original layout)."""
    roles = {t.role: t for t in spec.expert_tensors}
    blocks = [r for r in roles if r.endswith(".blocks")]
    return bool(blocks) and all(roles.get(r[: -len(".blocks")] + ".scales") is not None
                                and roles[r].dtype == "U8" for r in blocks)


def allowed_dtypes(spec: ModelSpec) -> list[str]:
    return [d for d in STORE_DTYPES if d != "mxfp4" or is_mxfp4_source(spec)]


def store_tensors(source: Checkpoint, dtype: str) -> tuple[TensorSpec, ...]:
    """One expert as the store keeps it, in the source's role order."""
    check_dtype(dtype)
    spec = source.spec
    if dtype == "mxfp4":
        if not is_mxfp4_source(spec):
            have = sorted({t.dtype for t in spec.expert_tensors})
            raise CheckpointError(source.root, f"dtype mxfp4 needs a source whose experts are MXFP4; this "
                                  f"{spec.format} source stores {'/'.join(have)}",
                                  fix=f"use --dtype {' or '.join(allowed_dtypes(spec))}")
        return spec.expert_tensors
    # The dense roles and shapes are whatever the adapter decodes to: ask it once.
    probe = source.load_expert(0, 0)
    return tuple(TensorSpec(role, STORE_DTYPES[dtype], tuple(t.shape)) for role, t in probe.items())


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def expert_parts(source: Checkpoint, layer: int, expert: int, dtype: str,
                 order: tuple[TensorSpec, ...] | tuple) -> list[memoryview | bytes]:
    """The bytes of each tensor of one expert, in `order` (the layer plan's order)."""
    if dtype == "mxfp4":
        raw = source.read_raw(layer, expert)
        return [raw[t.role] for t in order]
    tdt = TORCH_DTYPES[STORE_DTYPES[dtype]]
    dense = source.load_expert(layer, expert)
    parts = []
    for t in order:
        x = dense[t.role]
        if tuple(x.shape) != tuple(t.shape):
            raise CheckpointError(source.root, f"expert {layer}/{expert} decodes to shape {list(x.shape)}, "
                                  f"expert 0/0 to {list(t.shape)}", tensor=t.role)
        parts.append(_as_bytes(x.to(tdt)))
    return parts


def expected_dense(source: Checkpoint, layer: int, expert: int, dtype: str) -> dict[str, torch.Tensor]:
    """What the store's `load_expert(layer, expert)` must equal bit for bit."""
    dense = source.load_expert(layer, expert)
    if dtype == "mxfp4":
        return dense
    tdt = TORCH_DTYPES[STORE_DTYPES[dtype]]
    return {r: t.to(tdt) for r, t in dense.items()}


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN-safe, -0 != +0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
