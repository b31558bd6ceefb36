"""Transformers MoE models decoding with their experts served by the pipeline (`pip install .[hf]`).

    from pipeline.hf import load_offloaded, offload_experts

Nothing here imports transformers until it is called, so `pipeline` stays usable without it.
"""
from __future__ import annotations

__all__ = ["load_offloaded", "offload_experts"]


def __getattr__(name: str):
    if name in __all__:
        from . import load

        return getattr(load, name)
    raise AttributeError(f"module 'pipeline.hf' has no attribute {name!r}")
