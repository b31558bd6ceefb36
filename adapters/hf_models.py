"""Transformers MoE architectures as their checkpoints ship them: the table, and synthetic ones.

    ARCHS[model_type] -> Arch          how that architecture's routed experts are laid out in a
                                       published checkpoint (and so which adapter reads them)
    arch_of(model_type) -> Arch        the same, with a one-line error listing the supported ones
    hf_config(arch, dims) -> config    a transformers config at these dimensions
    plan_hf(arch, dims) -> (sub, config dict, tensors)   every tensor of the checkpoint, in file
                                       order, for `synthetic.write_planned`

Checkpoint layouts written (and read by the adapters named):
  mixtral                    model.layers.{l}.block_sparse_moe.experts.{e}.w1/w2/w3.weight   (mixtral)
  qwen2_moe, qwen3_moe, olmoe, deepseek_v3, glm4_moe
                             model.layers.{l}.mlp.experts.{e}.gate/up/down_proj.weight        (qwen-moe)
  gpt_oss                    model.layers.{l}.mlp.experts.{gate_up,down}_proj_{blocks,scales,bias}
                             MXFP4 blocks and E8M0 scales, the main folder of the download (gpt-oss-hf)
Every non-expert tensor (embeddings, attention, norms, routers, shared experts, dense layers) is
named as transformers names it in the model, except mixtral's `.mlp.` which ships as
`.block_sparse_moe.`. The names and shapes come from the model itself, built on the meta device,
so a transformers release that adds a tensor adds it here too.

transformers is an optional dependency (`pip install .[hf]`): it is imported on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from .errors import UnknownNameError

if TYPE_CHECKING:
    from .synthetic import Dims, Planned

# adapters.synthetic (Dims, Planned) imports torch: it is imported where a plan is made, so that
# the table can be read (make-model --help, pipeline.hf's checks) without it.


class Arch(msgspec.Struct, frozen=True):
    model_type: str
    expert_layout: str  # "mixtral", "per-expert" or "mxfp4"
    checkpoint_format: str  # the adapter (adapters.registry) that reads its experts
    experts_key: str  # config key of the routed experts per layer
    expert_width_key: str  # config key of one routed expert's intermediate size
    # Checkpoint name -> module name: (substring in the checkpoint, substring in the model).
    rename: tuple[tuple[str, str], ...] = ()


ARCHS: dict[str, Arch] = {a.model_type: a for a in (
    Arch("gpt_oss", "mxfp4", "gpt-oss-hf", "num_local_experts", "intermediate_size"),
    Arch("mixtral", "mixtral", "mixtral", "num_local_experts", "intermediate_size",
         rename=((".block_sparse_moe.", ".mlp."),)),
    Arch("qwen2_moe", "per-expert", "qwen-moe", "num_experts", "moe_intermediate_size"),
    Arch("qwen3_moe", "per-expert", "qwen-moe", "num_experts", "moe_intermediate_size"),
    Arch("olmoe", "per-expert", "qwen-moe", "num_experts", "intermediate_size"),
    Arch("deepseek_v3", "per-expert", "qwen-moe", "n_routed_experts", "moe_intermediate_size"),
    # No code of its own: transformers' experts interface and the qwen-moe layout cover it.
    Arch("glm4_moe", "per-expert", "qwen-moe", "n_routed_experts", "moe_intermediate_size"),
)}


def arch_of(model_type: str) -> Arch:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UnknownNameError("architecture (config.json model_type)", model_type, list(ARCHS)) from None


def to_checkpoint_name(arch: Arch, module_name: str) -> str:
    for ckpt, mod in arch.rename:
        module_name = module_name.replace(mod, ckpt)
    return module_name


def to_module_name(arch: Arch, checkpoint_name: str) -> str:
    for ckpt, mod in arch.rename:
        checkpoint_name = checkpoint_name.replace(ckpt, mod)
    return checkpoint_name


def _arch_fields(arch: Arch, d: Dims, attention: dict) -> dict:
    """Config fields beyond the shared ones, per architecture (dense layers, shared experts)."""
    E, I, S = d.experts, d.intermediate, d.shared_intermediate or 2 * d.intermediate
    f: dict = {arch.experts_key: E}
    if arch.model_type == "gpt_oss":
        f.update(intermediate_size=I, head_dim=attention["head_dim"], swiglu_limit=7.0,
                 quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
                     "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    elif arch.model_type == "mixtral":
        f.update(intermediate_size=I, head_dim=attention["head_dim"])
    elif arch.model_type == "qwen2_moe":
        f.update(moe_intermediate_size=I, intermediate_size=S, shared_expert_intermediate_size=S,
                 mlp_only_layers=list(range(d.dense_layers)), decoder_sparse_step=1)
    elif arch.model_type == "qwen3_moe":
        f.update(moe_intermediate_size=I, intermediate_size=S, head_dim=attention["head_dim"],
                 mlp_only_layers=list(range(d.dense_layers)), decoder_sparse_step=1)
    elif arch.model_type == "olmoe":
        f.update(intermediate_size=I)
    elif arch.model_type == "glm4_moe":
        f.update(moe_intermediate_size=I, intermediate_size=S, first_k_dense_replace=d.dense_layers,
                 n_shared_experts=1 if d.shared_expert else 0, n_group=1, topk_group=1, head_dim=attention["head_dim"])
    elif arch.model_type == "deepseek_v3":
        hd = attention["head_dim"]
        groups = 2 if E % 2 == 0 else 1
        # MLA attends with every head's own keys: no grouped key/value heads
        f.update(num_key_value_heads=attention["heads"])
        f.update(moe_intermediate_size=I, intermediate_size=S, first_k_dense_replace=d.dense_layers,
                 n_shared_experts=1 if d.shared_expert else 0, n_group=groups, topk_group=1,
                 q_lora_rank=max(32, hd * 2), kv_lora_rank=max(16, hd), qk_rope_head_dim=hd // 2,
                 qk_nope_head_dim=hd // 2, v_head_dim=hd)
    return f


def hf_config(model_type: str, d: Dims, *, heads: int, kv_heads: int, head_dim: int, vocab: int):
    """A transformers config of `model_type` at dims `d` (bf16, untied embeddings)."""
    arch = arch_of(model_type)
    from transformers import AutoConfig

    attention = {"head_dim": head_dim, "heads": heads}
    fields = dict(num_hidden_layers=d.layers, hidden_size=d.hidden, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, vocab_size=vocab, num_experts_per_tok=d.top_k,
                  max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                  pad_token_id=None, dtype="bfloat16")
    fields.update(_arch_fields(arch, d, attention))
    return AutoConfig.for_model(model_type, **fields)


def _kind(name: str, shape: tuple[int, ...]) -> str:
    if name.endswith("e_score_correction_bias"):
        return "zeros"
    if len(shape) == 1 and "norm" in name.rsplit(".", 2)[-2]:
        return "ones"
    return "normal"


def _expert_tensors(arch: Arch, prefix: str, d: Dims) -> list[Planned]:
    """One MoE layer's routed experts in the published layout; `prefix` ends in `.experts.`."""
    from .synthetic import Planned

    E, H, I, dt = d.experts, d.hidden, d.intermediate, d.dtype
    if arch.expert_layout == "mxfp4":
        return [Planned(prefix + "gate_up_proj_blocks", "U8", (E, 2 * I, H // 32, 16), "codes", True),
                Planned(prefix + "gate_up_proj_scales", "U8", (E, 2 * I, H // 32), "scales", True),
                Planned(prefix + "gate_up_proj_bias", "BF16", (E, 2 * I), "normal", True),
                Planned(prefix + "down_proj_blocks", "U8", (E, H, I // 32, 16), "codes", True),
                Planned(prefix + "down_proj_scales", "U8", (E, H, I // 32), "scales", True),
                Planned(prefix + "down_proj_bias", "BF16", (E, H), "normal", True)]
    roles = (("w1", (I, H)), ("w2", (H, I)), ("w3", (I, H))) if arch.expert_layout == "mixtral" else \
        (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))
    return [Planned(f"{prefix}{e}.{role}.weight", dt, shape, "normal", False) for e in range(E) for role, shape in roles]


def plan_hf(model_type: str, d: Dims, *, heads: int, kv_heads: int, head_dim: int,
            vocab: int) -> tuple[str, dict, list[Planned]]:
    """(weights sub-directory, config.json, tensors in file order) of a synthetic checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from .synthetic import Planned

    arch = arch_of(model_type)
    if arch.expert_layout == "mxfp4" and (d.hidden % 32 or d.intermediate % 32):
        raise ValueError(f"gpt_oss stores MXFP4 blocks of 32: --hidden {d.hidden} and --intermediate "
                         f"{d.intermediate} must be multiples of 32")
    cfg = hf_config(model_type, d, heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=vocab)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tensors: list[Planned] = []
    done_experts: set[str] = set()
    for name, t in model.state_dict().items():
        module, _, _ = name.rpartition(".")
        if module.endswith(".experts") and type(model.get_submodule(module)).__name__.endswith("Experts"):
            if module not in done_experts:
                done_experts.add(module)
                tensors += _expert_tensors(arch, to_checkpoint_name(arch, module) + ".", d)
            continue
        shape = tuple(t.shape)
        tensors.append(Planned(to_checkpoint_name(arch, name), d.dtype, shape, _kind(name, shape), False))
    if not done_experts:
        raise ValueError(f"{model_type} at these dims has no MoE layer; give more --layers than --dense-layers")
    config = cfg.to_dict()
    config.pop("transformers_version", None)  # the reader's version, not a property of the checkpoint
    return "", config, tensors
