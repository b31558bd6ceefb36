"""The physical limit of the last hop: pinned host -> device copy bandwidth, timed with CUDA events.

    raw_h2d_bandwidth(nbytes, repeats, device=None) -> float   bytes per second (best of `repeats`)

The GPU benchmark reports expert-copy throughput against this figure measured in the same
run (docs/architecture.md: "measure against the physical limits in the same run"). Not a test.
"""
from __future__ import annotations

import torch


def raw_h2d_bandwidth(nbytes: int, repeats: int = 5, device: torch.device | str | None = None) -> float:
    """Bytes/s of one `nbytes` copy from a pinned host buffer to the device on a side stream,
    the best of `repeats` timed copies after one warm-up copy."""
    if not torch.cuda.is_available():
        raise RuntimeError("raw_h2d_bandwidth needs a CUDA device (none is visible to torch); "
                           "run it on a GPU machine")
    if nbytes <= 0 or repeats <= 0:
        raise ValueError(f"nbytes and repeats must be positive, got nbytes={nbytes}, repeats={repeats}")
    device = torch.device(device or "cuda")
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)  # touch every page so the first timed copy does not pay for faults
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best_s = float("inf")
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)  # warm-up: context, DMA mappings
        stream.synchronize()
        for _ in range(repeats):
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            best_s = min(best_s, start.elapsed_time(end) / 1e3)
    del dst, src
    return nbytes / best_s


if __name__ == "__main__":  # a quick manual look: python -m pipeline.bench.h2d_probe
    for size in (8 << 20, 128 << 20, 1 << 30):
        print(f"{size >> 20:5d} MiB: {raw_h2d_bandwidth(size, 5) / 1e9:6.1f} GB/s")
