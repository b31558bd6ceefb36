"""Warming a pipeline before decoding (pipeline/warm.py, ExpertPipeline.warm/awarm): the
experts chosen are read once, several per fetch, and then served without the disk; bad
choices are one-line errors; `most_used` ranks a trace's experts by use."""
from __future__ import annotations

import numpy as np
import pytest

from adapters.store import StoreCheckpoint
from pipeline.api import ExpertPipeline
from pipeline.warm import first_of_each_layer, warm_groups
from policies.synthetic import SyntheticConfig, generate
from policies.trace_stats import most_used
from tests.helpers_traces import tiny_trace
from tests.helpers_pipeline import budgets, build_tiny_store, no_leaks  # noqa: F401

# tiny preset: 3 MoE layers x 8 experts, top-2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_tiny_store(tmp_path_factory.mktemp("warm"), "mxfp4")


def test_most_used_ranks_by_use_and_can_leave_out_the_prompt():
    # 2 layers, top-1: layer 0 uses 3, 3, 1 (prefill row first), layer 1 uses 2, 0, 0
    trace = tiny_trace([[[3], [2]], [[3], [0]], [[1], [0]]], phase=np.array([0, 1, 1]))
    assert most_used(trace, 3) == [(0, 3), (1, 0), (0, 1)]  # ties: lower (layer, expert) first
    assert most_used(trace, 10) == [(0, 3), (1, 0), (0, 1), (1, 2)]  # never an unused expert
    assert most_used(trace, 10, include_prefill=False) == [(1, 0), (0, 1), (0, 3)]
    with pytest.raises(ValueError, match="n must be >= 1"):
        most_used(trace, 0)


def test_warm_groups_go_layer_by_layer_width_at_a_time_each_expert_once():
    groups = warm_groups([(1, 5), (0, 2), (1, 5), (1, 0), (0, 7), (1, 3), (1, 1)], 3, 8, width=2)
    assert groups == [(0, [2, 7]), (1, [5, 0]), (1, [3, 1])]
    # ram_slots of them, shares as even as they divide (13 = 5 + 4 + 4), never more than RAM holds
    assert first_of_each_layer(3, 8, ram_slots=13) == [(0, e) for e in range(5)] + [
        (layer, e) for layer in (1, 2) for e in range(4)]
    assert first_of_each_layer(3, 8, ram_slots=2) == [(0, 0), (1, 0)]
    assert len(first_of_each_layer(3, 8, ram_slots=100)) == 24  # all of them when RAM holds the store
    with pytest.raises(ValueError, match=r"expert \(3, 0\) is out of range: layers 0..2"):
        warm_groups([(3, 0)], 3, 8, width=2)


def test_warm_reads_the_chosen_experts_once_and_then_serves_them_without_the_disk(store, no_leaks):  # noqa: F811
    spec = StoreCheckpoint(store).spec
    trace = generate(SyntheticConfig(layers=spec.num_layers, experts=spec.num_experts, top_k=spec.top_k,
                                     requests=2, prompt_tokens=3, decode_tokens=12, seed=2))
    read = StoreCheckpoint(store).index.max_read_length
    with ExpertPipeline.open(store, **budgets(store, 4, 12), device="cpu", readers=2, policy="lru") as pipe:
        hot = most_used(trace, pipe.stats().ram_slots)
        assert len(hot) == 12
        assert pipe.warm(hot) == 12
        warmed = pipe.stats().scheduler
        per_layer = np.bincount([layer for layer, _ in hot], minlength=spec.num_layers)
        # each read once, two of a layer per fetch (VRAM has 4 slots)
        assert warmed.bytes_nvme == 12 * read and warmed.fetches == int(np.sum((per_layer + 1) // 2))
        for layer, e in hot:
            pipe.fetch(layer, [e])
        assert pipe.stats().scheduler.bytes_nvme == warmed.bytes_nvme  # all of them from RAM
        with pytest.raises(ValueError, match="out of range"):
            pipe.warm([(0, spec.num_experts)])
        with pytest.raises(ValueError, match="15 experts given but RAM holds 12; give the ones to keep"):
            pipe.warm([(layer, e) for layer in range(spec.num_layers) for e in range(5)])
        # a width beyond what VRAM can place at once is capped, not refused halfway
        assert pipe.warm(hot, width=100) == 12
        with pytest.raises(ValueError, match="width must be >= 1"):
            pipe.warm(hot, width=0)


async def test_awarm_fills_ram_with_each_layers_first_experts_by_default(store, no_leaks):  # noqa: F811
    read = StoreCheckpoint(store).index.max_read_length
    async with await ExpertPipeline.aopen(store, **budgets(store, 4, 13), device="cpu", readers=2,
                                          policy="lru") as pipe:
        assert await pipe.awarm(width=1) == 13  # all that RAM holds (5 + 4 + 4), one per fetch
        sched = pipe.stats().scheduler
        assert sched.bytes_nvme == 13 * read and sched.fetches == 13
        with pytest.raises(RuntimeError, match="awarm"):  # the blocking call names the async one
            pipe.warm()


def test_warm_by_default_fits_a_ram_smaller_than_top_k_per_layer(store, no_leaks):  # noqa: F811
    read = StoreCheckpoint(store).index.max_read_length
    # RAM 5 < top_k 2 x 3 layers
    with ExpertPipeline.open(store, **budgets(store, 2, 5), device="cpu", readers=1, policy="lru") as pipe:
        assert pipe.warm() == 5 and pipe.stats().scheduler.bytes_nvme == 5 * read
