"""`make-model`: write a synthetic MoE checkpoint in a real format (see adapters/synthetic.py).

  make-model --format gpt-oss --preset tiny --seed 0 --out data/generated/tiny-gpt-oss
  make-model --format qwen-moe --preset qwen1.5-moe --layers 2 --shared-expert --dense-layers 1 ...
  make-model --format hf --arch gpt_oss --preset gpt-oss-20b --out ...   (a whole transformers model)

Errors (unknown names, bad dimensions, no disk space) are one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import CheckpointError, UnknownNameError
from ..hf_models import ARCHS, arch_of
from ..presets import FORMATS, PRESETS, get_preset


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise _Usage(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="make-model", description="Write a synthetic MoE checkpoint in a real model format.")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}, or hf: a whole transformers "
                   "model (embeddings, attention, norms too) with its experts in the --arch's published layout")
    p.add_argument("--arch", help=f"--format hf: the config's model_type, one of {', '.join(ARCHS)}")
    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} (default tiny)")
    for k in ("layers", "experts", "hidden", "intermediate", "top-k"):
        p.add_argument(f"--{k}", type=int, help=f"override the preset's {k}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--shards", type=int, default=1, help="number of safetensors files (default 1)")
    p.add_argument("--dense-layers", type=int, default=0, help="qwen-moe: leading dense (non-MoE) layers")
    p.add_argument("--shared-expert", action="store_true", help="qwen-moe: add a shared expert per MoE layer")
    p.add_argument("--dtype", default="BF16", help="HF formats: BF16, F16 or F32 (default BF16)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="threads drawing the random bytes (default: the CPUs, at most 16); the files are the "
                        "same for any number")
    return p


def _plan_hf(arch: str, d, pre):
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError("--format hf builds the model with transformers, which is not installed; "
                         "pip install '.[hf]'") from None
    if d.top_k > d.experts:
        raise ValueError(f"--top-k {d.top_k} exceeds --experts {d.experts}")
    if d.dense_layers < 0 or d.dense_layers >= d.layers:
        raise ValueError(f"--dense-layers {d.dense_layers} must leave at least one MoE layer of {d.layers}")
    if d.dtype not in ("BF16", "F16", "F32"):
        raise UnknownNameError("dtype", d.dtype, ["BF16", "F16", "F32"])
    from ..hf_models import plan_hf

    return plan_hf(arch, d, heads=pre.heads, kv_heads=pre.kv_heads, head_dim=pre.head_dim, vocab=pre.vocab)


def main(argv: list[str] | None = None) -> int:
    try:
        a = _parser().parse_args(argv)
        from ..synthetic import Dims, check_dims, write_model, write_planned  # torch: after parsing

        if a.format not in FORMATS + ("hf",):
            raise UnknownNameError("format", a.format, list(FORMATS) + ["hf"])
        if (a.format == "hf") != (a.arch is not None):
            raise ValueError("--arch goes with --format hf (and --format hf needs it): "
                             f"one of {', '.join(ARCHS)}")
        pre = get_preset(a.preset)
        d = Dims(layers=a.layers or pre.layers, experts=a.experts or pre.experts, top_k=a.top_k or pre.top_k,
                 hidden=a.hidden or pre.hidden, intermediate=a.intermediate or pre.intermediate,
                 shared_intermediate=pre.shared_intermediate, dense_layers=a.dense_layers,
                 shared_expert=a.shared_expert, dtype=a.dtype.upper())
        for k in ("layers", "experts", "hidden", "intermediate", "top_k"):
            v = getattr(a, k)
            if v is not None and v <= 0:
                raise ValueError(f"--{k.replace('_', '-')} must be positive, got {v}")
        if a.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {a.workers}")
        if a.format == "hf":
            arch_of(a.arch)
            planned = _plan_hf(a.arch, d, pre)
            w = write_planned(planned, a.seed, a.out, a.shards, workers=a.workers)
        else:
            check_dims(a.format, d)
            w = write_model(a.format, d, a.seed, a.out, a.shards, workers=a.workers)
    except (_Usage, UnknownNameError, ValueError, CheckpointError, OSError) as e:
        print(f"make-model: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # write_model has already removed its partial output
        print("make-model: interrupted; nothing written", file=sys.stderr)
        return 130
    from ..registry import open_checkpoint

    spec = open_checkpoint(w.path, arch_of(a.arch).checkpoint_format if a.format == "hf" else a.format).spec
    print(f"wrote {a.format} model to {w.path}: {len(w.files)} files, {w.total_bytes} bytes; "
          f"{spec.num_layers} MoE layers x {spec.num_experts} experts, expert size {spec.expert_bytes} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
