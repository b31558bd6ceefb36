"""A routing trace written out by hand, for tests of what reads traces."""
from __future__ import annotations

import numpy as np

from policies.traces import FORMAT, TraceMeta, make_trace


def tiny_trace(experts, num_experts=4, phase=None, request=None):
    """experts: [T][L][K] ids (-1 = no entry); decode rows of one request unless told; no
    router weights or token ids; experts of 1 MB (meta expert_bytes_bf16)."""
    ex = np.asarray(experts, dtype=np.int16)
    T, L, K = ex.shape
    meta = TraceMeta(format=FORMAT, model="tiny", num_layers=L, num_experts=num_experts, top_k=K, tokens=T,
                     expert_bytes_bf16=1_000_000)
    return make_trace(ex, np.full(ex.shape, np.nan, np.float32), np.full(T, -1),
                      np.ones(T) if phase is None else phase, np.zeros(T) if request is None else request, meta)
