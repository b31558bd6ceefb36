"""Where a replay's GPU time goes: `replay --profile-passes N` runs the last N passes of each
method once more under the torch profiler and sums, per token, the time the GPU spent copying
(memcpy: the expert copies), computing (kernels: the math and the MXFP4 decode), either, and
both at once: the overlap of copies with compute that a prefetch pipeline exists to create.

    covered_us(spans) -> float               microseconds covered by (start, end) spans
    summarize(events, tokens) -> dict        from chrome-trace events of a profile
    profile(run, tokens) -> dict             run() under the torch profiler (CUDA), summarised
"""
from __future__ import annotations

import inspect
import json
import os
import tempfile
from typing import Callable

COPY = ("gpu_memcpy",)
COMPUTE = ("kernel", "gpu_memset")


def covered_us(spans) -> float:
    """Length of the union of (start, end) spans."""
    total, start, end = 0.0, None, None
    for a, b in sorted(spans):
        if end is None or a > end:
            if end is not None:
                total += end - start
            start, end = a, b
        else:
            end = max(end, b)
    return total + (end - start if end is not None else 0.0)


def summarize(events: list[dict], tokens: int) -> dict:
    """Per token, in ms: `copy`, `compute`, `busy` (either), `overlap` (both at once), `window`
    (first GPU activity to last); and copies and kernels per token."""
    if tokens < 1:
        raise ValueError(f"a profile needs at least one token, got {tokens}")
    spans = {"copy": [], "compute": []}
    for e in events:
        if e.get("ph") != "X":
            continue
        kind = "copy" if e.get("cat") in COPY else "compute" if e.get("cat") in COMPUTE else None
        if kind:
            spans[kind].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    every = spans["copy"] + spans["compute"]
    if not every:
        raise ValueError("the profile holds no GPU activity (kernels or copies): was it run on a CUDA device?")
    copy, compute, busy = covered_us(spans["copy"]), covered_us(spans["compute"]), covered_us(every)
    window = max(b for _, b in every) - min(a for a, _ in every)
    per = 1e3 * tokens  # us -> ms per token
    return {"copy_ms_per_token": copy / per, "compute_ms_per_token": compute / per, "busy_ms_per_token": busy / per,
            "overlap_ms_per_token": (copy + compute - busy) / per, "window_ms_per_token": window / per,
            "copies_per_token": len(spans["copy"]) / tokens, "kernels_per_token": len(spans["compute"]) / tokens}


def profile(run: Callable[[], object], tokens: int) -> dict:
    """Run `run()` under the torch profiler (CPU and CUDA activity) and summarise its GPU time."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    # Without acc_events this torch (2.11 on the H100) warns that it clears events at the end
    # of each cycle; one unscheduled cycle loses nothing, but keep every event and no warning.
    extra = {"acc_events": True} if "acc_events" in inspect.signature(torch_profile.__init__).parameters else {}
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], **extra) as prof:
        run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return summarize(events, tokens)


def describe(p: dict) -> str:
    return (f"GPU copy {p['copy_ms_per_token']:.2f} + compute {p['compute_ms_per_token']:.2f} ms/token, "
            f"overlapped {p['overlap_ms_per_token']:.2f}: busy {p['busy_ms_per_token']:.2f} of "
            f"{p['window_ms_per_token']:.2f} ms/token (profiled, so slower than timed)")
