"""`make-model`: write a synthetic MoE checkpoint in a real format (see adapters/synthetic.py).

  make-model --format gpt-oss --preset tiny --seed 0 --out data/generated/tiny-gpt-oss
  make-model --format qwen-moe --preset qwen1.5-moe --layers 2 --shared-expert --dense-layers 1 ...

Errors (unknown names, bad dimensions, no disk space) are one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import CheckpointError, UnknownNameError
from ..presets import PRESETS, get_preset
from ..synthetic import FORMATS, Dims, check_dims, write_model


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise _Usage(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="make-model", description="Write a synthetic MoE checkpoint in a real model format.")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
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


def main(argv: list[str] | None = None) -> int:
    try:
        a = _parser().parse_args(argv)
        if a.format not in FORMATS:
            raise UnknownNameError("format", a.format, list(FORMATS))
        pre = get_preset(a.preset)
        d = Dims(layers=a.layers or pre.layers, experts=a.experts or pre.experts, top_k=a.top_k or pre.top_k,
                 hidden=a.hidden or pre.hidden, intermediate=a.intermediate or pre.intermediate,
                 shared_intermediate=pre.shared_intermediate, dense_layers=a.dense_layers,
                 shared_expert=a.shared_expert, dtype=a.dtype.upper())
        for k in ("layers", "experts", "hidden", "intermediate", "top_k"):
            v = getattr(a, k)
            if v is not None and v <= 0:
                raise ValueError(f"--{k.replace('_', '-')} must be positive, got {v}")
        check_dims(a.format, d)
        if a.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {a.workers}")
        w = write_model(a.format, d, a.seed, a.out, a.shards, workers=a.workers)
    except (_Usage, UnknownNameError, ValueError, CheckpointError, OSError) as e:
        print(f"make-model: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # write_model has already removed its partial output
        print("make-model: interrupted; nothing written", file=sys.stderr)
        return 130
    from ..registry import open_checkpoint

    spec = open_checkpoint(w.path, a.format).spec
    print(f"wrote {a.format} model to {w.path}: {len(w.files)} files, {w.total_bytes} bytes; "
          f"{spec.num_layers} MoE layers x {spec.num_experts} experts, expert size {spec.expert_bytes} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
