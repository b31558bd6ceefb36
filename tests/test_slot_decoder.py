"""SlotDecoder: the prepared MXFP4 decode writes exactly what the store's general decode writes."""
from __future__ import annotations

import pytest
import torch

from adapters.store import StoreCheckpoint
from pipeline.fused_decode import FusedDecode
from pipeline.slot_decoder import SlotDecoder, scratch_bytes
from pipeline.vram_arena import DECODE_LANES, VramArena
from tests.helpers_pipeline import bit_pattern, build_tiny_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("slotdec")
    return {d: StoreCheckpoint(build_tiny_store(root, d)) for d in ("mxfp4", "bfloat16")}


def _check_every_staging_lane_and_slot(store: StoreCheckpoint, device: str, fused: bool | None = None) -> int:
    arena = VramArena(store, 3, device, num_staging=3)
    if fused is not None:  # this decoder rather than the one the arena chose
        arena.decoder = FusedDecode(arena) if fused else SlotDecoder(arena, lanes=DECODE_LANES)
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
@pytest.mark.parametrize("fused", [False, True])
def test_prepared_decode_is_bit_identical_on_the_gpu(stores, fused):
    assert VramArena(stores["mxfp4"], 2, "cuda").fused_decode  # the GPU image has Triton: the default
    assert _check_every_staging_lane_and_slot(stores["mxfp4"], "cuda", fused) >= 5 * 4


FUSED_ON_CPU = """
import sys
from adapters.store import StoreCheckpoint
from pipeline.fused_decode import FusedDecode
from pipeline.vram_arena import VramArena
from tests.test_slot_decoder import _check_every_staging_lane_and_slot
store = StoreCheckpoint(sys.argv[1])
assert isinstance(VramArena(store, 2, "cpu").decoder, FusedDecode)
print(_check_every_staging_lane_and_slot(store, "cpu", fused=True))
"""


def test_fused_kernel_is_bit_identical_in_tritons_interpreter(stores, tmp_path):
    """The one-launch kernel (pipeline/fused_decode.py) on the CPU, where Triton is installed:
    its interpreter runs the same program on CPU tensors. Without Triton (CI) the GPU test
    above covers it."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", FUSED_ON_CPU, str(stores["mxfp4"].root)], capture_output=True,
                       text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip().splitlines()[-1]) >= 5 * 4


def test_fused_decode_off_by_switch_or_without_cuda(stores, monkeypatch):
    from pipeline import fused_decode

    assert not VramArena(stores["mxfp4"], 2, "cpu").fused_decode or fused_decode._INTERPRETED
    monkeypatch.setenv("MOE_CACHE_FUSED_DECODE", "0")
    assert not fused_decode.available("cuda")


def test_scratch_is_counted_in_the_arena_and_only_mxfp4_has_a_decoder(stores):
    mx = VramArena(stores["mxfp4"], 2, "cpu")
    assert mx.decoder is not None and mx.decoder.nbytes == scratch_bytes(stores["mxfp4"], DECODE_LANES) > 0
    assert mx.nbytes == 2 * mx.slot_bytes + mx.num_staging * mx.read_length + mx.decoder.nbytes
    assert VramArena(stores["bfloat16"], 2, "cpu").decoder is None
    with pytest.raises(ValueError, match="mxfp4"):
        SlotDecoder(VramArena(stores["bfloat16"], 2, "cpu"))


def test_fused_kernel_compiles_for_hopper():
    """Triton's front end and ptxas run without a GPU: the kernel must build for sm_90 (the
    interpreter above runs Python semantics and misses typing errors that only compiling finds)."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pipeline.fused_decode import COMPILE_OPTIONS, _decode_expert

    sig = {"staging": "*u8", "slot8": "*u8", "slot32": "*i32", "table": "*i32", "desc": "*i64",
           "NSEG": "constexpr", "GROUPS": "constexpr"}
    src = ASTSource(fn=_decode_expert, signature=sig, constexprs={"NSEG": 4, "GROUPS": 64})
    assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32), options=COMPILE_OPTIONS).asm


def test_fused_decode_refuses_what_it_cannot_decode(stores):
    from pipeline.fused_decode import FusedDecode

    with pytest.raises(ValueError, match="FusedDecode needs an mxfp4 store.*bfloat16"):
        FusedDecode(VramArena(stores["bfloat16"], 2, "cpu"))
