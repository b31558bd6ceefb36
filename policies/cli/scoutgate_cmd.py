"""Train ScoutGate on a routing trace; score it on held-out requests against EWMA and the prior.

`python -m policies.cli.scoutgate_cmd train|eval ...`:

  train --trace PATH --out WEIGHTS.safetensors [--train-frac 0.7] [--epochs N] [--seed S] [--history M]
  eval  --trace PATH --weights WEIGHTS.safetensors [--train-frac 0.7] [--seed S]

The split: requests shuffled by --seed, --train-frac of them train; a trace with a single
request is cut in time instead (first --train-frac of its decode rows train). `eval`
recomputes the same split from the same flags when the weights were trained on this very
trace, and scores every request otherwise. Bad input: one line on stderr, exit status 2,
and no weights file written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROG = "scoutgate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train on a trace, save weights, print held-out scores")
    train.add_argument("--trace", required=True, type=Path)
    train.add_argument("--out", required=True, type=Path, help="weights file to write (.safetensors)")
    train.add_argument("--epochs", type=int, default=60)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--history", type=int, default=8, help="token ids of context (default 8)")
    ev = sub.add_parser("eval", help="score saved weights on a trace's held-out requests")
    ev.add_argument("--trace", required=True, type=Path)
    ev.add_argument("--weights", required=True, type=Path)
    for p in (train, ev):
        p.add_argument("--train-frac", type=float, default=0.7)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", action="store_true", help="print the full scores (per layer) as JSON")
    return parser


def _split(trace, train_frac: float, seed: int):
    """(train selector, held-out selector, description): kwargs for train/evaluate."""
    from policies.predictors.scoutgate_train import split_in_time, split_requests

    if trace.num_requests >= 2:
        train, held = split_requests(trace, train_frac, seed)
        return ({"train_requests": train}, {"requests": train}, {"requests": held},
                f"requests {list(train)} train, {list(held)} held out")
    train_rows, held_rows = split_in_time(trace, train_frac)
    return ({"train_rows": train_rows}, {"rows": train_rows}, {"rows": held_rows},
            f"one request: first {train_frac:g} of its decode rows train, the rest held out")


def _table(title: str, scores: dict) -> str:
    lines = [f"{title} ({scores['rows']} next-token examples, k={scores['top_k']}):",
             f"  {'predictor':<20} {'recall@k':>9} {'precision@k':>12} {'recall@2k':>10}"]
    for name, s in scores.items():
        if isinstance(s, dict):
            lines.append(f"  {name:<20} {s['recall']:>9.3f} {s['precision']:>12.3f} {s['recall@2k']:>10.3f}")
    sums = scores["prob_sum_per_layer"]
    lines.append(f"  scoutgate sum of probabilities per layer: {min(sums):.2f}..{max(sums):.2f} (k={scores['top_k']})")
    return "\n".join(lines)


def _train(args) -> int:
    from adapters.atomic_file import check_output_path
    from policies.predictors.scoutgate import save_scoutgate
    from policies.predictors.scoutgate_train import evaluate, require_token_ids, train_scoutgate
    from policies.traces import load_trace

    check_output_path(args.out, "--out")  # fail before spending the training time
    trace = load_trace(args.trace)
    require_token_ids(trace, args.trace)
    train_sel, train_eval, held, how = _split(trace, args.train_frac, args.seed)
    t0 = time.perf_counter()
    model = train_scoutgate(trace, epochs=args.epochs, lr=args.lr, seed=args.seed, history=args.history,
                            **train_sel)
    seconds = time.perf_counter() - t0
    save_scoutgate(model, args.out)
    result = {"trace": str(args.trace), "split": how, "train_seconds": seconds, "weights": str(args.out),
              "train": evaluate(model, trace, **train_eval), "held_out": evaluate(model, trace, **held)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.trace.name}: {how}; trained {args.epochs} epochs in {seconds:.1f} s -> {args.out}")
        print(_table("train", result["train"]))
        print(_table("held out", result["held_out"]))
    return 0


def _eval(args) -> int:
    from policies.predictors.scoutgate import check_compatible, load_scoutgate
    from policies.predictors.scoutgate_train import evaluate, require_token_ids, trace_identity
    from policies.traces import load_trace

    model = load_scoutgate(args.weights)
    trace = load_trace(args.trace)
    require_token_ids(trace, args.trace)
    check_compatible(model.config, trace.num_layers, trace.num_experts, trace.top_k, args.weights)
    if model.config.trained_on == trace_identity(trace):
        _, _, held, how = _split(trace, args.train_frac, args.seed)
    else:  # another trace: none of it was seen in training
        held, how = {"requests": sorted(set(trace.request.tolist()))}, "every request (not the training trace)"
    scores = evaluate(model, trace, **held)
    if args.json:
        print(json.dumps({"trace": str(args.trace), "weights": str(args.weights), "split": how,
                          "held_out": scores}, indent=1))
    else:
        print(f"{args.trace.name} with {args.weights.name} (trained on {model.config.trained_on}): {how}")
        print(_table("held out", scores))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _train(args) if args.command == "train" else _eval(args)
    except (ValueError, KeyError, OSError) as e:  # bad input: one line, non-zero exit
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
