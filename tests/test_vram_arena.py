"""VramArena: fixed slots carved from one allocation, tensor views per slot, budget errors."""
from __future__ import annotations

import pytest
import torch

from pipeline.vram_arena import VramArena
from tests.helpers_pipeline import tiny_store  # noqa: F401 - fixture


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def test_slot_bytes_follow_the_store_dtype(tiny_store):
    st = tiny_store
    if st.dtype == "mxfp4":
        # decoded bf16 tensors, each starting on a 256-byte boundary
        want = sum(-(-t.nbytes // 256) * 256 for t in st.dense_tensors)
        assert want > st.expert_range(0, 0).read_length  # decoded is larger than what moves
    else:
        want = st.expert_range(0, 0).read_length
    assert VramArena.slot_bytes_for(st) == want


def test_slots_are_disjoint_views_of_one_allocation(tiny_store):
    arena = VramArena(tiny_store, 5, "cpu")
    sb = arena.slot_bytes
    base = arena.raw_view(0).data_ptr()
    storage = arena.raw_view(0).untyped_storage().data_ptr()
    for i in range(arena.num_slots):
        raw = arena.raw_view(i)
        assert raw.dtype == torch.uint8 and raw.numel() == sb
        assert raw.untyped_storage().data_ptr() == storage  # one allocation
        assert raw.data_ptr() == base + i * sb
        spans = sorted(_span(t) for t in arena.tensors(i).values())
        assert spans[0][0] >= base + i * sb and spans[-1][1] <= base + (i + 1) * sb
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # tensors of a slot don't overlap
        assert all(t.data_ptr() % 2 == 0 for t in arena.tensors(i).values())


def test_writing_one_slots_tensors_leaves_the_others_alone(tiny_store):
    arena = VramArena(tiny_store, 3, "cpu")
    for i in range(3):
        arena.raw_view(i).fill_(0x11 * (i + 1))
    for t in arena.tensors(1).values():
        t.view(torch.uint8).fill_(0xEE) if t.element_size() == 1 else t.view(torch.int16).fill_(-1)
    assert bool((arena.raw_view(0) == 0x11).all()) and bool((arena.raw_view(2) == 0x33).all())
    assert not bool((arena.raw_view(1) == 0x22).all())


def test_tensor_views_have_the_store_roles_dtypes_and_shapes(tiny_store):
    arena = VramArena(tiny_store, 2, "cpu")
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8, "F32": torch.float32}
    for i in range(2):
        got = arena.tensors(i)
        assert set(got) == {t.role for t in tiny_store.dense_tensors}
        for t in tiny_store.dense_tensors:
            assert got[t.role].dtype == names[t.dtype] and tuple(got[t.role].shape) == tuple(t.shape)
            assert got[t.role].is_contiguous()
    assert arena.tensors(0) is arena.tensors(0)  # built once, not per call


def test_staging_buffers_only_for_mxfp4(tiny_store):
    arena = VramArena(tiny_store, 2, "cpu", num_staging=3)
    if tiny_store.dtype == "mxfp4":
        assert arena.num_staging == 3
        spans = [_span(arena.staging(k)) for k in range(3)]
        assert all(b - a == tiny_store.expert_range(0, 0).read_length for a, b in spans)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        slots = (_span(arena.raw_view(0))[0], _span(arena.raw_view(1))[1])
        assert all(b <= slots[0] or a >= slots[1] for a, b in spans)  # not inside any slot
    else:
        assert arena.num_staging == 0
        with pytest.raises(IndexError, match="staging buffer 0"):
            arena.staging(0)


def test_fewer_slots_than_top_k_is_refused_with_the_numbers(tiny_store):
    k = tiny_store.spec.top_k
    with pytest.raises(ValueError, match=rf"{k - 1} slots .*top-{k}.*at least {k} slots"):
        VramArena(tiny_store, k - 1, "cpu")
    VramArena(tiny_store, k, "cpu").close()


def test_slot_index_out_of_range_and_closed_arena(tiny_store):
    arena = VramArena(tiny_store, 2, "cpu")
    with pytest.raises(IndexError, match="slot 2 out of range 0..1"):
        arena.tensors(2)
    with pytest.raises(IndexError):
        arena.raw_view(-1)
    arena.close()
    with pytest.raises(RuntimeError, match="closed"):
        arena.raw_view(0)
    arena.close()  # idempotent


@pytest.mark.gpu
def test_cuda_arena_lives_on_the_device_and_refuses_more_than_free_memory(tiny_store):
    arena = VramArena(tiny_store, 4, "cuda")
    assert arena.device.type == "cuda" and arena.device.index is not None
    assert arena.raw_view(3).is_cuda and all(t.is_cuda for t in arena.tensors(3).values())
    arena.close()
    free, _ = torch.cuda.mem_get_info()
    too_many = free // VramArena.slot_bytes_for(tiny_store) + 10
    with pytest.raises(ValueError, match=rf"{too_many} slots .* free; use at most \d+ slots"):
        VramArena(tiny_store, too_many, "cuda")
