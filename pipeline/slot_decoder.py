"""MXFP4 staging buffer -> VRAM slot, with every view and temporary prepared once.

    SlotDecoder(arena, lanes=2)
      decode(k, slot, lane)    decode staging buffer k into slot `slot` (enqueued on the
                               current stream on CUDA; done on return on the CPU)
      nbytes                   device bytes of its scratch
    scratch_bytes(store, lanes) -> int   the same, before building one (budget checks)

On CUDA with Triton the arena uses pipeline.fused_decode.FusedDecode instead: the same
decode(k, slot, lane) in one launch per expert, with no scratch.

Why: the general decode (`StoreCheckpoint.decode_from_buffer` -> `mxfp4_decode_into`) slices
and views the buffer, checks shapes and allocates its index temporaries on every call, about
25 Python-level torch calls per expert. In a decode loop that misses often, that host time,
not the copy, was the cost of a miss (a profile on an H100: most of `fetch` was there). Here
the typed views of each staging buffer are built once, the index temporaries are scratch
buffers per *lane* (one lane per stream that decodes, so decodes on one stream reuse its
scratch in stream order, and decodes on two streams never share one), and one MXFP4 tensor
costs three kernels: scales -> int32, blocks + 256 * scales -> index, one table gather. The
arithmetic is the general decode's, so the bytes are identical (tests compare them).
"""
from __future__ import annotations

import math

import torch

from adapters.base import TORCH_DTYPES
from adapters.mxfp4 import _table


def _most_groups(store) -> int:
    """The largest MXFP4 tensor's number of 32-value groups: what the scratch must hold."""
    return max((math.prod(t.shape[:-1]) for t in store.index.expert_tensors if t.role.endswith(".blocks")),
               default=0)


def scratch_bytes(store, lanes: int) -> int:
    """Device bytes of a SlotDecoder's scratch: per lane an int32 per group and per byte."""
    return lanes * _most_groups(store) * 17 * 4


class SlotDecoder:
    def __init__(self, arena, lanes: int = 2):
        store, device = arena.store, arena.device
        if store.dtype != "mxfp4":
            raise ValueError(f"SlotDecoder decodes mxfp4 stores; this one is {store.dtype}")
        if lanes < 1:
            raise ValueError(f"SlotDecoder needs at least one lane, got {lanes}")
        self._arena = arena
        self.lanes = lanes
        self.nbytes = scratch_bytes(store, lanes)
        self._table = _table(device)
        # Per staging buffer, each dense tensor's source views, made once.
        self._steps = [self._steps_for(arena.staging(k), store) for k in range(arena.num_staging)]
        most_groups = _most_groups(store)
        self._sidx = [torch.empty(most_groups, dtype=torch.int32, device=device) for _ in range(lanes)]
        self._idx = [torch.empty(most_groups * 16, dtype=torch.int32, device=device) for _ in range(lanes)]

    @staticmethod
    def _steps_for(staging: torch.Tensor, store) -> list[tuple]:
        """(dense role, source view, scales view or None) per dense tensor of the expert."""
        layout = {t.role: t for t in store.index.experts[0].tensors}  # offsets inside an expert
        steps = []
        for dense, stored, scales in store.dense_layout:
            t = layout[stored]
            src = staging[t.offset:t.offset + t.nbytes]
            if scales is None:  # stored as is (e.g. bf16 biases): one copy
                steps.append((dense, src.view(TORCH_DTYPES[t.dtype]).view(t.shape), None))
                continue
            *lead, g, sixteen = t.shape
            rows, s = math.prod(lead), layout[scales]
            steps.append((dense, src.view(rows, g, sixteen), staging[s.offset:s.offset + s.nbytes].view(rows, g)))
        return steps

    def decode(self, k: int, slot: int, lane: int) -> None:
        out = self._arena.tensors(slot)
        sidx_all, idx_all = self._sidx[lane], self._idx[lane]
        for dense, src, scales in self._steps[k]:
            if scales is None:
                out[dense].copy_(src)
                continue
            rows, g, _ = src.shape
            sidx = sidx_all[:rows * g].view(rows, g, 1)
            sidx.copy_(scales.view(rows, g, 1))
            idx = idx_all[:rows * g * 16].view(rows, g, 16)
            torch.add(src, sidx, alpha=256, out=idx)
            torch.index_select(self._table, 0, idx.view(-1), out=out[dense].view(-1, 2))


__all__ = ["SlotDecoder", "scratch_bytes"]
