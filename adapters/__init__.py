"""Model checkpoint formats: where each expert's bytes are and how they become tensors.

`open_checkpoint(path)` detects the format; `adapters.registry` lists them by name.
This package never schedules, caches, or knows about tiers (see DESIGN.md).
"""
