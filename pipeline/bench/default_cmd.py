"""`prefetch-bench` with no arguments: the built-in default run (what `make bench` does).

1. The cache policies on real routing: `simulate` over the Qwen1.5-MoE trace in data/traces at
   10% VRAM, LRU and LFU against ours (nextuse + EWMA) and Belady's optimum: where the policy
   decides how many experts must move.
2. The pipeline end to end: a small GPT-OSS-shaped checkpoint (4 layers x 16 experts, hidden 256)
   and a synthetic trace under `data/generated/` (made once), packed into an MXFP4 store by the
   precompute worker, validated, and replayed on the GPU if there is one, else on the CPU, with
   every method at the same budgets (VRAM 25%, RAM 50% of the experts).
Each step ends with one line saying what was compared and why the winner wins. Every step goes
through the command-line entry points a user would type.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "data" / "generated"
REAL_TRACE = ROOT / "data" / "traces" / "qwen1.5-moe-a2.7b-chat.npz"
REPLAY_METHODS = "resident,on-demand-disk,lru-lookahead,ours"
LAYERS, EXPERTS, TOP_K = 4, 16, 4
MODEL_ARGS = ["--format", "gpt-oss", "--preset", "gpt-oss-20b", "--layers", str(LAYERS), "--experts", str(EXPERTS),
              "--top-k", str(TOP_K), "--hidden", "256", "--intermediate", "256", "--seed", "0"]
TRACE_ARGS = ["--layers", str(LAYERS), "--experts", str(EXPERTS), "--top-k", str(TOP_K), "--requests", "2",
              "--prompt-tokens", "8", "--decode-tokens", "24", "--seed", "0"]


def _step(title: str, fn, argv: list[str]) -> None:
    print(f"\n== {title}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = fn(argv)
    if rc:
        raise SystemExit(rc)
    print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def run_default() -> int:
    from adapters.cli.make_model import main as make_model
    from adapters.precompute.cli import main as precompute
    from policies.cli.make_trace import main as make_trace

    from .cli import main as bench

    GENERATED.mkdir(parents=True, exist_ok=True)
    sim_json = GENERATED / "default-simulate.json"
    _step("simulate", bench, ["simulate", "--trace", str(REAL_TRACE), "--vram-capacity", "0.1", "--ram-capacity",
                              "0.5", "--policy", "lru", "--policy", "lfu", "--policy", "nextuse", "--json",
                              str(sim_json)])
    print(simulate_verdict(json.loads(sim_json.read_text())), flush=True)
    model, store = GENERATED / "default-replay-gpt-oss", GENERATED / "default-replay-store"
    trace = GENERATED / "default-replay-trace.npz"
    if not (model / "original" / "config.json").exists():
        _step("make-model", make_model, [*MODEL_ARGS, "--out", str(model)])
    _step("precompute", precompute, ["precompute", "--model", str(model), "--out", str(store),
                                     "--dtype", "mxfp4", "--workers", "2"])
    _step("validate", precompute, ["validate", "--store", str(store), "--samples", "4"])
    if not trace.exists():
        _step("make-trace", make_trace, [*TRACE_ARGS, "--out", str(trace)])
    replay_json = GENERATED / "default-replay.json"
    _step("replay", bench, ["replay", "--store", str(store), "--trace", str(trace), "--vram", "0.25",
                            "--ram", "0.5", "--methods", REPLAY_METHODS, "--json", str(replay_json)])
    print(replay_verdict(json.loads(replay_json.read_text())), flush=True)
    return 0


def simulate_verdict(report: dict) -> str:
    """One line: the policies' VRAM loads against Belady's, and why the best one needs fewer."""
    runs = {r["policy"]: r for r in report["runs"]}
    best = min(runs.values(), key=lambda r: r["loads_vram"])
    opt = report["belady"]["loads_vram"]
    others = ", ".join(f"{name} {r['loads_vram'] / opt:.2f}x" for name, r in runs.items() if r is not best)
    why = WHY.get(best["policy"], "it moved the fewest experts of the policies run")
    return (f"=> real Qwen1.5-MoE routing, VRAM for 10% of the experts: {best['policy']} moves "
            f"{best['loads_vram'] / opt:.2f}x the experts the offline optimum (Belady) moves, against {others}: "
            f"{why}")


WHY = {"nextuse": "it ranks experts by how soon each is expected back (recency and frequency per layer), where "
                  "LRU forgets a layer's regulars after a burst of rare ones"}


def replay_verdict(report: dict) -> str:
    """One line: ours against the baselines at the same budgets, and where the difference comes from."""
    rows = {m["method"]: m for m in report["budgets"][0]["methods"]}
    ours, base, lru = rows["ours"], rows["on-demand-disk"], rows["lru-lookahead"]
    return (f"=> same budgets for every method (VRAM 25%, RAM 50% of the experts): ours "
            f"{ours['tokens_per_s']:.0f} tok/s = {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x on-demand from disk and "
            f"{ours['tokens_per_s'] / lru['tokens_per_s']:.2f}x LRU with lookahead: it read "
            f"{ours['gb_nvme'] * 1e3:.1f} MB from disk against {base['gb_nvme'] * 1e3:.1f} and "
            f"{lru['gb_nvme'] * 1e3:.1f} MB, keeping in RAM the experts its predictor expects back; resident, "
            f"every expert in VRAM, is the ceiling ({rows['resident']['tokens_per_s']:.0f} tok/s)")


if __name__ == "__main__":
    sys.exit(run_default())
