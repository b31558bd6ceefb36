"""GPT-OSS original checkpoints (`original/config.json` + `original/*.safetensors`), MXFP4 experts.

Per MoE block l the experts are stacked on dim 0 of six tensors, so expert e of each is
one contiguous slice (offset + e * bytes / E):
  block.{l}.mlp.mlp1_weight.blocks U8 [E, 2I, H/32, 16]   .scales U8 [E, 2I, H/32]
  block.{l}.mlp.mlp1_bias BF16 [E, 2I]
  block.{l}.mlp.mlp2_weight.blocks U8 [E, H, I/32, 16]    .scales U8 [E, H, I/32]
  block.{l}.mlp.mlp2_bias BF16 [E, H]
The router (`block.{l}.mlp.gate.weight/.bias`) is not part of an expert.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .base import Checkpoint, Raw, TensorIndex, bytes_as, config_int, read_config
from .errors import CheckpointError
from .mxfp4 import mxfp4_decode_into
from .registry import register
from .spec import ExpertLocation, ModelSpec, TensorSpec

ROLES = ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp1_bias",
         "mlp2_weight.blocks", "mlp2_weight.scales", "mlp2_bias")


def expert_tensors(hidden: int, inter: int) -> tuple[TensorSpec, ...]:
    """One GPT-OSS expert as stored (the stacked tensors without their leading E)."""
    return (
        TensorSpec("mlp1_weight.blocks", "U8", (2 * inter, hidden // 32, 16)),
        TensorSpec("mlp1_weight.scales", "U8", (2 * inter, hidden // 32)),
        TensorSpec("mlp1_bias", "BF16", (2 * inter,)),
        TensorSpec("mlp2_weight.blocks", "U8", (hidden, inter // 32, 16)),
        TensorSpec("mlp2_weight.scales", "U8", (hidden, inter // 32)),
        TensorSpec("mlp2_bias", "BF16", (hidden,)),
    )


def tensor_name(layer_id: int, role: str) -> str:
    return f"block.{layer_id}.mlp.{role}"


@register("gpt-oss")
class GptOssCheckpoint(Checkpoint):
    looks_for = "original/config.json with original/*.safetensors"

    @classmethod
    def detect(cls, path: Path) -> bool:
        orig = Path(path) / "original"
        return orig.is_dir() and (orig / "config.json").exists() and any(orig.glob("*.safetensors"))

    def __init__(self, path: str | Path):
        self.root = Path(path)
        orig = self.root / "original"
        cfg_path = orig / "config.json"
        cfg = read_config(cfg_path)
        layers = config_int(cfg, cfg_path, "num_hidden_layers")
        experts = config_int(cfg, cfg_path, "num_experts")
        top_k = config_int(cfg, cfg_path, "experts_per_token")
        hidden = config_int(cfg, cfg_path, "hidden_size")
        inter = config_int(cfg, cfg_path, "intermediate_size")
        if hidden % 32 or inter % 32:
            raise CheckpointError(cfg_path, f"hidden_size {hidden} and intermediate_size {inter} must be "
                                  "multiples of 32 for MXFP4 blocks")
        files = sorted(str(p.relative_to(self.root)) for p in orig.glob("*.safetensors"))
        if not files:
            raise CheckpointError(orig, "no *.safetensors files", fix="copy the model's original/ weights")
        self.index = TensorIndex(self.root, files)
        per_expert = expert_tensors(hidden, inter)
        self.spec = ModelSpec(family="gpt-oss", format="gpt-oss", num_layers=layers, num_experts=experts,
                              top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                              layer_ids=tuple(range(layers)), expert_tensors=per_expert)
        self.swiglu_limit = float(cfg.get("swiglu_limit", 7.0))
        for l in range(layers):
            for t in per_expert:
                self.index.get(tensor_name(l, t.role), dtypes=(t.dtype,), shape=(experts, *t.shape))

    def locate(self, layer: int, expert: int) -> ExpertLocation:
        self.check_index(layer, expert)
        lid = self.spec.layer_ids[layer]
        ranges = tuple(self.index.expert_slice(t.role, tensor_name(lid, t.role), expert, self.spec.num_experts)
                       for t in self.spec.expert_tensors)
        return ExpertLocation(layer, expert, ranges)

    def decode(self, raw: Raw, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """mlp1_weight [2I, H], mlp1_bias [2I], mlp2_weight [H, I], mlp2_bias [H], all bf16 on `device`."""
        return decode_gpt_oss(raw, self.spec.hidden_size, self.spec.intermediate_size, device)


def decode_gpt_oss(raw: Raw, hidden: int, inter: int, device: str | torch.device = "cpu",
                   out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Decode one GPT-OSS expert's stored tensors (by role); into `out`'s tensors when given."""
    device = torch.device(device)
    t = {s.role: bytes_as(raw[s.role], s.dtype, s.shape, device, s.role) for s in expert_tensors(hidden, inter)}
    if out is None:
        out = {"mlp1_weight": torch.empty((2 * inter, hidden), dtype=torch.bfloat16, device=device),
               "mlp2_weight": torch.empty((hidden, inter), dtype=torch.bfloat16, device=device),
               "mlp1_bias": torch.empty((2 * inter,), dtype=torch.bfloat16, device=device),
               "mlp2_bias": torch.empty((hidden,), dtype=torch.bfloat16, device=device)}
    mxfp4_decode_into(out["mlp1_weight"], t["mlp1_weight.blocks"], t["mlp1_weight.scales"])
    mxfp4_decode_into(out["mlp2_weight"], t["mlp2_weight.blocks"], t["mlp2_weight.scales"])
    out["mlp1_bias"].copy_(t["mlp1_bias"])
    out["mlp2_bias"].copy_(t["mlp2_bias"])
    return out
