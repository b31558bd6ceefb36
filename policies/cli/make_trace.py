"""`make-trace`: write a synthetic routing trace (`moe-routing-trace/1`) to an .npz file.

The routing model and every parameter are described in `policies.synthetic`. `--like NAME`
starts from a preset resembling a real trace; explicit flags override it.
"""
from __future__ import annotations

import argparse
import shlex
import sys

# flag -> SyntheticConfig field
_FIELDS = {"layers": "layers", "experts": "experts", "top_k": "top_k", "requests": "requests",
           "prompt_tokens": "prompt_tokens", "decode_tokens": "decode_tokens", "seed": "seed", "skew": "skew",
           "reuse": "reuse", "layer_corr": "layer_corr", "phases": "phases", "topic_strength": "topic_strength",
           "expert_bytes": "expert_bytes"}
_REQUIRED = ("layers", "experts", "top_k", "requests", "prompt_tokens", "decode_tokens")


def build_parser() -> argparse.ArgumentParser:
    from ..synthetic import PRESETS

    p = argparse.ArgumentParser(
        prog="make-trace", description=__doc__.splitlines()[0],
        epilog="Model: per-layer Zipf popularity (skew) under a random permutation; each request draws one of "
               "--phases topics that re-weight it by exp(topic_strength * N(0,1)); layer l+1 is biased towards "
               "a fixed random image of layer l's experts (layer-corr); each expert of the previous token at the "
               "same layer is kept with probability reuse.")
    p.add_argument("--like", choices=sorted(PRESETS), help="start from settings resembling a real trace")
    p.add_argument("--layers", type=int, help="MoE layers L")
    p.add_argument("--experts", type=int, help="routed experts per layer E")
    p.add_argument("--top-k", type=int, help="experts chosen per token and layer K")
    p.add_argument("--requests", type=int, help="requests R, run back to back")
    p.add_argument("--prompt-tokens", type=int, help="prefill rows per request P")
    p.add_argument("--decode-tokens", type=int, help="decode rows per request D")
    p.add_argument("--seed", type=int, help="random seed (same seed -> identical file contents; default 0)")
    p.add_argument("--skew", type=float, help="Zipf exponent of expert popularity (0 = uniform; default 1.0)")
    p.add_argument("--reuse", type=float, help="P(keep an expert of the previous token, same layer) (default 0.3)")
    p.add_argument("--layer-corr", type=float, help="strength of layer l -> l+1 correlation in [0, 1] (default 0.3)")
    p.add_argument("--phases", type=int, help="number of prompt topics (default 4)")
    p.add_argument("--topic-strength", type=float, help="how strongly a topic re-weights popularity (default 1.0)")
    p.add_argument("--expert-bytes", type=int, help="bytes of one expert, stored as meta expert_bytes_bf16")
    p.add_argument("--out", required=True, help="output .npz path (written atomically)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from adapters.atomic_file import check_output_path

    from ..synthetic import PRESETS, SyntheticConfig, generate
    from ..traces import save_trace

    settings = dict(PRESETS[args.like]) if args.like else {}
    for flag, field in _FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            settings[field] = value
    missing = [f"--{name.replace('_', '-')}" for name in _REQUIRED if name not in settings]
    try:
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (or use --like NAME)")
        check_output_path(args.out, "--out")
        cfg = SyntheticConfig(**settings)
        trace = generate(cfg, source=shlex.join(["make-trace", *argv]))
        save_trace(trace, args.out)
    except (ValueError, OSError) as e:
        print(f"make-trace: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # save_trace writes atomically: nothing half-written is left
        print("make-trace: interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"make-trace: wrote {args.out}: {trace.tokens} rows x {cfg.layers} layers x top-{cfg.top_k} "
          f"of {cfg.experts} experts, {cfg.requests} requests")
    return 0
