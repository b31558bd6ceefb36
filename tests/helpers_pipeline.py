"""Shared pipeline test helpers: a leak checker (no child process, no new /dev/shm file after
a test) and tiny packed stores built by the project's own make-model + precompute.
Shared by the pipeline engineers: append, do not rewrite."""
from __future__ import annotations

import errno
import io
import mmap
import os
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from adapters.cli.make_model import main as make_model_main
from adapters.store import StoreCheckpoint
from adapters.precompute.cli import main as precompute_main

SHM = Path("/dev/shm")


def _resource_tracker_pid() -> int | None:
    """multiprocessing's one resource-tracker process, started with the first "spawn" child and
    kept for the interpreter's life (it exits when we do): not a leak of any test."""
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)


def child_pids() -> set[int]:
    """Processes (zombies included) whose parent is this process, from /proc, except
    multiprocessing's resource tracker."""
    me = str(os.getpid())
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces, so split after the last ')'
        if stat.rsplit(")", 1)[1].split()[1] == me:
            out.add(int(d))
    return out - {_resource_tracker_pid()}


def shm_files() -> set[str]:
    """Files in /dev/shm that this process could have made (project prefix + our pid)."""
    tag = f"-{os.getpid()}-"
    return {n for n in os.listdir(SHM) if n.startswith("tlmc-") and tag in n}


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves a child process or a new /dev/shm file of ours behind."""
    kids, files = child_pids(), shm_files()
    yield
    left = child_pids() - kids
    assert not left, f"test left child processes behind: {sorted(left)}"
    new = shm_files() - files
    assert not new, f"test left files in /dev/shm: {sorted(new)}"


def build_tiny_store(out: Path, dtype: str, *, seed: int = 5) -> Path:
    """A tiny GPT-OSS model packed as a store of `dtype` under `out` (returns the store dir)."""
    model, store = out / "model", out / f"store_{dtype}"
    with redirect_stdout(io.StringIO()):
        if not model.exists():
            assert make_model_main(["--format", "gpt-oss", "--preset", "tiny", "--seed", str(seed),
                                    "--out", str(model)]) == 0
        assert precompute_main(["--model", str(model), "--out", str(store), "--dtype", dtype, "--workers", "0",
                                "--no-progress"]) == 0
    return store


def budgets(store_dir: Path, vram_experts: int, ram_experts: int) -> dict:
    """ExpertPipeline.open's vram/ram for that many dense VRAM slots and RAM slots of the store."""
    from pipeline.vram_arena import VramArena

    st = StoreCheckpoint(store_dir)
    ram_slot = st.index.max_read_length
    # Counted in dense slots, so the form is dense (auto would hold more, stored, on a GPU)
    return {"vram": VramArena.slot_bytes_for(st) * vram_experts, "ram": ram_slot * ram_experts, "vram_form": "dense"}


# -- VRAM arena / copy engine (appended) ------------------------------------------------------
STORE_DTYPES = ("bfloat16", "float16", "mxfp4")


def bit_pattern(t):
    """A tensor's bits as an integer tensor, so comparisons are exact (NaN, -0)."""
    import torch

    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.fixture(scope="module", params=STORE_DTYPES)
def tiny_store(request, tmp_path_factory):
    """A StoreCheckpoint of the tiny preset (3 layers x 8 experts, top-2), once per store dtype."""
    from adapters.store import StoreCheckpoint

    return StoreCheckpoint(build_tiny_store(tmp_path_factory.mktemp(f"vram_{request.param}"), request.param))


def run_ours_on_stored_experts(store_dir, store, passes, model, device: str, per_expert_waits: bool):
    """The replay's `ours` through a pipeline that hands out stored experts (vram_form="stored",
    vram_views=0) with two dense slots' worth of VRAM; returns its MethodRun (outputs kept)."""
    from pipeline.bench.methods import baseline_methods, select
    from pipeline.bench.replay import emulate_hints, run_method
    from pipeline.vram_arena import VramArena

    (m,) = select(baseline_methods(), ["ours"])
    vslot = VramArena.slot_bytes_for(store)
    rslot = store.index.max_read_length
    return run_method(store_dir, store, m, 2 * vslot, 6 * rslot, passes, model,
                      emulate_hints(passes, store.spec.num_experts, 0.8, 0), device=device, readers=1,
                      keep_outputs=True, per_expert_waits=per_expert_waits, vram_form="stored", vram_views=0)


def fs_allows_o_direct(path: Path) -> bool:
    """Independent of the reader: can this file be read with O_DIRECT into an aligned buffer?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        assert e.errno == errno.EINVAL
        return False
    try:
        buf = mmap.mmap(-1, 4096)
        try:
            os.preadv(fd, [buf], 0)
            return True
        except OSError as e:
            assert e.errno == errno.EINVAL
            return False
        finally:
            buf.close()
    finally:
        os.close(fd)
