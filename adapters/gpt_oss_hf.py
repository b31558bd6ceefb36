"""GPT-OSS as its Hugging Face download's main folder ships it: MXFP4 experts stacked per layer.

  model.layers.{l}.mlp.experts.gate_up_proj_blocks U8 [E, 2I, H/32, 16]  .gate_up_proj_scales U8 [E, 2I, H/32]
  model.layers.{l}.mlp.experts.gate_up_proj_bias BF16 [E, 2I]
  model.layers.{l}.mlp.experts.down_proj_blocks U8 [E, H, I/32, 16]      .down_proj_scales U8 [E, H, I/32]
  model.layers.{l}.mlp.experts.down_proj_bias BF16 [E, H]
(config.json: num_local_experts, num_experts_per_tok, quantization_config.quant_method "mxfp4").
The bytes are those of `original/` under other names (gate_up = mlp1, rows interleaved gate/linear;
down = mlp2), so an expert is read into the same roles as `adapters.gpt_oss` and packs into an
MXFP4 store without dequantizing.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .base import Checkpoint, Raw, config_int, read_config
from .errors import CheckpointError
from .gpt_oss import decode_gpt_oss, expert_tensors
from .hf_experts import open_hf_index, weight_names
from .registry import register
from .spec import ExpertLocation, ModelSpec

# The store's role (adapters.gpt_oss) -> the tensor's suffix in this layout.
SUFFIX = {"mlp1_weight.blocks": "gate_up_proj_blocks", "mlp1_weight.scales": "gate_up_proj_scales",
          "mlp1_bias": "gate_up_proj_bias", "mlp2_weight.blocks": "down_proj_blocks",
          "mlp2_weight.scales": "down_proj_scales", "mlp2_bias": "down_proj_bias"}
_BLOCKS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj_blocks$")


def tensor_name(layer_id: int, role: str) -> str:
    return f"model.layers.{layer_id}.mlp.experts.{SUFFIX[role]}"


@register("gpt-oss-hf")
class GptOssHfCheckpoint(Checkpoint):
    looks_for = "config.json with model.layers.*.mlp.experts.gate_up_proj_blocks tensors"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return any(_BLOCKS.match(n) for n in weight_names(Path(path)))

    def __init__(self, path: str | Path):
        self.root = Path(path)
        cfg_path = self.root / "config.json"
        cfg = read_config(cfg_path)
        layers = config_int(cfg, cfg_path, "num_hidden_layers")
        experts = config_int(cfg, cfg_path, "num_local_experts", "num_experts")
        top_k = config_int(cfg, cfg_path, "num_experts_per_tok", "experts_per_token")
        hidden = config_int(cfg, cfg_path, "hidden_size")
        inter = config_int(cfg, cfg_path, "intermediate_size")
        if hidden % 32 or inter % 32:
            raise CheckpointError(cfg_path, f"hidden_size {hidden} and intermediate_size {inter} must be "
                                  "multiples of 32 for MXFP4 blocks")
        self.index = open_hf_index(self.root)
        per_expert = expert_tensors(hidden, inter)
        self.spec = ModelSpec(family="gpt-oss", format="gpt-oss-hf", num_layers=layers, num_experts=experts,
                              top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                              layer_ids=tuple(range(layers)), expert_tensors=per_expert)
        self.swiglu_limit = float(cfg.get("swiglu_limit", 7.0))
        for l in range(layers):
            for t in per_expert:
                self.index.get(tensor_name(l, t.role), dtypes=(t.dtype,), shape=(experts, *t.shape))
        beyond = sorted(int(m.group(1)) for n in self.index.names() if (m := _BLOCKS.match(n)) and int(m.group(1)) >= layers)
        if beyond:
            raise CheckpointError(cfg_path, f"num_hidden_layers is {layers} but layer {beyond[0]} has experts",
                                  fix="config.json and weights disagree")

    def locate(self, layer: int, expert: int) -> ExpertLocation:
        self.check_index(layer, expert)
        lid = self.spec.layer_ids[layer]
        return ExpertLocation(layer, expert, tuple(
            self.index.expert_slice(t.role, tensor_name(lid, t.role), expert, self.spec.num_experts)
            for t in self.spec.expert_tensors))

    def decode(self, raw: Raw, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """mlp1_weight [2I, H], mlp1_bias [2I], mlp2_weight [H, I], mlp2_bias [H], all bf16 on `device`."""
        return decode_gpt_oss(raw, self.spec.hidden_size, self.spec.intermediate_size, device)
