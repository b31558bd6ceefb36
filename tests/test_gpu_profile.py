"""The replay's GPU-time summary (pipeline/bench/gpu_profile.py) on hand-made profiles: copy and
compute time, their union and overlap, per token."""
from __future__ import annotations

import pytest

from pipeline.bench.gpu_profile import covered_us, describe, summarize


def span(cat: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": cat, "ts": ts, "dur": dur, "name": cat}


def test_covered_counts_overlapping_spans_once():
    assert covered_us([]) == 0
    assert covered_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert covered_us([(20, 30), (0, 10)]) == 20  # any order


def test_copies_overlapping_compute_per_token():
    events = [
        span("gpu_memcpy", 0, 100), span("gpu_memcpy", 100, 100),  # copies 0..200
        span("kernel", 150, 100), span("gpu_memset", 300, 20),  # compute 150..250, 300..320
        span("cuda_runtime", 0, 999),  # host side: not GPU time
        {"ph": "i", "cat": "kernel", "ts": 0},  # not a span
    ]
    p = summarize(events, tokens=2)
    assert p["copy_ms_per_token"] == pytest.approx(200 / 2e3)
    assert p["compute_ms_per_token"] == pytest.approx(120 / 2e3)
    assert p["busy_ms_per_token"] == pytest.approx(270 / 2e3)
    assert p["overlap_ms_per_token"] == pytest.approx(50 / 2e3)
    assert p["window_ms_per_token"] == pytest.approx(320 / 2e3)
    assert p["copies_per_token"] == 1 and p["kernels_per_token"] == 1
    assert "overlapped 0.03" in describe(p)


def test_a_profile_without_gpu_activity_is_refused():
    with pytest.raises(ValueError, match="no GPU activity"):
        summarize([span("cuda_runtime", 0, 5)], tokens=1)
    with pytest.raises(ValueError, match="at least one token"):
        summarize([span("kernel", 0, 5)], tokens=0)
