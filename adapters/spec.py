"""Frozen descriptions shared by every adapter: the model, one expert's tensors, byte ranges.

Layer numbers here are MoE-layer indices `0..num_layers-1`; `ModelSpec.layer_ids` maps them
to the model's own block numbers (dense layers are not MoE layers and are left out).
"""
from __future__ import annotations

import msgspec

# Bytes per element of the safetensors dtypes the project reads or writes.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


class TensorSpec(msgspec.Struct, frozen=True):
    """One tensor of one expert, e.g. role `w1`, dtype `BF16`, shape (14336, 4096)."""

    role: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


class ModelSpec(msgspec.Struct, frozen=True):
    """What a checkpoint holds, as far as routed experts are concerned."""

    family: str  # expert maths: "gpt-oss" (SwiGLU with clamp, biases), "mixtral", "qwen-moe", "fused"
    format: str  # adapter name that produced this description
    num_layers: int  # MoE layers only
    num_experts: int  # routed experts per MoE layer
    top_k: int
    hidden_size: int
    intermediate_size: int
    layer_ids: tuple[int, ...]  # the model's own index of each MoE layer
    expert_tensors: tuple[TensorSpec, ...]  # one expert as stored in the checkpoint

    @property
    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.expert_tensors)


class TensorRange(msgspec.Struct, frozen=True):
    """Where one tensor of one expert lies: `length` bytes at absolute `offset` of `file`."""

    role: str
    file: str  # path relative to the checkpoint directory
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]


class ExpertLocation(msgspec.Struct, frozen=True):
    layer: int
    expert: int
    ranges: tuple[TensorRange, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.length for r in self.ranges)
