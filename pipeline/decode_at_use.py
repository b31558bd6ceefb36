"""Experts kept in VRAM in their stored MXFP4 form, decoded at use into a few dense views.

    DecodeAtUse(arena, num_views)       `arena`: a VramArena whose slots hold stored bytes
      decode(slot, j) -> {role: view}   enqueue on the current stream: slot's stored bytes ->
                                        dense view j (done on return on the CPU); view j's tensors
      decode_many(slots, first=0)       slots[e] -> view first + e for each e; one launch per 8
                                        experts on CUDA with Triton (pipeline.fused_decode.BatchDecode)
      tensors(j) -> {role: view}        view j's tensors, without decoding
      num_views, view_bytes, nbytes
    view_bytes_for(store, num_views) -> int   device bytes of the views (budget checks)

Why: an MXFP4 expert's stored bytes are 3.8x smaller than its dense bf16 tensors (GPT-OSS-20B
dims: 13.2 vs 49.8 MB). When the decode loop waits on the link, the VRAM budget is worth the
hits it buys, and the same bytes hold 3.8x as many experts in the stored form (the simulator
on the qwen1.5 trace at RAM 100%: VRAM loads fall from 59120 at 144 experts to 35038 at the
525 that fit instead). The price is one decode per *use* rather than per copy: a kernel that
reads 13 MB and writes 50 MB, tens of microseconds on an H100. Only the views are dense: one
per expert of one fetch, overwritten by the next fetch's decodes on the same stream, which is
why a fetch's tensors are valid until the next fetch (the pipeline's contract anyway).

The decoders are the copy engine's (pipeline/fused_decode.py, pipeline/slot_decoder.py),
pointed at other buffers: their staging buffers are this arena's slots, their slots are the
views. So the bytes written are the same as a copy-time decode's (tests compare them).
"""
from __future__ import annotations

import torch

from . import fused_decode
from .slot_decoder import SlotDecoder, scratch_bytes


class _Targets:
    """The part of an arena a decoder reads: sources `staging(k)` (here the VRAM slots, holding
    stored bytes) and destinations `raw_view(j)` / `tensors(j)` (here the dense views)."""

    def __init__(self, arena, views: list[torch.Tensor], tensors: list[dict[str, torch.Tensor]]):
        self.store, self.device = arena.store, arena.device
        self.num_staging, self.staging = arena.num_slots, arena.raw_view
        self.num_slots = len(views)
        self._views, self._tensors = views, tensors

    def raw_view(self, j: int) -> torch.Tensor:
        return self._views[j]

    def tensors(self, j: int) -> dict[str, torch.Tensor]:
        return self._tensors[j]


def view_bytes_for(store, num_views: int) -> int:
    """Device bytes of `num_views` dense views plus the torch decode's scratch (one lane).
    The scratch is counted even where the fused decode needs none: a budget must not depend
    on whether Triton is installed. No views (0): nothing."""
    from .vram_arena import VramArena

    if num_views == 0:
        return 0
    return num_views * VramArena.slot_bytes_for(store, "dense") + scratch_bytes(store, 1)


class DecodeAtUse:
    def __init__(self, arena, num_views: int):
        from .vram_arena import dense_slot_tensors

        if arena.store.dtype != "mxfp4":
            raise ValueError(f"decode at use needs an mxfp4 store; this one is {arena.store.dtype}")
        if num_views < 1:
            raise ValueError(f"decode at use needs at least one dense view, got {num_views}")
        store = arena.store
        self.num_views = int(num_views)
        self.view_bytes = arena.slot_bytes_for(store, "dense")
        self._buf = torch.empty(self.num_views * self.view_bytes, dtype=torch.uint8, device=arena.device)
        views = [self._buf[j * self.view_bytes:(j + 1) * self.view_bytes] for j in range(self.num_views)]
        self._tensors = [dense_slot_tensors(store, v) for v in views]
        self._batch = self._decoder = None
        if fused_decode.supports(store, arena.device):  # one launch per 8 experts, no scratch
            self._batch = fused_decode.BatchDecode(store, arena.buffer, arena.slot_bytes, self._buf,
                                                   self.view_bytes)
            self.decode_many([0] * self.num_views)  # compile now, not inside the first fetch
            if arena.device.type == "cuda":
                torch.cuda.current_stream(arena.device).synchronize()
        else:  # the torch decode, expert by expert
            self._decoder = SlotDecoder(_Targets(arena, views, self._tensors), lanes=1)
        self.nbytes = self.num_views * self.view_bytes + (self._decoder.nbytes if self._decoder else 0)

    def decode(self, slot: int, j: int) -> dict[str, torch.Tensor]:
        return self.decode_many([slot], j)[0]

    def decode_many(self, slots, first: int = 0) -> list[dict[str, torch.Tensor]]:
        """slots[e] -> view first + e; returns those views' tensors in that order."""
        n = len(slots)
        if first < 0 or first + n > self.num_views:
            raise IndexError(f"{n} experts into dense views {first}.. of {self.num_views}")
        if self._batch is None:
            for e, slot in enumerate(slots):
                self._decoder.decode(slot, first + e, 0)
        else:
            for at in range(0, n, fused_decode.BATCH):
                self._batch(slots[at:at + fused_decode.BATCH], first + at)
        return self._tensors[first:first + n]

    def tensors(self, j: int) -> dict[str, torch.Tensor]:
        """View j's tensors (what the last decode into it wrote)."""
        return self._tensors[j]

    def close(self) -> None:
        self._buf = self._decoder = self._batch = None
        self._tensors = []


__all__ = ["DecodeAtUse", "view_bytes_for"]
