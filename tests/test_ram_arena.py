"""The shared RAM arena: one /dev/shm mapping of fixed slots, visible to other processes,
pinned when CUDA can, and gone without a trace after close() or a failed creation."""
from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import warnings

import pytest
import torch

from pipeline import ram_arena
from pipeline.ram_arena import RamArena
from tests.helpers_pipeline import no_leaks, shm_files  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("no_leaks")


def _child_writes(path: str, size: int, offset: int, data: bytes) -> None:
    import mmap

    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, size)
    os.close(fd)
    mm[offset:offset + len(data)] = data
    mm.close()


def test_slots_are_views_of_one_mapping_that_another_process_writes():
    with RamArena.create(3, 8192, pin=False) as arena:
        assert arena.tensor.shape == (3, 8192) and arena.tensor.dtype == torch.uint8
        assert arena.size == 3 * 8192 and os.path.getsize(arena.path) == arena.size
        assert os.path.basename(arena.path).startswith(f"tlmc-arena-{os.getpid()}-")
        assert [arena.slot_offset(i) for i in range(3)] == [0, 8192, 16384]
        payload = bytes(range(256)) * 4
        p = multiprocessing.get_context("spawn").Process(target=_child_writes,
                                                         args=(arena.path, arena.size, arena.slot_offset(2), payload))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        p.close()
        assert bytes(arena.slot(2)[:1024].numpy()) == payload
        assert not arena.slot(1).any() and not arena.slot(0).any()
        # a slot is a view: writing through it lands in the one mapping
        arena.slot(1)[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
        assert arena.tensor[1, :4].tolist() == [1, 2, 3, 4]
        assert arena.slot(1).data_ptr() == arena.tensor.data_ptr() + 8192
        with pytest.raises(IndexError, match="3 slots"):
            arena.slot(3)


def test_close_unlinks_and_is_idempotent():
    arena = RamArena.create(2, 4096, pin=False)
    path = arena.path
    assert os.path.exists(path)
    view = arena.slot(0)  # a view the caller forgot: close must still remove the file
    arena.close()
    arena.close()
    assert not os.path.exists(path) and arena.closed and not arena.pinned
    with pytest.raises(ValueError, match="closed"):
        arena.slot(0)
    del view


def test_a_forgotten_arena_is_unlinked_by_its_finalizer():
    arena = RamArena.create(1, 4096, pin=False)
    path = arena.path
    del arena
    gc.collect()
    assert not os.path.exists(path)


@pytest.mark.parametrize("slots, slot_bytes, match", [
    (0, 4096, r"at least 1 slot, got num_slots=0"),
    (2, 5000, r"slot_bytes=5000 .* multiple of 4096; round it up to 8192"),
    (2, 0, r"slot_bytes=0"),
])
def test_impossible_sizes_raise_with_the_numbers(slots, slot_bytes, match):
    with pytest.raises(ValueError, match=match):
        RamArena.create(slots, slot_bytes, pin=False)


def test_more_than_dev_shm_holds_raises_with_the_numbers():
    free = shutil.disk_usage("/dev/shm").free
    slots = free // (1 << 20) + 1
    with pytest.raises(ValueError, match=rf"{slots} slots x 1048576 bytes .* {free} bytes free .*use at most"):
        RamArena.create(slots, 1 << 20, pin=False)


def test_creation_failing_half_way_leaks_no_file_and_no_fd(monkeypatch):
    fds = set(os.listdir("/proc/self/fd"))

    def boom(*a, **k):
        raise RuntimeError("frombuffer failed")

    monkeypatch.setattr(ram_arena.torch, "frombuffer", boom)
    with pytest.raises(RuntimeError, match="frombuffer failed"):
        RamArena.create(2, 4096, pin=False)
    monkeypatch.undo()
    assert not shm_files()
    assert set(os.listdir("/proc/self/fd")) <= fds | {str(max(map(int, fds)) + 1)}  # listdir's own fd


class _FakeCudart:
    def __init__(self, rc: int):
        self.rc, self.calls = rc, []

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size, flags))
        return self.rc

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


def _fake_cuda(monkeypatch, rc: int) -> _FakeCudart:
    fake = _FakeCudart(rc)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def test_pinned_once_when_cuda_registers_and_unregistered_on_close(monkeypatch):
    fake = _fake_cuda(monkeypatch, 0)
    arena = RamArena.create(2, 4096)
    assert arena.pinned
    ptr = arena.tensor.data_ptr()
    assert fake.calls == [("register", ptr, 8192, 0)]
    arena.close()
    assert fake.calls[1:] == [("unregister", ptr)] and not arena.pinned


def test_pin_failure_warns_once_and_carries_on_unpinned(monkeypatch):
    fake = _fake_cuda(monkeypatch, 2)  # cudaErrorMemoryAllocation
    with pytest.warns(RuntimeWarning, match=r"8192 bytes could not be pinned \(cudaHostRegister returned 2") as w:
        arena = RamArena.create(2, 4096)
    assert len(w) == 1 and not arena.pinned
    arena.slot(1)[0] = 7  # still usable
    arena.close()
    assert [c[0] for c in fake.calls] == ["register"]  # nothing registered, nothing to undo


def test_no_cuda_means_no_pinning_and_no_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with RamArena.create(1, 4096) as arena:
            assert not arena.pinned
