"""Hugging Face checkpoints with one set of tensors per expert: Mixtral and the Qwen-MoE family.

  mixtral : model.layers.{l}.block_sparse_moe.experts.{e}.w1/w2/w3.weight  (router: .gate.weight)
  qwen-moe: model.layers.{l}.mlp.experts.{e}.gate_proj/up_proj/down_proj.weight
            (Qwen2-MoE, OLMoE, DeepSeek: shared experts and dense layers are not routed
            experts and are left out; `layer_ids` lists the MoE layers only)

Weights are `model.safetensors` or shards listed in `model.safetensors.index.json`
(`weight_map`); one expert's tensors may lie in different shards. Dtypes as stored.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .base import Checkpoint, Raw, TensorIndex, bytes_as, config_int, read_config
from .errors import CheckpointError
from .registry import register
from .safetensors_io import read_header
from .spec import ExpertLocation, ModelSpec, TensorSpec

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DENSE_DTYPES = ("BF16", "F16", "F32")


def weight_names(root: Path) -> set[str]:
    """Tensor names of an HF directory, cheaply and without raising (for `detect`)."""
    try:
        if (root / INDEX_NAME).is_file():
            wm = json.loads((root / INDEX_NAME).read_text(encoding="utf-8")).get("weight_map")
            return set(wm) if isinstance(wm, dict) else set()
        if (root / SINGLE_NAME).is_file():
            return set(read_header(root / SINGLE_NAME).tensors)
    except (OSError, ValueError, AttributeError):  # CheckpointError and JSON errors are ValueErrors
        pass
    return set()


def open_hf_index(root: Path) -> TensorIndex:
    """Every tensor of an HF directory; the index's `weight_map` is checked against the shards."""
    ipath = root / INDEX_NAME
    if ipath.is_file():
        try:
            wm = json.loads(ipath.read_text(encoding="utf-8")).get("weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(ipath, f"not a valid index ({e})", fix="restore the model's index file") from None
        if not isinstance(wm, dict) or not all(isinstance(v, str) and "/" not in v for v in wm.values()):
            raise CheckpointError(ipath, "weight_map must map tensor names to shard file names in this directory")
        files = sorted(set(wm.values()))
        for f in files:
            if not (root / f).is_file():
                raise CheckpointError(root / f, "shard listed in the index is missing", fix="download every shard")
        index = TensorIndex(root, files)
        for name, f in wm.items():
            if name in index and index.entries[name][0] != f:
                raise CheckpointError(ipath, f"says {f} but the tensor is in {index.entries[name][0]}", tensor=name,
                                      fix="the index does not match its shards; restore it")
        return index
    if (root / SINGLE_NAME).is_file():
        return TensorIndex(root, [SINGLE_NAME])
    raise CheckpointError(root, f"neither {INDEX_NAME} nor {SINGLE_NAME}", fix="download the model's weights")


class _PerExpertCheckpoint(Checkpoint):
    family = ""
    roles: tuple[str, ...] = ()
    marker = ""  # substring of an expert tensor name that identifies the format

    @classmethod
    def detect(cls, path: Path) -> bool:
        return any(cls.marker in n for n in weight_names(Path(path)))

    def _name(self, layer_id: int, expert: int, role: str) -> str:
        raise NotImplementedError

    def _shapes(self, hidden: int, inter: int) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def _open(self, path: str | Path, num_experts_keys: tuple[str, ...], inter_keys: tuple[str, ...]) -> dict:
        self.root = Path(path)
        cfg_path = self.root / "config.json"
        cfg = read_config(cfg_path)
        layers = config_int(cfg, cfg_path, "num_hidden_layers")
        experts = config_int(cfg, cfg_path, *num_experts_keys)
        top_k = config_int(cfg, cfg_path, "num_experts_per_tok")
        hidden = config_int(cfg, cfg_path, "hidden_size")
        inter = config_int(cfg, cfg_path, *inter_keys)
        self.index = open_hf_index(self.root)
        layer_ids = self._moe_layers(layers)
        if not layer_ids:
            raise CheckpointError(self.root, f"no routed-expert tensors ({self.marker}...) in any of {layers} layers",
                                  fix=f"not a {self.format_name} checkpoint; pass the right --format")
        shapes = self._shapes(hidden, inter)
        first = self.index.get(self._name(layer_ids[0], 0, self.roles[0]), dtypes=DENSE_DTYPES)[1]
        self.spec = ModelSpec(family=self.family, format=self.format_name, num_layers=len(layer_ids),
                              num_experts=experts, top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                              layer_ids=tuple(layer_ids),
                              expert_tensors=tuple(TensorSpec(r, first.dtype, shapes[r]) for r in self.roles))
        self._check_experts(experts)
        return cfg

    def _moe_layers(self, layers: int) -> list[int]:
        return list(range(layers))

    def _check_experts(self, experts: int) -> None:
        """Every expert tensor present with the config's shape and one dtype; none beyond E."""
        for lid in self.spec.layer_ids:
            for e in range(experts):
                for t in self.spec.expert_tensors:
                    self.index.get(self._name(lid, e, t.role), dtypes=(t.dtype,), shape=t.shape)
            extra = self._name(lid, experts, self.roles[0])
            if extra in self.index:
                raise CheckpointError(self.root / self.index.entries[extra][0], f"expert {experts} exists but "
                                      f"config.json says {experts} experts", tensor=extra)

    def locate(self, layer: int, expert: int) -> ExpertLocation:
        self.check_index(layer, expert)
        lid = self.spec.layer_ids[layer]
        return ExpertLocation(layer, expert, tuple(self.index.whole(t.role, self._name(lid, expert, t.role))
                                                   for t in self.spec.expert_tensors))

    def decode(self, raw: Raw, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The stored tensors themselves (dense already), by role, on `device`."""
        return {t.role: bytes_as(raw[t.role], t.dtype, t.shape, device, t.role) for t in self.spec.expert_tensors}


@register("mixtral")
class MixtralCheckpoint(_PerExpertCheckpoint):
    looks_for = "config.json with model.layers.*.block_sparse_moe.experts.* tensors"
    family = "mixtral"
    # w1 (gate) beside w3 (up): in a store they are then one [2I, H] range, transformers' gate_up_proj
    roles = ("w1", "w3", "w2")
    marker = ".block_sparse_moe.experts."

    def __init__(self, path: str | Path):
        self._open(path, ("num_local_experts", "num_experts"), ("intermediate_size",))

    def _name(self, layer_id: int, expert: int, role: str) -> str:
        return f"model.layers.{layer_id}.block_sparse_moe.experts.{expert}.{role}.weight"

    def _shapes(self, hidden: int, inter: int) -> dict[str, tuple[int, int]]:
        return {"w1": (inter, hidden), "w2": (hidden, inter), "w3": (inter, hidden)}


_QWEN_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.\d+\.gate_proj\.weight$")


@register("qwen-moe")
class QwenMoeCheckpoint(_PerExpertCheckpoint):
    looks_for = "config.json with model.layers.*.mlp.experts.N.gate_proj tensors"
    family = "qwen-moe"
    roles = ("gate_proj", "up_proj", "down_proj")
    marker = ".mlp.experts.0.gate_proj."

    def __init__(self, path: str | Path):
        self._open(path, ("num_experts", "n_routed_experts", "num_local_experts"),
                   ("moe_intermediate_size", "intermediate_size"))

    def _name(self, layer_id: int, expert: int, role: str) -> str:
        return f"model.layers.{layer_id}.mlp.experts.{expert}.{role}.weight"

    def _shapes(self, hidden: int, inter: int) -> dict[str, tuple[int, int]]:
        return {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}

    def _moe_layers(self, layers: int) -> list[int]:
        # A layer is MoE when it has routed experts; a dense layer (DeepSeek's
        # first_k_dense_replace, Qwen's mlp_only_layers) has mlp.gate_proj instead.
        # Shared experts (mlp.shared_expert(s).*) never match the routed-expert pattern.
        moe = {int(m.group(1)) for n in self.index.names() if (m := _QWEN_EXPERT.match(n))}
        for l in range(layers):
            if l not in moe and f"model.layers.{l}.mlp.gate_proj.weight" not in self.index:
                raise CheckpointError(self.root, f"layer {l} has neither routed experts nor a dense MLP",
                                      tensor=f"model.layers.{l}.mlp.experts.0.gate_proj.weight",
                                      fix="the checkpoint is incomplete or num_hidden_layers is wrong")
        beyond = sorted(l for l in moe if l >= layers)
        if beyond:
            raise CheckpointError(self.root / "config.json", f"num_hidden_layers is {layers} but layer {beyond[0]} "
                                  "has experts", fix="config.json and weights disagree")
        return sorted(moe)
