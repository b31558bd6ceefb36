"""Model checkpoint formats: where each expert's bytes are and how they become tensors.

`open_checkpoint(path)` detects the format; `adapters.registry` lists them by name.
This package never schedules, caches, or knows about tiers (see docs/architecture.md).
"""
__all__ = ["open_checkpoint"]


def __getattr__(name: str):
    # Lazy, so `import adapters.spec` (used by torch-free code) does not pull in torch.
    if name == "open_checkpoint":
        from .registry import open_checkpoint

        return open_checkpoint
    raise AttributeError(f"module 'adapters' has no attribute {name!r}")
