"""Hugging Face fused-expert layout (transformers' GPT-OSS bf16 form): experts stacked on dim 0.

  model.layers.{l}.mlp.experts.gate_up_proj       [E, H, 2I]
  model.layers.{l}.mlp.experts.gate_up_proj_bias  [E, 2I]
  model.layers.{l}.mlp.experts.down_proj          [E, I, H]
  model.layers.{l}.mlp.experts.down_proj_bias     [E, H]
Expert e is slice e of each: one contiguous byte range per tensor. Dtypes as stored.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .base import Checkpoint, Raw, bytes_as, config_int, read_config
from .errors import CheckpointError
from .hf_experts import DENSE_DTYPES, open_hf_index, weight_names
from .registry import register
from .spec import ExpertLocation, ModelSpec, TensorSpec

ROLES = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj$")


def tensor_name(layer_id: int, role: str) -> str:
    return f"model.layers.{layer_id}.mlp.experts.{role}"


class StackedHfCheckpoint(Checkpoint):
    """An HF folder whose experts are stacked on dim 0 of a few tensors per MoE layer (every layer
    is MoE). A subclass names its tensors (`tensor_name`), its experts' tensors (`_expert_tensors`),
    the pattern of its first tensor (`_first`: detection and the layer check) and its decode."""

    family = ""
    _first: re.Pattern

    @classmethod
    def detect(cls, path: Path) -> bool:
        return any(cls._first.match(n) for n in weight_names(Path(path)))

    @staticmethod
    def tensor_name(layer_id: int, role: str) -> str:
        raise NotImplementedError

    def _expert_tensors(self, hidden: int, inter: int) -> tuple[TensorSpec, ...]:
        raise NotImplementedError

    def __init__(self, path: str | Path):
        self.root = Path(path)
        cfg_path = self.root / "config.json"
        cfg = read_config(cfg_path)
        layers = config_int(cfg, cfg_path, "num_hidden_layers")
        experts = config_int(cfg, cfg_path, "num_local_experts", "num_experts")
        top_k = config_int(cfg, cfg_path, "num_experts_per_tok", "experts_per_token")
        hidden = config_int(cfg, cfg_path, "hidden_size")
        inter = config_int(cfg, cfg_path, "intermediate_size")
        self.config = cfg
        self.index = open_hf_index(self.root)
        per_expert = self._expert_tensors(hidden, inter)
        # Every layer of these families is MoE; a missing one is reported by the checks below.
        self.spec = ModelSpec(family=self.family, format=self.format_name, num_layers=layers, num_experts=experts,
                              top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                              layer_ids=tuple(range(layers)), expert_tensors=per_expert)
        for l in range(layers):
            for t in per_expert:
                self.index.get(self.tensor_name(l, t.role), dtypes=(t.dtype,), shape=(experts, *t.shape))
        beyond = sorted(int(m.group(1)) for n in self.index.names()
                        if (m := self._first.match(n)) and int(m.group(1)) >= layers)
        if beyond:
            raise CheckpointError(cfg_path, f"num_hidden_layers is {layers} but layer {beyond[0]} has experts",
                                  fix="config.json and weights disagree")

    def locate(self, layer: int, expert: int) -> ExpertLocation:
        self.check_index(layer, expert)
        lid = self.spec.layer_ids[layer]
        return ExpertLocation(layer, expert, tuple(
            self.index.expert_slice(t.role, self.tensor_name(lid, t.role), expert, self.spec.num_experts)
            for t in self.spec.expert_tensors))


@register("fused")
class FusedCheckpoint(StackedHfCheckpoint):
    looks_for = "config.json with model.layers.*.mlp.experts.gate_up_proj tensors"
    family = "fused"
    _first = _FUSED

    tensor_name = staticmethod(tensor_name)

    def _expert_tensors(self, hidden: int, inter: int) -> tuple[TensorSpec, ...]:
        first = self.index.get(tensor_name(0, "gate_up_proj"), dtypes=DENSE_DTYPES)[1]
        shapes = {"gate_up_proj": (hidden, 2 * inter), "gate_up_proj_bias": (2 * inter,),
                  "down_proj": (inter, hidden), "down_proj_bias": (hidden,)}
        return tuple(TensorSpec(r, first.dtype, shapes[r]) for r in ROLES)

    def decode(self, raw: Raw, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """gate_up_proj [H, 2I], gate_up_proj_bias [2I], down_proj [I, H], down_proj_bias [H] as stored."""
        return {t.role: bytes_as(raw[t.role], t.dtype, t.shape, device, t.role) for t in self.spec.expert_tensors}
