"""`prefetch-bench` with no arguments: the built-in default run (what `make bench` does).

Until the GPU replay benchmark exists this runs the parts that do: it makes a small
GPT-OSS-shaped checkpoint and a synthetic routing trace under `data/generated/` (once;
reused afterwards), packs the checkpoint into an MXFP4 expert store with the precompute
worker, validates it, and replays the trace through the cache policies against Belady.
Every step goes through the same command-line entry points a user would type.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

GENERATED = Path(__file__).resolve().parents[2] / "data" / "generated"
MODEL_ARGS = ["--format", "gpt-oss", "--preset", "gpt-oss-20b", "--layers", "4", "--experts", "8",
              "--hidden", "512", "--intermediate", "512", "--seed", "0"]
TRACE_ARGS = ["--layers", "24", "--experts", "32", "--top-k", "4", "--requests", "8",
              "--prompt-tokens", "32", "--decode-tokens", "128", "--seed", "0",
              "--expert-bytes", str(3 * 2880 * 2880 * 2)]


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

    model, store = GENERATED / "default-gpt-oss", GENERATED / "default-gpt-oss-store"
    trace = GENERATED / "default-trace.npz"
    if not (model / "original" / "config.json").exists():
        _step("make-model", make_model, [*MODEL_ARGS, "--out", str(model)])
    _step("precompute", precompute, ["precompute", "--model", str(model), "--out", str(store),
                                     "--dtype", "mxfp4", "--workers", "2"])
    _step("validate", precompute, ["validate", "--store", str(store), "--samples", "4"])
    if not trace.exists():
        _step("make-trace", make_trace, [*TRACE_ARGS, "--out", str(trace)])
    _step("simulate", bench, ["simulate", "--trace", str(trace), "--vram-capacity", "0.25",
                              "--ram-capacity", "0.5"])
    return 0


if __name__ == "__main__":
    sys.exit(run_default())
