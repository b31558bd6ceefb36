"""`prefetch-bench` with no arguments: the built-in default run (what `make bench` does).

Makes a small GPT-OSS-shaped checkpoint (4 layers x 16 experts, hidden 256) and a matching
synthetic routing trace under `data/generated/` (once; reused afterwards), packs the
checkpoint into an MXFP4 expert store with the precompute worker, validates it, and runs
`replay --baselines` on it: on the GPU if there is one, else on the CPU, a few dozen tokens,
a short table. Every step goes through the same command-line entry points a user would type.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

GENERATED = Path(__file__).resolve().parents[2] / "data" / "generated"
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

    model, store = GENERATED / "default-replay-gpt-oss", GENERATED / "default-replay-store"
    trace = GENERATED / "default-replay-trace.npz"
    if not (model / "original" / "config.json").exists():
        _step("make-model", make_model, [*MODEL_ARGS, "--out", str(model)])
    _step("precompute", precompute, ["precompute", "--model", str(model), "--out", str(store),
                                     "--dtype", "mxfp4", "--workers", "2"])
    _step("validate", precompute, ["validate", "--store", str(store), "--samples", "4"])
    if not trace.exists():
        _step("make-trace", make_trace, [*TRACE_ARGS, "--out", str(trace)])
    _step("replay", bench, ["replay", "--store", str(store), "--trace", str(trace), "--vram", "0.25",
                            "--ram", "0.5", "--baselines"])
    return 0


if __name__ == "__main__":
    sys.exit(run_default())
