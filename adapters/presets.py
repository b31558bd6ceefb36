"""Model presets for `make-model`: the real models' MoE dimensions, by name."""
from __future__ import annotations

import msgspec

from .errors import UnknownNameError


# The formats make-model writes per expert layout (adapters.synthetic), beside "hf" (whole models).
FORMATS = ("gpt-oss", "mixtral", "qwen-moe", "fused")


class Preset(msgspec.Struct, frozen=True):
    name: str
    layers: int
    experts: int
    top_k: int
    hidden: int
    intermediate: int  # per routed expert (Qwen's moe_intermediate_size)
    shared_intermediate: int  # shared expert / dense MLP width where the family has one
    default_format: str
    # Attention and vocabulary, for `make-model --format hf` (whole transformers models).
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    vocab: int = 512


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("gpt-oss-20b", 24, 32, 4, 2880, 2880, 2880, "gpt-oss", 64, 8, 64, 201088),
    Preset("gpt-oss-120b", 36, 128, 4, 2880, 2880, 2880, "gpt-oss", 64, 8, 64, 201088),
    Preset("mixtral-8x7b", 32, 8, 2, 4096, 14336, 14336, "mixtral", 32, 8, 128, 32000),
    Preset("qwen1.5-moe", 24, 60, 4, 2048, 1408, 5632, "qwen-moe", 16, 16, 128, 151936),
    # Multiples of 32 so it is valid MXFP4; small enough for unit tests.
    Preset("tiny", 3, 8, 2, 64, 64, 96, "gpt-oss"),
)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownNameError("preset", name, list(PRESETS)) from None
