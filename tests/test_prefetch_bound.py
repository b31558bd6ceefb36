"""The offline prefetching schedule (policies/prefetch_bound.py): exact on small hand cases,
Belady's loads when compute is free, never below the replay's oracle bound, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from policies.cache.belady import belady_min
from policies.prefetch_bound import aggressive_prefetch


def test_hand_cases_exact():
    alternating = [(0,), (1,), (0,), (1,)]
    # One slot: each copy waits for the visit that holds the slot, so nothing overlaps.
    s = aggressive_prefetch(alternating, 1, copy_s=1.0, compute_s=1.0)
    assert (s.seconds, s.loads, s.stall_seconds) == (8.0, 4, 4.0)
    # Two slots: both copies made once, the second during the first visit's compute.
    s = aggressive_prefetch(alternating, 2, copy_s=1.0, compute_s=1.0)
    assert (s.seconds, s.loads, s.stall_seconds) == (5.0, 2, 1.0)


@pytest.mark.parametrize("seed", range(5))
def test_free_compute_makes_beladys_choices(seed):
    rng = np.random.default_rng(seed)
    keys = rng.zipf(1.3, size=400) % 40
    for cap in (1, 3, 8):
        s = aggressive_prefetch([(int(k),) for k in keys], cap, copy_s=1.0, compute_s=0.0)
        assert s.loads == belady_min(keys, cap)[1]
        assert s.seconds == pytest.approx(s.loads * 1.0)


@pytest.mark.parametrize("seed", range(5))
def test_never_faster_than_the_oracle_bound_nor_slower_than_no_overlap(seed):
    rng = np.random.default_rng(seed)
    visits = [tuple(int(x) for x in rng.choice(30, size=3, replace=False)) for _ in range(200)]
    flat = np.array([k for v in visits for k in v])
    for cap, copy_s, compute_s in ((3, 1.0, 0.5), (6, 0.2, 1.0), (12, 1.0, 1.0)):
        s = aggressive_prefetch(visits, cap, copy_s, compute_s)
        belady_loads = belady_min(flat, cap)[1]
        assert s.loads >= belady_loads
        assert s.seconds >= max(len(visits) * compute_s, belady_loads * copy_s) - 1e-9
        assert s.seconds <= len(visits) * compute_s + s.loads * copy_s + 1e-9
        assert s.stall_seconds == pytest.approx(s.seconds - len(visits) * compute_s)


def test_free_copies_cost_only_compute():
    visits = [(0, 1), (2, 3), (0, 2), (1, 3)] * 5
    s = aggressive_prefetch(visits, 2, copy_s=0.0, compute_s=1.0)
    assert s.seconds == 20.0 and s.stall_seconds == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="capacity 1 is below the widest visit"):
        aggressive_prefetch([(0, 1)], 1, 1.0, 1.0)
    with pytest.raises(ValueError, match="times must be >= 0"):
        aggressive_prefetch([(0,)], 1, -1.0, 1.0)
