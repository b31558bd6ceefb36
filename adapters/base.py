"""The one interface every checkpoint format implements.

A `Checkpoint` describes the model (`spec`), says where each expert's tensors lie
(`locate`: exact byte ranges, so a reader can fetch them with plain positional reads),
and turns those bytes into torch tensors (`decode`). `load_expert` is the two together.

Decoded ("dense") roles per family, the form every store dtype decodes to:
  gpt-oss : mlp1_weight [2I, H], mlp1_bias [2I], mlp2_weight [H, I], mlp2_bias [H]  (bf16)
  mixtral : w1 [I, H], w2 [H, I], w3 [I, H]
  qwen-moe: gate_proj [I, H], up_proj [I, H], down_proj [H, I]
  fused   : gate_up_proj [H, 2I], gate_up_proj_bias [2I], down_proj [I, H], down_proj_bias [H]
"""
from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Mapping

import torch

from .spec import ExpertLocation, ModelSpec

Raw = Mapping[str, "bytes | bytearray | memoryview | torch.Tensor"]


class Checkpoint(abc.ABC):
    root: Path
    spec: ModelSpec

    @abc.abstractmethod
    def locate(self, layer: int, expert: int) -> ExpertLocation:
        """Byte ranges of every tensor of one expert; raises IndexError naming valid ranges."""

    @abc.abstractmethod
    def decode(self, raw: Raw, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Turn one expert's raw tensor bytes (by role) into its dense tensors on `device`."""

    def read_raw(self, layer: int, expert: int) -> dict[str, bytes]:
        """Read one expert's tensors with positional reads (no mmap, no pickle)."""
        loc = self.locate(layer, expert)
        out: dict[str, bytes] = {}
        for r in loc.ranges:
            fd = os.open(self.root / r.file, os.O_RDONLY)
            try:
                data = os.pread(fd, r.length, r.offset)
            finally:
                os.close(fd)
            if len(data) != r.length:
                from .errors import CheckpointError

                raise CheckpointError(self.root / r.file, f"short read of expert {layer}/{expert}: "
                                      f"{len(data)} of {r.length} bytes", tensor=r.role,
                                      fix="the file is truncated; re-create it")
            out[r.role] = data
        return out

    def load_expert(self, layer: int, expert: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return self.decode(self.read_raw(layer, expert), device)

    def check_index(self, layer: int, expert: int) -> None:
        s = self.spec
        if not (0 <= layer < s.num_layers and 0 <= expert < s.num_experts):
            raise IndexError(f"expert {layer}/{expert} out of range: {s.num_layers} MoE layers x "
                             f"{s.num_experts} experts in {self.root}")
