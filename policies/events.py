"""Typed messages between the decode loop, the policy actor and the pipeline.

`Activation` flows in (one per layer visit); `Plan` flows out. Both are frozen msgspec
structs so they can cross a process boundary unchanged.
"""
from __future__ import annotations

import enum

import msgspec


class Tier(enum.IntEnum):
    DISK = 0
    RAM = 1
    VRAM = 2


class Activation(msgspec.Struct, frozen=True, tag=True):
    """The router of `layer` chose `experts` (highest weight first) for the current token."""

    layer: int
    experts: tuple[int, ...]
    weights: tuple[float, ...] | None = None
    token_id: int | None = None
    # Router-lookahead scores for later layers, {layer: per-expert scores}, when the decode
    # loop could compute them from the hidden state (pipe.hint); None otherwise.
    hint: dict[int, tuple[float, ...]] | None = None
    time: float = 0.0  # the producer's clock, seconds
    # Token rows in this forward pass: 1 when decoding, the prompt's length in a prefill,
    # whose later layers will need the union of all its rows' experts.
    rows: int = 1


class Move(msgspec.Struct, frozen=True):
    """Put expert (layer, expert) into `tier`; smaller `priority` = needed sooner."""

    layer: int
    expert: int
    tier: Tier
    priority: float


class Plan(msgspec.Struct, frozen=True, tag=True):
    promotions: tuple[Move, ...] = ()  # RAM -> VRAM
    stagings: tuple[Move, ...] = ()  # NVMe -> RAM
    evictions: tuple[Move, ...] = ()  # tier = the tier the expert leaves
