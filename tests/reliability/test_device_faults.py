"""Device faults on a GPU: a VRAM budget above the free memory is refused before anything is
allocated, with the numbers; close() with copies in flight returns within 2 s and leaves no
registered host memory, no child process and no /dev/shm file."""
from __future__ import annotations

import time

import pytest

from adapters.store import StoreCheckpoint
from pipeline import ExpertPipeline
from tests.helpers_pipeline import build_tiny_store, child_pids, no_leaks, shm_files  # noqa: F401

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_tiny_store(tmp_path_factory.mktemp("device"), "bfloat16")


def test_a_vram_budget_above_the_free_memory_is_refused_before_allocating(tmp_path, no_leaks):  # noqa: F811
    import torch

    from tests.helpers_models import make_tiny
    from adapters.precompute.cli import main as precompute

    model = make_tiny(tmp_path / "m", "qwen-moe", "--layers", "2", "--experts", "64", "--hidden", "1024",
                      "--intermediate", "1024")  # 6 MB experts, 0.8 GB in all
    assert precompute(["--model", str(model), "--workers", "0", "--no-progress"]) == 0
    free, total = torch.cuda.mem_get_info()
    filler = torch.empty(free - (256 << 20), dtype=torch.uint8, device="cuda")  # leave 256 MiB free
    before = torch.cuda.memory_allocated()
    try:
        with pytest.raises(ValueError, match=r"= \d+ bytes, but cuda(:0)? has \d+ of \d+ bytes free; use at most \d+ slots"):
            ExpertPipeline.open(model / "expert_store", vram="512MiB", ram="64MiB", device="cuda", vram_form="dense")
        assert torch.cuda.memory_allocated() == before  # refused before anything was allocated
    finally:
        del filler
        torch.cuda.empty_cache()


def test_close_with_copies_in_flight_is_quick_and_leaves_nothing(store, no_leaks):  # noqa: F811
    import torch

    st = StoreCheckpoint(store)
    K = st.spec.top_k
    kids, files = child_pids(), shm_files()
    pipe = ExpertPipeline.open(store, vram="64MiB", ram="64MiB", device="cuda", reader_hooks={"delay_s": 0.05})
    ptr, pinned = pipe._p.ram_arena._ptr, pipe._p.ram_arena.pinned
    for layer in range(st.spec.num_layers):
        pipe.fetch(layer, list(range(K)), wait=False)  # demand copies queued, prefetches planned behind them
    torch.cuda._sleep(50_000_000)  # the compute stream busy: copies still in flight at close
    t0 = time.perf_counter()
    pipe.close()
    took = time.perf_counter() - t0
    assert took < 2.0, f"close took {took:.2f} s"
    assert pinned
    code = int(getattr(rc := torch.cuda.cudart().cudaHostUnregister(ptr), "value", rc))
    assert code != 0, "the RAM arena was still registered with CUDA after close"
    assert child_pids() - kids == set() and shm_files() - files == set()


def test_a_short_soak_with_the_vram_tier_on_the_gpu_hands_out_only_exact_experts(store, no_leaks):  # noqa: F811
    from tests.reliability.soak import Faults, soak

    r = soak(store, tokens=1000, faults=Faults(reader_kills=4, policy_kill=True), seed=2, device="cuda",
             sample_every=250)
    assert r.wrong_tensors == 0 and r.experts_checked == 1000 * 3 * 2 and r.reader_kills == 4
    assert r.slopes_per_1k["vram_bytes"] == 0  # the arenas are allocated once
    assert r.after.vram_bytes == r.before.vram_bytes  # and released at close
