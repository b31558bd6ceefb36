"""SlotDecoder: the prepared MXFP4 decode writes exactly what the store's general decode writes."""
from __future__ import annotations

import pytest
import torch

from adapters.store import StoreCheckpoint
from pipeline.slot_decoder import SlotDecoder, scratch_bytes
from pipeline.vram_arena import DECODE_LANES, VramArena
from tests.helpers_pipeline import bit_pattern, build_tiny_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("slotdec")
    return {d: StoreCheckpoint(build_tiny_store(root, d)) for d in ("mxfp4", "bfloat16")}


def _check_every_staging_lane_and_slot(store: StoreCheckpoint, device: str) -> int:
    arena = VramArena(store, 3, device, num_staging=3)
    checked = 0
    experts = [(x.layer, x.expert) for x in store.index.experts][:5]
    for n, (layer, e) in enumerate(experts):
        raw = torch.frombuffer(bytearray(store.read_expert(layer, e)), dtype=torch.uint8)
        want = store.decode_from_buffer(raw)  # the general decode, on the CPU
        k, slot, lane = n % arena.num_staging, n % arena.num_slots, n % DECODE_LANES
        arena.staging(k).fill_(0x5A)  # leftovers of an earlier expert must not leak through
        arena.staging(k)[: raw.numel()].copy_(raw.to(device))
        for t in arena.tensors(slot).values():
            t.view(torch.uint8).fill_(0xFF) if t.element_size() == 1 else t.view(torch.int16).fill_(-1)
        arena.decoder.decode(k, slot, lane)
        got = {role: t.cpu() for role, t in arena.tensors(slot).items()}
        assert sorted(got) == sorted(want)
        for role in want:
            assert torch.equal(bit_pattern(got[role]), bit_pattern(want[role])), (layer, e, role, k, lane)
            checked += 1
    arena.close()
    return checked


def test_prepared_decode_is_bit_identical_to_the_general_decode(stores):
    assert _check_every_staging_lane_and_slot(stores["mxfp4"], "cpu") >= 5 * 4


@pytest.mark.gpu
def test_prepared_decode_is_bit_identical_on_the_gpu(stores):
    assert _check_every_staging_lane_and_slot(stores["mxfp4"], "cuda") >= 5 * 4


def test_scratch_is_counted_in_the_arena_and_only_mxfp4_has_a_decoder(stores):
    mx = VramArena(stores["mxfp4"], 2, "cpu")
    assert mx.decoder is not None and mx.decoder.nbytes == scratch_bytes(stores["mxfp4"], DECODE_LANES) > 0
    assert mx.nbytes == 2 * mx.slot_bytes + mx.num_staging * mx.read_length + mx.decoder.nbytes
    assert VramArena(stores["bfloat16"], 2, "cpu").decoder is None
    with pytest.raises(ValueError, match="mxfp4"):
        SlotDecoder(VramArena(stores["bfloat16"], 2, "cpu"))
