"""`prefetch-bench simulate`: replay a routing trace through cache policies, against Belady.

For each policy x predictor pair (a policy without a predictor runs once, predictor "-"),
the trace's decode rows (and prefill passes with --include-prefill) go through the timed
simulator of `policies.simulator`; Belady MIN is computed at the same VRAM capacity in
experts. Prints a table; --json writes the figures atomically.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

from adapters.atomic_file import check_output_path, replaced_atomically

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_capacity(text: str, *, what: str, expert_bytes: int, num_experts_total: int) -> int:
    """Capacity in whole experts from `0.1` (a fraction of all experts), `6GiB` or `1234` bytes."""
    s = text.strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([kmgt]i?b|b)?", s)
    if not m:
        raise ValueError(f"{what} {text!r} does not parse; give a fraction of all experts (0.1) "
                         f"or bytes (6GiB, 512MiB, 1000000)")
    number, exp, unit = m.group(1), m.group(2), m.group(3) or ""
    value = float(number) * (10 ** int(exp) if exp else 1)
    if unit == "" and ("." in number or exp):  # a fraction
        if not 0 < value <= 1:
            raise ValueError(f"{what} {text!r}: a fraction must be in (0, 1]; bytes need an "
                             f"integer or a unit (e.g. 6GiB)")
        return int(value * num_experts_total)
    return int(value * _UNITS[unit]) // expert_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="routing trace .npz (moe-routing-trace/1)")
    p.add_argument("--vram-capacity", default="0.1", help="fraction of all experts (0.1) or bytes (6GiB)")
    p.add_argument("--ram-capacity", default="0.5", help="fraction of all experts (0.5) or bytes (64GiB)")
    p.add_argument("--policy", action="append", help="policy NAME or NAME:key=value,... (fields of its config, e.g. "
                   "nextuse:prefetch_min_prob=0.2), repeatable (default: all)")
    p.add_argument("--predictor", action="append", help="predictor for policies that take one: NAME "
                   "or NAME:key=value,... (repeatable; default: ewma:alpha=0.05)")
    p.add_argument("--expert-bytes", type=int, help="bytes of one expert (default: the trace's "
                   "meta expert_bytes_bf16)")
    p.add_argument("--compute-ms-per-layer", type=float, default=0.5)
    p.add_argument("--h2d-gbps", type=float, default=50.0, help="RAM->VRAM GB/s (docs/architecture.md: ~50 on H100)")
    p.add_argument("--disk-gbps", type=float, default=1.6, help="NVMe->RAM GB/s (docs/architecture.md: ~1.6)")
    p.add_argument("--include-prefill", action="store_true")
    p.add_argument("--max-tokens", type=int, help="replay only the first N trace rows")
    p.add_argument("--json", help="write the results here (atomically)")


def run(args: argparse.Namespace) -> int:
    import msgspec
    from tqdm import tqdm

    from policies.cache.base import DoesNotFit
    from policies.cache.belady import belady_min
    from policies.cache.registry import (DEFAULT_PREDICTOR, fixed_options, make_policy, parse_policy_spec,
                                         parse_predictor_spec, policy_class, policy_names)
    from policies.predictors.registry import make_predictor, predictor_class
    from policies.prefetch_bound import aggressive_prefetch
    from policies.simulator import access_sequence, count_passes, simulate, truncate, visit_sequence
    from policies.traces import load_trace

    # Check every name, number and path before the (long) replay starts.
    if args.json:
        check_output_path(args.json, "--json")
    policies = args.policy or policy_names()
    classes = {spec: policy_class(parse_policy_spec(spec)[0]) for spec in policies}
    predictors = args.predictor or [DEFAULT_PREDICTOR]
    for spec in predictors:
        predictor_class(parse_predictor_spec(spec)[0])
    for flag in ("compute_ms_per_layer", "h2d_gbps", "disk_gbps"):
        v = getattr(args, flag)
        if not (v > 0 or (flag == "compute_ms_per_layer" and v == 0)):
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {v}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")

    trace = load_trace(args.trace)
    if args.max_tokens is not None:
        trace = truncate(trace, args.max_tokens)
    size = args.expert_bytes if args.expert_bytes is not None else trace.expert_bytes
    if size is None:
        raise ValueError(f"{args.trace}: the trace's meta has no expert_bytes_bf16; pass --expert-bytes N")
    if size < 1:
        raise ValueError(f"--expert-bytes must be >= 1, got {size}")
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    total = L * E
    vram_x = parse_capacity(args.vram_capacity, what="--vram-capacity", expert_bytes=size, num_experts_total=total)
    ram_x = parse_capacity(args.ram_capacity, what="--ram-capacity", expert_bytes=size, num_experts_total=total)
    for flag, x in (("--vram-capacity", vram_x), ("--ram-capacity", ram_x)):
        if x < K:
            raise ValueError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))!r} holds {x} experts of "
                             f"{size} bytes, fewer than one layer's top-{K} working set; give at least "
                             f"{K * size} bytes")
    vram_x, ram_x = min(vram_x, total), min(ram_x, total)
    base = dict(num_layers=L, num_experts=E, top_k=K, vram_bytes=vram_x * size,
                ram_bytes=ram_x * size, expert_bytes=size,
                containment=ram_x >= vram_x,
                seconds_per_layer=args.compute_ms_per_layer / 1e3,
                h2d_bytes_per_s=args.h2d_gbps * 1e9, disk_bytes_per_s=args.disk_gbps * 1e9)
    timing = dict(compute_seconds_per_layer=args.compute_ms_per_layer / 1e3,
                  h2d_bytes_per_s=args.h2d_gbps * 1e9, disk_bytes_per_s=args.disk_gbps * 1e9)

    def build_predictor(spec: str):
        pname, opts = parse_predictor_spec(spec)
        if pname == "oracle":
            opts.update(trace=trace, include_prefill=args.include_prefill)
        return make_predictor(pname, L, E, K, **opts)

    def build_policy(spec: str, predictor):
        name, opts = parse_policy_spec(spec)
        fixed = fixed_options(base, opts)
        if fixed:
            raise ValueError(f"--policy {spec}: {', '.join(fixed)} come from the capacities and the trace; "
                             f"drop them from the spec")
        return make_policy(name, predictor, **base, **opts)

    for spec in predictors:  # bad options fail now, not after the first long replay
        build_predictor(spec)
    skipped: dict[str, str] = {}  # policy -> why it cannot run at these budgets
    for spec in policies:
        try:
            build_policy(spec, build_predictor(predictors[0]) if classes[spec].uses_predictor else None)
        except DoesNotFit as e:
            skipped[spec] = str(e)
    if len(skipped) == len(policies):
        raise ValueError(f"no policy fits these budgets: {next(iter(skipped.values()))}")
    policies = [p for p in policies if p not in skipped]
    pairs = [(p, q) for p in policies for q in (predictors if classes[p].uses_predictor else ["-"])]
    passes = count_passes(trace, args.include_prefill)
    if passes == 0:
        raise ValueError(f"{args.trace}: nothing to replay ({trace.tokens} rows, none of them decode"
                         f"{'' if args.include_prefill else '; add --include-prefill'}"
                         f"{' or raise --max-tokens' if args.max_tokens else ''})")
    results, wall = [], []
    with tqdm(total=passes * len(pairs), file=sys.stderr, unit="tok", disable=None,
              desc="simulate") as bar:
        for pol, pred in pairs:
            predictor = None
            if pred != "-":
                predictor = build_predictor(pred)
            policy = build_policy(pol, predictor)
            bar.set_postfix_str(f"{pol}/{pred}")
            t0 = time.perf_counter()
            results.append(simulate(trace, policy, policy_name=pol, predictor_name=pred,
                                    include_prefill=args.include_prefill, progress=bar.update, **timing))
            wall.append(time.perf_counter() - t0)
    hits, loads = belady_min(access_sequence(trace, args.include_prefill), vram_x)
    accesses = hits + loads
    ahead = aggressive_prefetch(visit_sequence(trace, args.include_prefill), vram_x,
                                size / (args.h2d_gbps * 1e9), args.compute_ms_per_layer / 1e3)
    tokens = results[0].tokens if results else 0
    report = {
        "trace": str(args.trace), "tokens": tokens,
        "vram_capacity_experts": vram_x, "ram_capacity_experts": ram_x, "expert_bytes": size,
        "belady": {"vram_hit_rate": hits / max(1, accesses), "loads_vram": loads},
        # What is reachable with perfect knowledge: Belady's evictions, every copy as early as
        # they allow (policies/prefetch_bound.py), in the same time model with RAM warm.
        "offline_prefetch": {"tokens_per_second": tokens / ahead.seconds if ahead.seconds > 0 else float("inf"),
                             "loads_vram": ahead.loads,
                             "stall_seconds_per_token": ahead.stall_seconds / max(1, tokens)},
        "runs": [dict(msgspec.structs.asdict(r), wall_seconds=round(w, 2)) for r, w in zip(results, wall)],
        "skipped": skipped,
    }
    _print_table(report)
    if args.json:
        with replaced_atomically(args.json) as tmp, open(tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


def _print_table(report: dict) -> None:
    bel = report["belady"]
    print(f"{report['trace']}: {report['tokens']} tokens, VRAM {report['vram_capacity_experts']} experts, "
          f"RAM {report['ram_capacity_experts']} experts; Belady VRAM hit {bel['vram_hit_rate']:.3f}, "
          f"loads {bel['loads_vram']}")
    off = report["offline_prefetch"]
    print(f"offline prefetch with perfect knowledge (RAM warm): {off['tokens_per_second']:.2f} tok/s, "
          f"loads {off['loads_vram']}, stall {off['stall_seconds_per_token']:.4f} s/tok")
    wp = max([14] + [len(r["policy"]) + 2 for r in report["runs"]])
    wq = max([17] + [len(r["predictor"]) + 2 for r in report["runs"]])
    head = f"{'policy':<{wp}}{'predictor':<{wq}}{'vram_hit':>9}{'ram_hit':>9}{'loads_vram':>11}{'x_belady':>9}" \
           f"{'loads_ram':>10}{'stall_s/tok':>12}{'tok/s':>9}{'wall_s':>8}"
    print(head)
    for r in report["runs"]:
        ratio = r["loads_vram"] / bel["loads_vram"] if bel["loads_vram"] else float("nan")
        print(f"{r['policy']:<{wp}}{r['predictor']:<{wq}}{r['vram_hit_rate']:>9.3f}{r['ram_hit_rate']:>9.3f}"
              f"{r['loads_vram']:>11}{ratio:>9.2f}{r['loads_ram']:>10}"
              f"{r['stall_seconds_per_token']:>12.4f}{r['tokens_per_second']:>9.2f}{r['wall_seconds']:>8.1f}")
    for name, why in report.get("skipped", {}).items():
        print(f"{name:<{wp}}skipped: {why}")
