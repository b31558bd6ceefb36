"""`prefetch-bench quality`: recall@k / precision@k of predictors replayed online over a trace."""
from __future__ import annotations

import argparse

from adapters.atomic_file import check_output_path, replaced_atomically

DEFAULT_PREDICTORS = ("ewma", "lookahead", "fusion", "oracle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="a moe-routing-trace/1 .npz file")
    parser.add_argument("--predictor", action="append", dest="predictors", metavar="NAME",
                        help=f"predictor to score, NAME or NAME:key=value,... (repeatable; default: "
                             f"{', '.join(DEFAULT_PREDICTORS)})")
    parser.add_argument("--k", action="append", type=int, dest="ks", metavar="K",
                        help="top-k cut-offs (repeatable; default: the trace's top_k and 2 * top_k)")
    parser.add_argument("--json", dest="json_out", help="also write the results (with per-layer figures) here")


def run(args: argparse.Namespace) -> int:
    import msgspec

    from policies.cache.registry import parse_predictor_spec
    from policies.predictors.registry import predictor_class
    from policies.quality import build_predictor, evaluate, format_table
    from policies.traces import load_trace

    specs = args.predictors or list(DEFAULT_PREDICTORS)
    parsed = [parse_predictor_spec(spec) for spec in specs]  # e.g. scoutgate:weights_path=W.safetensors
    for name, _ in parsed:  # fail on a bad name before the (long) replays
        predictor_class(name)
    if args.json_out:
        check_output_path(args.json_out, "--json")
    trace = load_trace(args.trace)
    results = []
    for spec, (name, options) in zip(specs, parsed):
        results += evaluate(trace, build_predictor(name, trace, **options),
                            ks=tuple(args.ks) if args.ks else None, name=spec)
    print(f"trace {args.trace}: {trace.tokens} rows, {trace.num_layers} layers x {trace.num_experts} experts, "
          f"top-{trace.top_k}; decode visits scored online")
    print(format_table(results))
    if args.json_out:
        data = msgspec.json.encode({"trace": str(args.trace), "results": results})
        with replaced_atomically(args.json_out) as tmp, open(tmp, "wb") as f:
            f.write(data)
    return 0
