"""Filling the tiers before decoding: which experts, and how many per fetch.

With RAM below the store, the first tokens of a cold pipeline wait on the disk for every
expert they use (on an H100, half of llama4's 40.7 GB store in RAM, arbitrary experts warmed:
2.8 GB read in the first 40 passes, 18.7 tok/s against 135 for on-demand with all of it in RAM). `ExpertPipeline.warm` fetches a chosen
set once, before decoding, several experts per fetch so their disk reads run on several
reader processes at once; `policies.trace_stats.most_used` picks the set from a recorded trace
(what to cache is the policies' business). The benchmark's warm-up (pipeline/bench/replay.py)
uses the same grouping.
"""
from __future__ import annotations

from collections.abc import Iterable

MAX_WIDTH = 8  # experts per warm-up fetch: enough readers busy at once, one layer's share at most


def fill_width(top_k: int, num_experts: int, num_layers: int, vram_slots: int, views: int | None) -> int:
    """Experts per warm-up fetch: up to MAX_WIDTH, so the disk reads of one fetch run on
    several reader processes at once; at most half of VRAM and a layer's even share of it, so
    every policy can place them (lru-per-layer splits VRAM by layer); no more than the dense
    views a stored-form VRAM decodes into (`views`, when it has them); never below top_k."""
    width = max(top_k, min(num_experts, MAX_WIDTH, vram_slots // 2, vram_slots // num_layers))
    return width if views is None else max(1, min(width, views))


def first_of_each_layer(num_layers: int, num_experts: int, ram_slots: int) -> list[tuple[int, int]]:
    """ram_slots experts (all of them when RAM holds the store), each layer's first ones, the
    layers' shares as even as they divide: a set RAM holds whole, when nothing says which
    experts matter."""
    total = min(ram_slots, num_layers * num_experts)
    share, extra = divmod(total, num_layers)
    return [(layer, e) for layer in range(num_layers) for e in range(share + (layer < extra))]


def warm_groups(experts: Iterable[tuple[int, int]], num_layers: int, num_experts: int,
                width: int) -> list[tuple[int, list[int]]]:
    """`experts` as fetches: layer by layer, up to `width` of a layer per fetch, each expert
    once, in the order given within a layer. Refuses an expert out of range before any fetch."""
    chosen = dict.fromkeys((int(layer), int(e)) for layer, e in experts)  # ordered, without repeats
    by_layer: dict[int, list[int]] = {}
    for layer, e in chosen:
        if not (0 <= layer < num_layers and 0 <= e < num_experts):
            raise ValueError(f"warm: expert ({layer}, {e}) is out of range: layers 0..{num_layers - 1}, "
                             f"experts 0..{num_experts - 1}")
        by_layer.setdefault(layer, []).append(e)
    groups = []
    for layer in sorted(by_layer):
        ids = by_layer[layer]
        groups += [(layer, ids[i:i + width]) for i in range(0, len(ids), width)]
    return groups
