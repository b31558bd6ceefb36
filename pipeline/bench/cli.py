"""`prefetch-bench SUBCOMMAND ...`: dispatches to one module per subcommand.

Each subcommand module offers `add_arguments(parser)` and `run(args) -> int`; modules are
imported only when their subcommand runs, so `simulate` never imports torch or CUDA code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("pipeline.bench.simulate_cmd", "replay a routing trace through cache policies against Belady"),
    "quality": ("pipeline.bench.quality_cmd", "recall@k / precision@k of the predictors on a trace"),
    "limits": ("pipeline.bench.limits_cmd", "the pipeline's hops against raw disk / H2D limits, fetch overhead"),
    "horizon": ("pipeline.bench.horizon_cmd", "tokens of exact future routing a demand cache needs to near Belady"),
    "replay": ("pipeline.bench.replay_cmd", "end-to-end decode benchmark: methods vs baselines vs the oracle bound"),
    "generate": ("pipeline.bench.generate_cmd", "a transformers model's generate(): ours vs resident, on-demand, accelerate"),
}
DEFAULT_SUBCOMMAND = "default"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefetch-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from .default_cmd import run_default

        return run_default()
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return module.run(args)
    except KeyboardInterrupt:  # Ctrl-C: the run's pipelines closed on the way out; outputs are atomic
        print(f"prefetch-bench {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError) as e:  # bad input: one line, non-zero exit
        print(f"prefetch-bench {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from policies.actor import PolicyActorError  # imported on failure only: every command loads this module

        if not isinstance(e, PolicyActorError):
            raise
        # e.g. the policy process could not start: its first line says why
        print(f"prefetch-bench {args.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
