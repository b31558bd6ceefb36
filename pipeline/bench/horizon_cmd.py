"""`prefetch-bench horizon`: how many tokens of exact future routing a demand cache needs to near Belady.

For each VRAM capacity and horizon h, the trace's layer visits (decode rows; prefill passes
too with --include-prefill) go through the h-token rule of `policies.horizon_bound`: a
demand cache that knows the next h tokens' routing exactly and ranks the experts outside
that window by LRU or by frequency. Prints each rule's loads / Belady MIN's loads, plus the
limit as h covers the whole trace. --json writes the figures atomically.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_CAPACITIES = ("0.1", "0.25")
DEFAULT_HORIZONS = (0, 1, 2, 4, 8)
# best: both orders, the fewer loads reported; the rest are policies.horizon_bound.TIE_BREAKS (a
# test keeps the two in step: this module is imported by every prefetch-bench command, lightly)
TIE_BREAK_CHOICES = ("best", "freq", "lru")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="routing trace .npz (moe-routing-trace/1)")
    p.add_argument("--vram-capacity", action="append", metavar="FRACTION",
                   help="cache size as a fraction of all experts, in (0, 1) (repeatable; default: "
                        f"{' and '.join(DEFAULT_CAPACITIES)}); experts count as unit-size here, so "
                        "bytes and counts are not accepted")
    p.add_argument("--horizon", action="append", type=int, metavar="H",
                   help="tokens of exact future routing the rule knows; 0 = only the current layer, which "
                        "is LRU with --tie-break lru (repeatable; "
                        f"default: {' '.join(map(str, DEFAULT_HORIZONS))})")
    p.add_argument("--tie-break", default="best",
                   help="order of cached experts with no use in the window: lru, freq (fewest visits "
                        "so far), or best (run both, report the fewer loads; default)")
    p.add_argument("--max-tokens", type=int, help="measure only the first N trace rows")
    p.add_argument("--layers", type=int, help="only the trace's first N MoE layers, as `replay --layers N` "
                   "replays them")
    p.add_argument("--include-prefill", action="store_true")
    p.add_argument("--json", help="write the results here (atomically)")


def capacity_fraction(text: str) -> float:
    """The fraction of all experts that `--vram-capacity text` asks for; ValueError unless it is
    strictly between 0 and 1."""
    try:
        frac = float(text)
    except ValueError:
        frac = float("nan")
    if not 0 < frac < 1:
        raise ValueError(f"--vram-capacity {text!r}: give a fraction of all experts strictly between 0 and 1 "
                         f"(e.g. 0.1); experts are unit-size here, so bytes and counts are not accepted")
    return frac


def run(args: argparse.Namespace) -> int:
    from adapters.atomic_file import check_output_path
    from policies.cache.belady import belady_min
    from policies.horizon_bound import TIE_BREAKS, horizon_loads, trace_visits
    from policies.simulator import count_passes, truncate
    from policies.traces import first_layers, load_trace

    from .report import write_json

    # Check every name and number before the (long) runs start.
    if args.tie_break not in TIE_BREAK_CHOICES:
        raise ValueError(f"--tie-break {args.tie_break!r} is unknown; valid: {', '.join(TIE_BREAK_CHOICES)}")
    horizons = sorted(set(args.horizon if args.horizon is not None else DEFAULT_HORIZONS))
    if horizons[0] < 0:
        raise ValueError(f"--horizon must be >= 0 tokens, got {horizons[0]}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.json:  # found now, not after the runs
        check_output_path(args.json, "--json")
    fractions = [(text, capacity_fraction(text)) for text in args.vram_capacity or DEFAULT_CAPACITIES]

    trace = load_trace(args.trace)
    if args.layers is not None:
        trace = first_layers(trace, args.layers)
    if args.max_tokens is not None:
        trace = truncate(trace, args.max_tokens)
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    capacities = []
    for text, frac in fractions:
        c = int(frac * L * E)  # as `simulate` rounds a fraction, so both compare with the same Belady count
        if c < K:  # every expert of one visit must fit at once
            raise ValueError(f"--vram-capacity {text!r} holds {c} of {L * E} experts, fewer than one layer's "
                             f"top-{K} working set; give at least {K / (L * E):.4g}")
        capacities.append((frac, c))
    passes = count_passes(trace, args.include_prefill)
    if passes == 0:
        raise ValueError(f"{args.trace}: nothing to measure ({trace.tokens} rows, none of them decode"
                         f"{'' if args.include_prefill else '; add --include-prefill'}"
                         f"{' or raise --max-tokens' if args.max_tokens else ''})")
    visits = trace_visits(trace, args.include_prefill)
    ties = TIE_BREAKS if args.tie_break == "best" else (args.tie_break,)
    report = {"trace": str(args.trace), "layers": trace.num_layers, "rows": trace.tokens, "passes": passes,
              "include_prefill": args.include_prefill, "accesses": int(visits.keys.size),
              "tie_break": args.tie_break, "capacities": []}
    _print_header(report, trace, horizons)
    for frac, c in capacities:
        t0 = time.perf_counter()
        _, belady = belady_min(visits.keys, c)
        row = {"fraction": frac, "capacity_experts": c, "belady_loads": belady,
               # the rule's limit as h grows: Belady that never evicts what the visit needs
               "whole_trace_loads": horizon_loads(visits, c, None), "horizons": []}
        for h in horizons:
            loads = {tie: horizon_loads(visits, c, h, tie) for tie in ties}
            best = min(ties, key=lambda tie: loads[tie])  # ties listed lru first: lru wins a tie
            row["horizons"].append({"horizon": h, **loads, "tie_break": best, "loads": loads[best],
                                    "x_belady": loads[best] / belady if belady else None})
        row["seconds"] = round(time.perf_counter() - t0, 2)
        report["capacities"].append(row)
        _print_row(report, row)
    if args.json:
        write_json(args.json, report)
    return 0


def _ratio(loads: int, belady: int) -> str:
    return f"{loads / belady:.3f}" if belady else "-"


def _print_header(report: dict, trace, horizons: list[int]) -> None:
    tag = " (L = lru, F = freq)" if report["tie_break"] == "best" else ""
    print(f"{report['trace']}: {report['passes']} passes x {trace.num_layers} layers, E={trace.num_experts}, "
          f"top-{trace.top_k}, {report['accesses']} accesses; loads / Belady per horizon h (tokens known "
          f"ahead), tie-break {report['tie_break']}{tag}; 'all' = the whole trace known", flush=True)
    cells = "".join(f"{'h=' + str(h):>9}" for h in horizons)
    print(f"{'trace':<24}{'cap':>6}{'experts':>8}{'Belady':>9}{cells}{'all':>9}", flush=True)


def _print_row(report: dict, row: dict) -> None:
    bel = row["belady_loads"]
    cells = ""
    for h in row["horizons"]:
        tag = f" {h['tie_break'][0].upper()}" if report["tie_break"] == "best" else ""
        cells += f"{_ratio(h['loads'], bel) + tag:>9}"
    print(f"{Path(report['trace']).stem:<24}{row['fraction']:>6g}{row['capacity_experts']:>8}{bel:>9}"
          f"{cells}{_ratio(row['whole_trace_loads'], bel):>9}", flush=True)
