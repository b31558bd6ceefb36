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

import torch

from .base import Raw
from .errors import CheckpointError
from .gpt_oss import decode_gpt_oss, expert_tensors
from .hf_fused import StackedHfCheckpoint
from .registry import register
from .spec import TensorSpec

# The store's role (adapters.gpt_oss) -> the tensor's suffix in this layout.
SUFFIX = {"mlp1_weight.blocks": "gate_up_proj_blocks", "mlp1_weight.scales": "gate_up_proj_scales",
          "mlp1_bias": "gate_up_proj_bias", "mlp2_weight.blocks": "down_proj_blocks",
          "mlp2_weight.scales": "down_proj_scales", "mlp2_bias": "down_proj_bias"}
_BLOCKS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj_blocks$")


def tensor_name(layer_id: int, role: str) -> str:
    return f"model.layers.{layer_id}.mlp.experts.{SUFFIX[role]}"


@register("gpt-oss-hf")
class GptOssHfCheckpoint(StackedHfCheckpoint):
    looks_for = "config.json with model.layers.*.mlp.experts.gate_up_proj_blocks tensors"
    family = "gpt-oss"
    _first = _BLOCKS

    tensor_name = staticmethod(tensor_name)

    def _expert_tensors(self, hidden: int, inter: int) -> tuple[TensorSpec, ...]:
        if hidden % 32 or inter % 32:
            raise CheckpointError(self.root / "config.json", f"hidden_size {hidden} and intermediate_size {inter} "
                                  "must be multiples of 32 for MXFP4 blocks")
        return expert_tensors(hidden, inter)

    def decode(self, raw: Raw, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """mlp1_weight [2I, H], mlp1_bias [2I], mlp2_weight [H, I], mlp2_bias [H], all bf16 on `device`."""
        return decode_gpt_oss(raw, self.spec.hidden_size, self.spec.intermediate_size, device)
