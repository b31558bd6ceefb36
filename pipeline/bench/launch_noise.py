"""Is a replay's run-to-run spread the machine's? A decode-like loop of small kernels with no
pipeline, no threads and no other process, timed in rounds as the replay times its methods.

    python -m pipeline.bench.launch_noise [--layers 24] [--rounds 9] [--tokens 200] [--pause 2]

Each token runs, per layer, a [1,H]x[H,H] matmul, an activation, a residual add and an RMS
norm (about eight kernels, what a host-bound batch-1 decode launches). If this loop's
tokens/s spreads as much as the replay's resident method does, the spread is the host's
(an H100 at cc7ed26: 291-331 then 199-253 tok/s over nine rounds, 66%), not the pipeline's.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

MIN_ROUND_S = 0.05


def round_rates(layers: int, rounds: int, tokens: int, pause_s: float, hidden: int = 2880,
                device: str | None = None) -> list[float]:
    """tokens/s of each round of `tokens` tokens, a `pause_s` sleep between rounds."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    weights = [(torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5).to(dev, dtype) for _ in range(layers)]
    x0 = torch.randn(1, hidden, generator=gen).to(dev, dtype)

    def token(x):
        for w in weights:
            h = torch.nn.functional.silu(torch.nn.functional.linear(x, w))
            x = (x + h).clamp_(-4, 4)
            x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)
        return x

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(min(tokens, 50)):
        token(x0)
    sync()
    rates = []
    for r in range(rounds):
        if r:
            time.sleep(pause_s)  # as between two methods' runs
        t0 = time.perf_counter()
        x = x0
        for _ in range(tokens):
            x = token(x)
        sync()
        rates.append(tokens / (time.perf_counter() - t0))
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.launch_noise", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--pause", type=float, default=2.0, help="seconds between rounds")
    p.add_argument("--hidden", type=int, default=2880)
    args = p.parse_args(argv)
    for flag in ("layers", "rounds", "tokens", "hidden"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.pause < 0:
        p.error(f"--pause must be >= 0 seconds, got {args.pause}")
    rates = round_rates(args.layers, args.rounds, args.tokens, args.pause, hidden=args.hidden)
    shortest_s = args.tokens / max(rates)
    if shortest_s < MIN_ROUND_S:  # caches and clocks cool in the pause: short rounds measure that
        print(f"launch_noise: a round took {shortest_s * 1e3:.2f} ms; under {MIN_ROUND_S * 1e3:.0f} ms the spread "
              f"says more about the pause than the machine; raise --tokens", file=sys.stderr)
    print("pure torch loop tok/s per round:", " ".join(f"{v:.0f}" for v in rates),
          f"(max/min - 1 = {max(rates) / min(rates) - 1:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
